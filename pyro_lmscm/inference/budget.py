"""The memory budget of a chunk of rows decoded at once, shared by the counterfactual draws
(:func:`~pyro_lmscm.inference.counterfactual.auto_chunk_size`) and the exact sampler
(:meth:`~pyro_lmscm.inference.ExactCounterfactual.sample`), so neither imports the other."""

from __future__ import annotations

__all__ = ["AUTO_CHUNK_BYTES", "MIN_CHUNK_ROWS", "even_chunk_size"]

#: The memory that one automatically sized chunk of draws may hold while it is decoded (its
#: KV cache and its per-step logits and noise:
#: :func:`~pyro_lmscm.inference.counterfactual.auto_chunk_size`), by device type. On the CPU
#: 80 MiB: 17 rows of SmolLM2 float32 at T = 64 (64 draws then run as 4 chunks of 16, of one
#: size), so that ``counterfactual(num_samples=64)`` peaks within 150 MB above the model (a
#: 64-row chunk holds a 209 MB KV cache alone; benchmarks/README.md, "Issue 34: the automatic
#: chunk from a memory budget" and "Issue 34: chunks of one size"). A caller that
#: trades memory for speed passes its own ``budget`` (the study does:
#: :data:`pyro_lmscm.study.worker.STUDY_CHUNK_BYTES`) or ``chunk_size``.
AUTO_CHUNK_BYTES: dict[str, int] = {"cpu": 80 * 2**20, "cuda": 8 * 2**30}

#: The fewest rows an automatically sized chunk holds, whatever the budget: on a CPU a decoding
#: step of up to 8 rows costs little more than a step of one (SmolLM2 fp32: 4 rows 1.8x one row,
#: 16 rows 3.3x), so splitting fewer rows saves memory at almost the full price of a second run.
#: At T = 512 the 80 MiB budget holds 3 SmolLM2 rows, and 4 draws took 6.5x the time of T = 128
#: (two runs) where the model's own decoding takes 4.3x; with the floor a chunk of 8 rows at
#: T = 512 holds about 200 MB. A chunk stays linear in T; the budget still governs larger batches
#: (17 rows at T = 64).
MIN_CHUNK_ROWS = 8


def even_chunk_size(fits: int, num_samples: int) -> int:
    """The chunk size that splits ``num_samples`` draws into as few chunks of at most ``fits``
    as possible, as evenly as possible: ``ceil(num_samples / ceil(num_samples / fits))``.

    >>> even_chunk_size(17, 64), even_chunk_size(17, 16), even_chunk_size(17, 35)
    (16, 16, 12)
    """
    fits, num_samples = max(1, fits), max(1, num_samples)
    chunks = -(-num_samples // fits)
    return -(-num_samples // chunks)
