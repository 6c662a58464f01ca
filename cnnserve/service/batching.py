"""Dynamic batching: classifications that arrive close together run as one batch.

A request's inputs, already preprocessed to the training size, join its model's queue. The
queue runs as one batch on the ``predict`` lane when it holds ``max_batch_size`` inputs, or
``max_batch_delay`` seconds after the first of them arrived, whichever comes first: a request
alone waits at most that delay. Under load, one pass over a batch of N inputs costs much less
than N passes of one, so throughput rises; the batch's slot, its 503 after ``queue_timeout``
and its metrics are the lane's, as for a single request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnserve.service import deps
from cnnserve.service.deps import Lane
from cnnserve.service.registry import LoadedModel

__all__ = ["Batcher"]


@dataclass(eq=False)
class _Item:
    x: np.ndarray  # (n, C, Th, Tw) network inputs
    future: asyncio.Future


@dataclass(eq=False)
class _Queue:
    items: list[_Item] = field(default_factory=list)
    size: int = 0  # inputs in items
    timer: asyncio.TimerHandle | None = None


class Batcher:
    """One queue per model, run as batches on a lane.

    Parameters
    ----------
    lane : Lane
        Where batches run (the ``predict`` lane).
    max_batch_size : int
        The most inputs of one batch (a request of more inputs runs alone).
    max_batch_delay : float
        Seconds the first input of a batch waits for others.
    """

    def __init__(self, lane: Lane, max_batch_size: int, max_batch_delay: float) -> None:
        self.lane = lane
        self.max_batch_size = max_batch_size
        self.max_batch_delay = max_batch_delay
        self._queues: dict[LoadedModel, _Queue] = {}
        self.batch_sizes: list[int] = []  # of the last batches run, for tests and benchmarks
        self._tasks: set[asyncio.Task] = set()  # running batches (the loop holds tasks weakly)

    def submit(self, model: LoadedModel, x: np.ndarray) -> asyncio.Future:
        """Queue inputs ``x`` for a batch of their model's: the future of their class scores.

        Parameters
        ----------
        model : LoadedModel
        x : ndarray, shape (n, C, Th, Tw)
            Preprocessed inputs of the training size, in the model's dtype.

        Returns
        -------
        asyncio.Future
            Of an ndarray of shape (n, K), float32: the network's scores (logits). Cancel it
            when the request leaves: a batch that has not started yet leaves its inputs out.
        """
        loop = asyncio.get_running_loop()
        item = _Item(x, loop.create_future())
        queue = self._queues.setdefault(model, _Queue())
        queue.items.append(item)
        queue.size += len(x)
        if queue.size >= self.max_batch_size:
            self._flush(model)
        elif queue.timer is None:
            queue.timer = loop.call_later(self.max_batch_delay, self._flush, model)
        return item.future

    def _flush(self, model: LoadedModel) -> None:
        """Start running the queue's inputs (up to the batch size) as one batch."""
        queue = self._queues.get(model)
        if queue is None or not queue.items:
            return
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        taken, size = [], 0
        while queue.items and (not taken or size + len(queue.items[0].x) <= self.max_batch_size):
            item = queue.items.pop(0)
            queue.size -= len(item.x)
            if not item.future.done():  # not cancelled: its request still waits
                taken.append(item)
                size += len(item.x)
        if queue.items:  # what is left waits at most the delay again
            queue.timer = asyncio.get_running_loop().call_later(
                self.max_batch_delay, self._flush, model
            )
        else:
            del self._queues[model]
        if taken:
            task = asyncio.ensure_future(self._run(model, taken))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, model: LoadedModel, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        abandon = loop.create_future()  # done when every request of the batch has left

        def left(_: asyncio.Future) -> None:
            if not abandon.done() and all(it.future.cancelled() for it in items):
                abandon.set_result(None)

        for item in items:
            item.future.add_done_callback(left)

        def work() -> Any:
            # On the lane's thread, once a slot is free: requests that left meanwhile are
            # left out (read without the loop's lock: at worst one more input runs).
            live = [it for it in items if not it.future.done()]
            if not live:
                return live, None
            x = live[0].x if len(live) == 1 else np.concatenate([it.x for it in live])
            return live, deps.class_scores(model.fcn, x)  # (N, K)

        size = sum(len(it.x) for it in items)
        try:
            (live, scores), _ = await self.lane.run(None, model, work, size, abandon)
        except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        if scores is None:
            return
        self.batch_sizes = [*self.batch_sizes[-999:], len(scores)]
        start = 0
        for item in live:
            n = len(item.x)
            if not item.future.done():  # a request cancelled meanwhile needs no answer
                item.future.set_result(scores[start : start + n])
            start += n
