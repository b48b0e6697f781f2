"""The one seeding helper: run a block under a seed, with every generator restored after."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .errors import InferenceError, LMSCMError
from .validation import as_seed

__all__ = ["seeded"]


@contextmanager
def seeded(seed: Any, error: type[LMSCMError] = InferenceError) -> Iterator[None]:
    """Inside the block torch's generators are seeded with ``seed`` (``None``: left as they
    are); after it, the CPU generator and that of every CUDA device are what they were
    before (``torch.random.fork_rng(devices=[])`` would restore the CPU one only, although
    ``torch.manual_seed`` reseeds them all).

    :raises error: for a seed that is not an integer in ``[0, 2**64)``.

    >>> before = torch.rand(())
    >>> with seeded(0):
    ...     a = torch.rand(3)
    >>> with seeded(0):
    ...     b = torch.rand(3)
    >>> bool(torch.equal(a, b))
    True
    """
    seed = as_seed(seed, error=error)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield
