"""The one seeding policy: :func:`seeded` runs a block under a seed (torch's global generators,
which Pyro draws from), with every generator restored after; :func:`generator` gives a seeded
side computation (resampling, random orders, the interventional baseline's prior noise) a
generator of its own, and :func:`numpy_generator` a numpy one (a study summary's bootstrap)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from .atomic import reversible
from .errors import InferenceError, LMSCMError
from .validation import as_seed

__all__ = ["generator", "numpy_generator", "seeded"]


class seeded(reversible):  # noqa: N801 - used as a function, like contextlib's helpers
    """Inside the block torch's generators are seeded with ``seed`` (``None``: left as they
    are); after it, the CPU generator and that of every CUDA device are what they were
    before (``torch.random.fork_rng(devices=[])`` would restore the CPU one only, although
    ``torch.manual_seed`` reseeds them all).

    Pyro draws its samples from torch's global generator, so a seeded block cannot use a
    generator of its own: it is a :class:`~pyro_lmscm.atomic.reversible` change, which holds
    the process's compute lock (:data:`pyro_lmscm.atomic.COMPUTE_LOCK`) throughout, and no
    other thread computes on a language model (nor reseeds) until it ends. Threads that draw from torch's global
    generator outside this library are not held back.

    :raises error: for a seed that is not an integer in ``[0, 2**64)``.

    >>> before = torch.rand(())
    >>> with seeded(0):
    ...     a = torch.rand(3)
    >>> with seeded(0):
    ...     b = torch.rand(3)
    >>> bool(torch.equal(a, b))
    True
    """

    def __init__(self, seed: Any, error: type[LMSCMError] = InferenceError) -> None:
        seed = as_seed(seed, error=error)
        saved: list[Any] = []  # one entry, appended at once before the generators change

        def apply() -> None:
            devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
            saved.append((torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices]))
            if seed is not None:
                torch.manual_seed(seed)

        def restore() -> None:
            for cpu, cuda in saved:
                torch.set_rng_state(cpu)
                for device, state in cuda:
                    torch.cuda.set_rng_state(state, device)

        super().__init__(apply, restore)


def generator(seed: int | None, stream: str | None = None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator of its own on ``device``: seeded with ``seed``, or, for a named
    ``stream``, with 60 bits of the SHA-256 of ``"pyro-lmscm <stream> <seed>"``, so that its
    draws are independent of those seeded with ``seed`` itself; fresh entropy without a seed.

    >>> a = torch.rand(2, generator=generator(3, "baseline"))
    >>> bool(torch.equal(a, torch.rand(2, generator=generator(3, "baseline"))))
    True
    """
    out = torch.Generator(device=device)
    if seed is None:
        out.seed()
    elif stream is None:
        out.manual_seed(int(seed))
    else:
        out.manual_seed(int(hashlib.sha256(f"pyro-lmscm {stream} {int(seed)}".encode()).hexdigest()[:15], 16))
    return out


def numpy_generator(seed: int | None) -> np.random.Generator:
    """A numpy generator of its own (``numpy.random.default_rng``): seeded with ``seed``, or
    fresh entropy without one; for side computations in numpy, such as the bootstrap of a
    study summary.

    >>> int(numpy_generator(3).integers(0, 100)) == int(numpy_generator(3).integers(0, 100))
    True
    """
    return np.random.default_rng(None if seed is None else int(seed))
