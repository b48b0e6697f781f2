"""Scale a study out on Ray: actors that each hold one model process shards of the corpus.

``pip install 'pyro-lmscm[ray]'``. :func:`run_on_ray` connects to ``config.ray_address``
(or starts a local Ray instance), starts ``config.num_workers`` actors, each building its
own :class:`~pyro_lmscm.study.worker.StudyWorker` from the plain-data config (the model is
loaded on the worker from ``config.model``: an embedded name, a folder every node can read,
or a hub id), and hands them shards of ``config.shard_size`` strings, a new shard to each
actor as soon as it returns one. The driver stores every record as it arrives, so an
interrupted Ray study resumes like a local one.

A record depends only on the config and the string's index (see
:mod:`~pyro_lmscm.study.worker`; shards hold whole batches of ``batch_size`` strings), so
the results equal the local run's for the same seed, whatever the number of workers or
the shard size. Each actor uses ``config.threads`` torch
threads, as a local run does.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import LMSCMError
from .config import StudyError
from .corpus import CorpusItem
from .worker import StudyWorker

if TYPE_CHECKING:
    from .config import StudyConfig

__all__ = ["run_on_ray"]


class _RayWorker:
    """The actor: one model, many shards."""

    def __init__(self, config: dict[str, Any], allow_code: bool = False) -> None:
        import torch

        torch.set_num_threads(int(config["threads"]))
        self.worker: StudyWorker | None = None
        self.error: LMSCMError | None = None
        try:
            self.worker = StudyWorker(config, allow_code=allow_code)
        except LMSCMError as error:  # a bad config: handed to the driver, not a dead actor
            self.error = error

    def refusal(self, items: Sequence[CorpusItem] = ()) -> LMSCMError | None:
        """The typed error that building the worker raised (a bad model, dtype, intervention
        or attribute check), or that :meth:`~pyro_lmscm.study.worker.StudyWorker.check_chat`
        raises for ``items`` (chat rows for a model without a chat template, text rows for
        chat edits), or ``None``."""
        if self.worker is not None:
            try:
                self.worker.check_chat(items)
            except LMSCMError as error:
                return error
        return self.error

    def process(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        assert self.worker is not None  # run_on_ray asks for `refusal` first
        return self.worker.process_many(items)


def run_on_ray(
    config: StudyConfig,
    items: Sequence[CorpusItem],
    on_record: Callable[[dict[str, Any]], None],
) -> None:
    """Process ``items`` on Ray and pass each record to ``on_record`` (in completion order).

    Ray is initialised if it is not already (``ray.init(address=config.ray_address)``; with
    no address, a local instance with ``num_workers * threads`` CPUs), and shut down again
    if this call started it.

    :raises StudyError: if ray is not installed.
    :raises LMSCMError: the error of a config the actors refuse (a bad model, dtype,
        intervention or attribute check, chat rows for a model without a chat template, text
        rows for chat edits), before any shard is handed out.
    """
    try:
        import ray
    except ImportError as error:
        raise StudyError("the Ray backend needs ray: pip install 'pyro-lmscm[ray]'.") from error

    started = False
    if not ray.is_initialized():
        if config.ray_address is not None:
            ray.init(address=config.ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=config.num_workers * config.threads, include_dashboard=False, log_to_driver=False)
        started = True
    actor_class: Any = ray.remote(num_cpus=config.threads)(_RayWorker)
    plain = config.to_dict()
    actors: list[Any] = [
        actor_class.remote(plain, config.allow_code) for _ in range(min(config.num_workers, len(items)) or 1)
    ]
    # shards of whole batches (blocks of batch_size consecutive indices), so that a record
    # equals the local run's whatever the shard size
    blocks = [list(block) for _, block in itertools.groupby(items, key=lambda item: item.index // config.batch_size)]
    per_shard = max(1, -(-config.shard_size // config.batch_size))
    shards = [
        [item.to_dict() for block in blocks[i : i + per_shard] for item in block]
        for i in range(0, len(blocks), per_shard)
    ]
    try:
        # the first chat row and the first text row, if any: what StudyWorker.check_chat looks at
        kinds = [next((item for item in items if (item.messages is None) == text), None) for text in (False, True)]
        firsts = [item for item in kinds if item is not None]
        for refusal in ray.get([actor.refusal.remote(firsts) for actor in actors]):
            if refusal is not None:
                raise refusal
        pending: dict[Any, Any] = {}
        queue = list(reversed(shards))
        for actor in actors:
            if queue:
                pending[actor.process.remote(queue.pop())] = actor
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ready[0])
            records = ray.get(ready[0])
            if queue:
                pending[actor.process.remote(queue.pop())] = actor
            for record in records:
                on_record(record)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
