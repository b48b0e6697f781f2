"""The one seeding helper: run a block under a seed, with every generator restored after."""

from __future__ import annotations

from typing import Any

import torch

from .atomic import COMPUTE_LOCK, protected, restore_atomically
from .errors import InferenceError, LMSCMError
from .validation import as_seed

__all__ = ["seeded"]


class seeded:  # noqa: N801 - used as a function, like contextlib's helpers
    """Inside the block torch's generators are seeded with ``seed`` (``None``: left as they
    are); after it, the CPU generator and that of every CUDA device are what they were
    before (``torch.random.fork_rng(devices=[])`` would restore the CPU one only, although
    ``torch.manual_seed`` reseeds them all).

    Pyro draws its samples from torch's global generator, so a seeded block cannot use a
    generator of its own: it holds the process's compute lock
    (:data:`pyro_lmscm.atomic.COMPUTE_LOCK`) instead, and no other thread computes on a
    language model (nor reseeds) until it ends. Threads that draw from torch's global
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
        self.seed = as_seed(seed, error=error)

    @protected
    def __enter__(self) -> None:
        COMPUTE_LOCK.__enter__()
        saved: list[Any] = []
        try:
            devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
            saved.append((torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices]))
            self._saved = saved
            if self.seed is not None:
                torch.manual_seed(self.seed)
        except BaseException as error:
            try:
                restore_atomically(lambda: _set_states(saved))
            finally:
                COMPUTE_LOCK.__exit__(type(error), error, error.__traceback__)
            raise

    @protected
    def __exit__(self, *exc: Any) -> None:
        try:
            restore_atomically(lambda: _set_states(self._saved))
        finally:
            COMPUTE_LOCK.__exit__(*exc)


def _set_states(saved: list[Any]) -> None:
    for cpu, cuda in saved:
        torch.set_rng_state(cpu)
        for device, state in cuda:
            torch.cuda.set_rng_state(state, device)
