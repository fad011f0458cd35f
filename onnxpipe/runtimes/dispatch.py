"""The batch runner's event loop: cut micro-batches, hand them out, collect results, retry, emit
shards in order.

The dispatcher owns every piece of a run's state (:class:`Task`, :class:`Job`); the runner talks
to it only through a :class:`Plan` (how to cut and retry), the pool, the per-device stats it
fills in, and two callbacks. It imports nothing of the runner. Plans, tasks and the cutting of a
source into micro-batches are in :mod:`onnxpipe.runtimes.tasks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from onnxpipe.core.errors import OnnxpipeError
from onnxpipe.core.sources import Chunk, Source
from onnxpipe.runtimes.batch_result import BatchEvent, DeviceStats
from onnxpipe.runtimes.manifest import Shard
from onnxpipe.runtimes.tasks import Job, Plan, Task, cut_tasks, make_task

__all__ = ["SYSTEMIC", "Dispatcher", "Job", "Plan", "Task", "cut_tasks", "make_task"]

# when this many samples failed and none succeeded, the model or data is broken as a whole
SYSTEMIC = 8


class Dispatcher:
    """One run over one source; :meth:`shards` drives it.

    Args:
        pool: the workers (:class:`~onnxpipe.runtimes.worker.LocalPool`'s interface).
        source: the input.
        plan: how to cut, balance and retry.
        stats: one :class:`DeviceStats` per worker, updated as batches finish.
        bar: progress (``advance(n)``).
        skip: shards already written (a resumed job): read past, never run.
        on_ready: called with a worker's ``ready``/``placement`` event (a restarted worker).
        on_stuck: called when workers do not settle after an early stop (close the pool).
    """

    def __init__(self, pool: Any, source: Source, plan: Plan, stats: Sequence[DeviceStats], bar: Any, *,
                 skip: set[int] | frozenset[int] = frozenset(), on_ready: Callable[[Any], None] | None = None,
                 on_stuck: Callable[[], None] | None = None) -> None:
        self.pool, self.plan, self.stats, self.bar = pool, plan, stats, bar
        self.on_ready, self.on_stuck = on_ready, on_stuck
        self.job = Job(skip=set(skip))
        self.tasks = cut_tasks(source, plan, self.job)
        n = len(plan.devices)
        self.window = max(2 * plan.shard_size, plan.batch_size * plan.depth * n * 2)
        self.gone: set[int] = set()  # workers given up on
        self._ids = 1 << 40  # ids of split-off samples, apart from the stream's

    # choosing ------------------------------------------------------------------------------
    def _ranked(self) -> list[int]:
        """Workers with a free slot, untried ones first, then by measured speed."""
        free = [wid for wid, w in enumerate(self.pool.workers) if wid not in self.gone and w.free() > 0]
        speed = self.stats
        return sorted(free, key=lambda wid: (speed[wid].speed is not None, -(speed[wid].speed or 0.0),
                                             -self.pool.workers[wid].free()))

    def _next(self, wid: int) -> Task | None:
        """A retry this worker may take (not the one that just failed it, unless it is the only one
        left), else the next micro-batch of the input while the window allows."""
        job = self.job
        others = any(i not in self.gone and i != wid for i in range(len(self.pool.workers)))
        for i, t in enumerate(job.pending):
            if t.avoid != wid or not others:
                del job.pending[i]
                return t
        if job.exhausted or job.cut - job.emitted >= self.window:
            return None
        task = next(self.tasks, None)
        if task is None:
            job.exhausted = True
        return task

    def _fill(self) -> None:
        placed = True
        while placed:
            placed = False
            for wid in self._ranked():
                task = self._next(wid)
                if task is not None:
                    self.job.inflight[task.id] = (task, wid)
                    self.pool.submit(wid, task.id, task.feeds())
                    placed = True
                    break  # rank again: free slots and speeds changed

    # results -------------------------------------------------------------------------------
    def _done(self, wid: int, task: Task, outputs: dict[str, np.ndarray], seconds: float) -> None:
        job, plan = self.job, self.plan
        kept = {}
        for name, arr in outputs.items():
            arr = np.asarray(arr)
            axis = name not in plan.no_axis and arr.ndim >= 1 and arr.shape[0] == task.rows
            kept[name] = (arr[:task.count] if axis and task.rows != task.count else arr, axis)
        shard = task.start // plan.shard_size
        job.results.setdefault(shard, []).append((task.start, task.count, task.id, kept))
        job.resolved[shard] += task.count
        job.succeeded += task.count
        self.stats[wid].record(task.count, seconds)
        self.bar.advance(task.count)
        if plan.on_batch is not None:
            w = self.pool.workers[wid]
            plan.on_batch(BatchEvent(task.id, task.start, task.count, plan.devices[wid].label, wid, w.pid, seconds))

    def _failed(self, wid: int, task: Task, message: str, *, died: bool) -> None:
        job, plan = self.job, self.plan
        task.attempts += 1
        task.avoid = wid
        if task.count > 1 and (not died or task.attempts >= plan.max_attempts):
            # find the culprit: every sample alone, each with a fresh count of attempts
            singles = [make_task(plan, self._new_id(), task.start + k,
                               Chunk({n: v[k:k + 1] for n, v in task.batched.items()}, task.constant))
                       for k in range(task.count)]
            job.pending.extendleft(reversed(singles))
            return
        if task.attempts < plan.max_attempts:
            job.pending.appendleft(task)
            return
        shard = task.start // plan.shard_size
        for k in range(task.count):
            job.failed.setdefault(shard, {})[task.start + k] = message
        job.resolved[shard] += task.count
        self.bar.advance(task.count)
        failures = sum(len(f) for f in job.failed.values())
        if job.succeeded == 0 and failures >= SYSTEMIC:
            raise OnnxpipeError(f"the first {failures} samples all failed: {message}",
                                hint="check the model on one sample with `onnxpipe validate`")

    def _new_id(self) -> int:
        self._ids += 1
        return self._ids

    def _died(self, ev: Any) -> None:
        job, plan = self.job, self.plan
        lost = [job.inflight.pop(t) for t in ev.info.get("lost", []) if t in job.inflight]
        for task, _ in sorted(lost, key=lambda tw: -tw[0].start):
            if task.id == ev.task:
                self._failed(ev.wid, task, f"worker on {plan.devices[ev.wid].label} died ({ev.message})", died=True)
            else:
                job.pending.appendleft(task)  # only queued there: not its fault
        w = self.pool.workers[ev.wid]
        if w.restarts < plan.max_restarts:
            self.pool.restart(ev.wid)
            self.stats[ev.wid].restarts = w.restarts
        else:
            self.gone.add(ev.wid)
            if len(self.gone) == len(self.pool.workers):
                raise OnnxpipeError(f"every worker died (last: {plan.devices[ev.wid].label}, {ev.message})",
                                    hint="run one device with --batch-size 1 to find the cause")

    def _handle(self, ev: Any) -> None:
        job = self.job
        if ev.kind in ("ready", "placement"):
            if self.on_ready is not None:
                self.on_ready(ev)
        elif ev.kind == "start_failed":
            self.gone.add(ev.wid)
            if len(self.gone) == len(self.pool.workers):
                raise OnnxpipeError(f"no worker left: {self.plan.devices[ev.wid].label} failed to restart ({ev.message})",
                                    hint="check the devices with `onnxpipe providers`")
        elif ev.kind == "died":
            self._died(ev)
        elif ev.task in job.inflight:
            task, _ = job.inflight.pop(ev.task)
            if ev.kind == "done":
                self._done(ev.wid, task, ev.outputs, ev.seconds)
            else:
                self._failed(ev.wid, task, ev.message, died=False)

    # shards --------------------------------------------------------------------------------
    def _complete(self, k: int) -> bool:
        job = self.job
        closed = job.exhausted or k < job.stream_shard
        return closed and job.resolved[k] == job.dispatched[k]

    def _shard(self, k: int) -> Shard:
        job, size = self.job, self.plan.shard_size
        entries = sorted(job.results.pop(k, []))
        failed = job.failed.pop(k, {})
        count = job.dispatched.pop(k, 0)
        job.resolved.pop(k, None)
        indices = np.concatenate([np.arange(s, s + c, dtype=np.int64) for s, c, _, _ in entries]) if entries \
            else np.zeros(0, np.int64)
        outputs, per_batch = {}, {}
        for name in (entries[0][3] if entries else {}):
            arrays = [e[3][name] for e in entries]
            if all(axis for _, axis in arrays) and len({a.shape[1:] for a, _ in arrays}) == 1:
                outputs[name] = np.concatenate([a for a, _ in arrays])
            else:
                per_batch.update({f"{name}@{e[0]}": e[3][name][0] for e in entries})
        return Shard(k, k * size, count, indices, outputs, per_batch, failed)

    def shards(self) -> Iterator[Shard]:
        """Run until every sample is resolved, yielding complete shards in order."""
        job = self.job
        try:
            while True:
                self._fill()
                while True:
                    k = job.next_shard
                    if k in job.skip and (job.exhausted or k < job.stream_shard):
                        job.next_shard += 1
                        job.emitted = job.next_shard * self.plan.shard_size
                        continue
                    if job.dispatched[k] and self._complete(k):
                        shard = self._shard(k)
                        job.next_shard += 1
                        job.emitted = min(job.cut, job.next_shard * self.plan.shard_size)
                        yield shard
                        continue
                    break
                if job.exhausted and not job.pending and not job.inflight:
                    return
                for ev in self.pool.poll(0.5):
                    self._handle(ev)
        finally:
            if job.inflight:  # stopped early: let the workers finish what they hold, then forget it
                self._drain()

    def _drain(self) -> None:
        """Wait for the batches the workers still hold (their results are dropped); a pool that does
        not settle within 30 s is closed, so the next run starts a fresh one."""
        def busy() -> bool:
            return any(w.alive and w.inflight() for w in self.pool.workers)

        for _ in range(60):
            if not busy():
                break
            self.pool.poll(0.5)
        else:
            if self.on_stuck is not None:
                self.on_stuck()
        self.job.inflight.clear()
