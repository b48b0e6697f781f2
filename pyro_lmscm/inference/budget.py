"""The memory budget of a chunk of rows decoded at once, shared by the counterfactual draws
(:func:`~pyro_lmscm.inference.counterfactual.auto_chunk_size`) and the exact sampler
(:meth:`~pyro_lmscm.inference.ExactCounterfactual.sample`), so neither imports the other."""

from __future__ import annotations

__all__ = ["AUTO_CHUNK_BYTES"]

#: The memory that one automatically sized chunk of draws may hold while it is decoded (its
#: KV cache and its per-step logits and noise:
#: :func:`~pyro_lmscm.inference.counterfactual.auto_chunk_size`), by device type. On the CPU
#: 80 MiB: 17 rows of SmolLM2 float32 at T = 64, so that ``counterfactual(num_samples=64)``
#: peaks within 150 MB above the model (a 64-row chunk holds a 209 MB KV cache alone;
#: benchmarks/README.md, "Issue 34: the automatic chunk from a memory budget"). A caller that
#: trades memory for speed passes its own ``budget`` (the study does:
#: :data:`pyro_lmscm.study.worker.STUDY_CHUNK_BYTES`) or ``chunk_size``.
AUTO_CHUNK_BYTES: dict[str, int] = {"cpu": 80 * 2**20, "cuda": 8 * 2**30}
