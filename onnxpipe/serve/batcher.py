"""Dynamic batching: requests gathered up to a batch size or a queue delay, run as one batch, split back.

A batch is cut when a device worker has room for it: while every worker is busy, requests
pile up and the next batch is bigger (Triton's rule). Once a worker is free, the batcher waits
at most ``max_queue_delay_ms`` after the oldest request for more to arrive, or until
``max_batch_size`` samples are waiting. Only requests whose inputs agree on every axis but the
first are stacked; others wait for a batch of their own shape, except sequence lengths under an
attention mask, which are padded to the longest and cut back (:mod:`onnxpipe.serve.padding`).

A batch that fails is split: each of its requests runs alone (``solo``), so one bad request
cannot fail its neighbours, and a request that was running when its worker died twice is answered
503 with ``Retry-After`` instead of taking more workers down. The batching loop is supervised: an
error in it is logged and the loop starts again, and every request it held is answered or queued
again, so no request is ever left waiting on a loop that is gone.

Example:
    >>> batcher = Batcher(entry, pool, max_batch_size=32, max_queue_delay_ms=2)  # doctest: +SKIP
    >>> outputs = await batcher.infer({"x": x})  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from onnxpipe.serve.metrics import Metrics
from onnxpipe.serve.padding import PadPlan
from onnxpipe.serve.protocol import ProtocolError
from onnxpipe.serve.repository import ModelEntry
from onnxpipe.serve.workers import DevicePool, WorkerCrashed, WorkerError

log = logging.getLogger("onnxpipe.serve")

MAX_ATTEMPTS = 2  # a request that was running when its worker died this many times is answered 503


class Unavailable(ProtocolError):
    """503: the model cannot take the request now; ``retry_after`` seconds (None: not coming back) go
    to the ``Retry-After`` header.

    Example:
        >>> Unavailable("restarting", 2.0).status
        503
    """

    def __init__(self, message: str, retry_after: float | None = 1.0) -> None:
        super().__init__(503, message)
        self.retry_after = retry_after


@dataclass
class _Request:
    feeds: dict[str, np.ndarray]
    rows: int
    key: tuple
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    attempts: int = 0
    solo: bool = False
    length: int | None = None  # sequence length, when requests of other lengths may join it padded


def _close(shortest: int, longest: int) -> bool:
    """Whether sequences this far apart may share a padded batch: the padding at most doubles a request's
    length (attention costs the square), except among short ones, where it costs little anyway."""
    return longest <= max(2 * shortest, 16)


def _answer(r: _Request, outputs: dict[str, np.ndarray]) -> None:
    if not r.future.done():  # a client that went away cancelled it
        r.future.set_result(outputs)


def _fail(r: _Request, err: Exception) -> None:
    if not r.future.done():
        r.future.set_exception(err)


class Batcher:
    """The queue of one model in front of its device workers.

    Args:
        entry: the model (its batch axis decides whether requests may be stacked).
        pool: its device workers, attached to the running loop.
        max_batch_size: most samples in one batch (1 turns batching off).
        max_queue_delay_ms: longest wait for more requests once a worker is free.
        max_queue: requests waiting at most; more are refused with 503.
        metrics: where batch sizes, queue and compute times go.
    """

    def __init__(self, entry: ModelEntry, pool: DevicePool, *, max_batch_size: int = 32,
                 max_queue_delay_ms: float = 2.0, max_queue: int = 2048, metrics: Metrics | None = None) -> None:
        self.entry, self.pool = entry, pool
        self.max_batch_size = max(1, max_batch_size)
        self.delay = max(0.0, max_queue_delay_ms) / 1000.0
        self.max_queue = max_queue
        self.batching = entry.batchable and self.max_batch_size > 1
        self.pad = PadPlan.of(entry) if self.batching else None  # variable sequence lengths share batches
        self.metrics = metrics or Metrics()
        self._queue: deque[_Request] = deque()
        self._arrival = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: dict[asyncio.Task, list[_Request]] = {}  # batches on the workers, by the task awaiting each
        self._closing = False
        self.loop_restarts = 0  # times the supervisor restarted a failed loop (tests and logs)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"batcher-{self.entry.name}")

    async def _supervise(self) -> None:
        """Run the batching loop; when it raises, log it and run it again (requests stay queued)."""
        while not self._closing:
            try:
                await self._loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.loop_restarts += 1
                log.exception("model %s: the batching loop failed; restarting it", self.entry.name)
                await asyncio.sleep(0.01)  # never a hot loop, whatever keeps failing

    def _unavailable(self) -> Unavailable:
        wait = self.pool.retry_after() if hasattr(self.pool, "retry_after") else None
        if wait is None:
            return Unavailable(f"model {self.entry.name!r} has no device worker left", None)
        return Unavailable(f"model {self.entry.name!r}: its device workers are restarting; retry in {wait:.0f} s", wait)

    async def stop(self) -> None:
        self._closing = True
        held = [r for batch in self._running.values() for r in batch]  # before the cancelled tasks drop them
        for t in [self._task, *self._running]:
            if t is not None:
                t.cancel()
        await asyncio.gather(*(t for t in [self._task, *self._running] if t is not None), return_exceptions=True)
        for r in [*self._queue, *held]:
            if not r.future.done():
                r.future.set_exception(Unavailable("the server is shutting down", None))
        self._queue.clear()
        self._running.clear()

    def pending(self) -> int:
        """Requests queued or in a running batch (a model being unloaded waits for 0)."""
        return len(self._queue) + len(self._running)

    async def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue one request's inputs and wait for its outputs.

        Raises:
            ProtocolError: the model failing on these inputs (400).
            Unavailable: queue full, workers restarting or gone, shutting down, or the request running
                when its worker died twice (503).
        """
        if self._closing:
            raise Unavailable("the server is shutting down", None)
        if len(self._queue) >= self.max_queue:
            raise Unavailable(f"model {self.entry.name!r}: {len(self._queue)} requests are waiting already; retry later")
        if not self.pool.alive():
            raise self._unavailable()
        if self.batching:
            rows = next(iter(feeds.values())).shape[0]
            key, length = self._key(feeds)
        else:
            rows, key, length = 1, (), None
        req = _Request(feeds, rows, key, asyncio.get_running_loop().create_future(), length=length)
        self._queue.append(req)
        self.metrics.queue_depth.set(len(self._queue), model=self.entry.name)
        self._arrival.set()
        return await req.future

    def _key(self, feeds: dict[str, np.ndarray]) -> tuple[tuple, int | None]:
        """What a request batches by (dtypes and shapes past the batch axis) and its sequence length if padded."""
        pad = self.pad
        if pad is not None and all(k in feeds for k in pad.inputs):
            lengths = {feeds[k].shape[a] for k, a in pad.inputs.items() if feeds[k].ndim > a}
            if len(lengths) == 1:  # inputs that disagree on the length are left as they are: the model judges them
                return tuple((k, v.dtype.str, pad.key_shape(k, v.shape)) for k, v in sorted(feeds.items())), lengths.pop()
        return tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(feeds.items())), None

    # the loop ------------------------------------------------------------------------------
    def _waiting_rows(self, first: _Request) -> int:
        return sum(r.rows for r in self._queue if r.key == first.key and not r.solo)

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                self._arrival.clear()
                await self._arrival.wait()
            await self.pool.wait_capacity()
            if not self.pool.alive():
                self._fail_all(self._unavailable())
                continue
            first = self._queue[0]
            if self.batching and not first.solo:
                deadline = first.arrived + self.delay
                while self._waiting_rows(first) < self.max_batch_size:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._arrival.clear()
                    try:
                        await asyncio.wait_for(self._arrival.wait(), left)
                    except asyncio.TimeoutError:
                        break
            batch = self._cut()
            self.metrics.queue_depth.set(len(self._queue), model=self.entry.name)
            if not batch:
                continue
            try:
                self._submit(batch)
            except WorkerCrashed:  # the free worker died while the batch was cut: wait for the next one
                self._requeue(batch, solo=False)
            except BaseException as exc:
                for r in batch:
                    _fail(r, ProtocolError(500, f"internal error while batching: {type(exc).__name__}: {exc}"))
                raise

    def _submit(self, batch: list[_Request]) -> None:
        start = time.perf_counter()
        if len(batch) == 1:
            feeds = batch[0].feeds
        elif batch[0].length is not None:
            feeds = self.pad.stack([r.feeds for r in batch])
        else:
            feeds = {k: np.concatenate([r.feeds[k] for r in batch]) for k in batch[0].feeds}
        # submitted here, not in the task: the next wait_capacity() must see this batch's slot taken
        pending = self.pool.submit(feeds)
        for r in batch:
            self.metrics.queue.observe(start - r.arrived, model=self.entry.name)
        task = asyncio.get_running_loop().create_task(self._finish(batch, pending))
        self._running[task] = batch
        task.add_done_callback(lambda t: self._running.pop(t, None))

    def _cut(self) -> list[_Request]:
        """The oldest live request and those that may join it, up to ``max_batch_size`` samples."""
        while self._queue and self._queue[0].future.done():  # the client went away
            self._queue.popleft()
        if not self._queue:
            return []
        first = self._queue.popleft()
        batch, rows = [first], first.rows
        if not self.batching or first.solo:
            return batch
        keep: deque[_Request] = deque()
        lo = hi = first.length
        while self._queue:
            r = self._queue.popleft()
            if r.future.done():
                continue
            if r.key == first.key and not r.solo and rows + r.rows <= self.max_batch_size and (
                    r.length is None or _close(min(lo, r.length), max(hi, r.length))):
                batch.append(r)
                rows += r.rows
                if r.length is not None:
                    lo, hi = min(lo, r.length), max(hi, r.length)
            else:
                keep.append(r)
        self._queue = keep
        return batch

    def _requeue(self, reqs: list[_Request], solo: bool = True) -> None:
        for r in reversed(reqs):
            r.solo = r.solo or solo
            self._queue.appendleft(r)
        self._arrival.set()

    def _fail_all(self, err: Exception) -> None:
        while self._queue:
            r = self._queue.popleft()
            if not r.future.done():
                r.future.set_exception(err)

    async def _finish(self, batch: list[_Request], pending: asyncio.Future) -> None:
        try:
            await self._settle(batch, pending)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: its requests are answered all the same, the log keeps the traceback
            log.exception("model %s: a batch failed after it ran", self.entry.name)
            for r in batch:
                _fail(r, ProtocolError(500, f"internal error after the batch ran: {type(exc).__name__}: {exc}"))

    async def _settle(self, batch: list[_Request], pending: asyncio.Future) -> None:
        name = self.entry.name
        try:
            outputs, seconds, device = await pending
        except WorkerCrashed as exc:
            retry = []
            for r in batch:
                r.attempts += exc.running
                if r.attempts >= MAX_ATTEMPTS:
                    _fail(r, Unavailable(f"model {name!r}: {exc}; the request was running when its worker died "
                                         f"{r.attempts} times (it may be what kills it)", 1.0))
                else:
                    retry.append(r)
            # a batch that was only queued on the dead worker did nothing wrong: it may batch again
            self._requeue(retry, solo=exc.running)
            return
        except WorkerError as exc:
            if len(batch) > 1:  # find which request the model fails on: each runs alone
                self._requeue(batch)
                return
            r = batch[0]
            _fail(r, ProtocolError(400, f"model {name!r} failed on this request: {exc}"))
            return
        total = sum(r.rows for r in batch)
        self.metrics.batches.inc(model=name, device=device)
        self.metrics.batch_size.observe(total, model=name)
        self.metrics.batch_requests.observe(len(batch), model=name)
        self.metrics.compute.observe(seconds, model=name, device=device)
        if len(batch) == 1:
            r = batch[0]
            _answer(r, outputs)
            return
        bad = [k for k, v in outputs.items() if v.ndim == 0 or v.shape[0] != total]
        if bad:  # an output without a batch axis after all: stop stacking requests for this model
            log.warning("model %s: output(s) %s do not follow the batch axis; dynamic batching is off for it",
                        name, ", ".join(bad))
            self.batching = False
            self._requeue(batch)
            return
        at = 0
        for r in batch:
            piece = {k: v[at:at + r.rows] for k, v in outputs.items()}
            if r.length is not None:
                piece = self.pad.cut(piece, r.length)
            at += r.rows
            _answer(r, piece)
