"""One model's device workers, driven from the server's asyncio loop: least-busy dispatch, restart on death.

The workers are the batch runner's (:class:`onnxpipe.runtimes.worker.LocalPool`: a process per
device, arrays through shared memory). Instead of a thread polling them, each worker's pipe and
exit sentinel are watched by the event loop, so a finished batch wakes the loop at once and an
idle server costs nothing. A worker that dies is restarted while the others keep serving; one that
dies more than ``max_restarts`` times within ``restart_window_s`` seconds is restarted only once the
oldest of those deaths leaves the window (meanwhile its requests get 503 with ``Retry-After``); the batches it held fail with :class:`WorkerCrashed`, which says whether
the batch was running (it may be what killed the worker) or only queued.

Example:
    >>> pool = DevicePool("m.onnx", parse_devices("cpu:0,cpu:1"))  # doctest: +SKIP
    >>> pool.start(); pool.attach(asyncio.get_running_loop())  # doctest: +SKIP
    >>> outputs, seconds, device = await pool.submit({"x": x})  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxpipe.core.errors import OnnxpipeError
from onnxpipe.runtimes.cpu_pool import cpu_share
from onnxpipe.runtimes.providers import Device

log = logging.getLogger("onnxpipe.serve")


class WorkerError(Exception):
    """The model raised on a batch (ONNX Runtime's message)."""


class WorkerCrashed(Exception):
    """The worker holding a batch died; ``running`` is True when the batch was the one it was running."""

    def __init__(self, message: str, running: bool) -> None:
        super().__init__(message)
        self.running = running


@dataclass
class _Job:
    future: asyncio.Future
    wid: int
    started: float


class DevicePool:
    """The device workers of one model.

    Args:
        model: path of the ``.onnx`` file.
        devices: one worker process per device.
        depth: batches a worker holds at once (one running, the rest waiting beside it).
        max_restarts: restarts per worker within ``restart_window_s``; past that the next restart waits.
        restart_window_s: the window the restarts are counted in (a crash loop is slowed, never final).
        on_event: called with ``(kind, device label, detail)`` for ``restart``, ``paused`` and ``gone``.

    Example:
        >>> DevicePool("m.onnx", [Device.parse("cpu")]).devices[0].label  # doctest: +SKIP
        'cpu:0'
    """

    def __init__(self, model: str | os.PathLike, devices: list[Device], *, depth: int = 2, max_restarts: int = 5,
                 restart_window_s: float = 60.0, on_event: Callable[[str, str, str], None] | None = None) -> None:
        from onnxpipe.runtimes.worker import LocalPool

        self.devices = devices
        # one core stays with the HTTP process: ORT's spinning intra-op threads on every core starve
        # the event loop that decodes requests, and throughput drops under load
        share = cpu_share(len(devices), reserve=1)
        threads = [d.options.threads or (share if d.kind == "cpu" else None) for d in devices]
        self.pool = LocalPool(str(model), devices, threads, [None] * len(devices), depth=depth)
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self._deaths = [collections.deque() for _ in devices]  # monotonic times of recent restarts, per worker
        self._pending: dict[int, asyncio.TimerHandle] = {}  # workers whose restart waits for the window
        self._gone: set[int] = set()  # workers whose restarted process cannot load the model
        self._closed = False
        self.on_event = on_event or (lambda kind, device, detail: None)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._jobs: dict[int, _Job] = {}
        self._ids = itertools.count()
        self._watched: dict[int, list[int]] = {}
        self._capacity: asyncio.Event | None = None
        self._speed = [0.0] * len(devices)  # recent seconds per batch: ties go to the faster worker

    # lifecycle -----------------------------------------------------------------------------
    def launch(self) -> None:
        """Start the worker processes (they load the model in the background)."""
        for d in self.devices:  # a missing provider is named here, before any process starts
            d.check_available()
        self.pool.start()

    def wait_ready(self, timeout: float = 900.0) -> None:
        """Block until every worker has its session open; raise naming the device that failed."""
        waiting = set(range(len(self.devices)))
        deadline = time.monotonic() + timeout  # TensorRT may build engines while the session opens
        while waiting:
            if time.monotonic() > deadline:
                raise OnnxpipeError(f"device workers did not start within {timeout:.0f} s", hint="check the devices")
            for ev in self.pool.poll(0.5):
                label = self.devices[ev.wid].label
                if ev.kind == "start_failed":
                    raise OnnxpipeError(f"{label}: {ev.message}", hint="check the device with `onnxpipe providers`")
                if ev.kind == "died":
                    raise OnnxpipeError(f"{label}: the worker died while loading the model ({ev.message})",
                                        hint="run `onnxpipe infer` with this device to see its error")
                if ev.kind == "ready":
                    waiting.discard(ev.wid)

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let ``loop`` watch the workers; call from the loop's thread before the first submit."""
        self.loop = loop
        self._capacity = asyncio.Event()
        for wid, w in enumerate(self.pool.workers):
            if w.alive:
                self._watch(wid)
        self._update_capacity()

    def close(self, grace: float = 5.0) -> None:
        self._closed = True
        for handle in self._pending.values():
            handle.cancel()
        self._pending.clear()
        for wid in list(self._watched):
            self._unwatch(wid)
        for job in self._jobs.values():
            if not job.future.done():
                job.future.set_exception(WorkerCrashed("the server is shutting down", running=False))
        self._jobs.clear()
        self.pool.close(grace)

    # state ---------------------------------------------------------------------------------
    def free_slots(self) -> int:
        return sum(w.free() for w in self.pool.workers if w.alive)

    def ready_workers(self) -> int:
        return sum(1 for w in self.pool.workers if w.alive and w.ready)

    def alive(self) -> bool:
        """Whether any worker is running or restarting (False: every device was given up)."""
        return any(w.alive for w in self.pool.workers)

    def restarts(self) -> int:
        return sum(w.restarts for w in self.pool.workers)

    def retry_after(self) -> float | None:
        """Seconds until a worker comes back when none is alive now; None when none will."""
        if self.alive():
            return 0.0
        if not self._pending or self.loop is None:
            return None
        now = self.loop.time()
        return max(1.0, min(h.when() for h in self._pending.values()) - now + 1.0)

    async def wait_capacity(self) -> None:
        """Return once a worker has a free slot, or no worker is left (the caller then fails its requests)."""
        assert self._capacity is not None, "attach() the pool to the loop first"
        while self.free_slots() == 0 and self.alive():
            self._capacity.clear()
            await self._capacity.wait()

    # running -------------------------------------------------------------------------------
    def submit(self, feeds: dict[str, np.ndarray]) -> asyncio.Future:
        """Run ``feeds`` on the least busy worker; the future gives ``(outputs, seconds, device label)``."""
        assert self.loop is not None, "attach() the pool to the loop first"
        candidates = [(len(w.inflight()), self._speed[wid], wid) for wid, w in enumerate(self.pool.workers)
                      if w.alive and w.free() > 0]
        if not candidates:
            raise WorkerCrashed("no device worker is free", running=False)
        wid = min(candidates)[2]
        task = next(self._ids)
        fut = self.loop.create_future()
        self._jobs[task] = _Job(fut, wid, time.perf_counter())
        self.pool.submit(wid, task, feeds)
        self._update_capacity()
        return fut

    def _watch(self, wid: int) -> None:
        w = self.pool.workers[wid]
        fds = [w.conn.fileno(), w.proc.sentinel]
        for fd in fds:
            self.loop.add_reader(fd, self._on_readable)
        self._watched[wid] = fds

    def _unwatch(self, wid: int) -> None:
        for fd in self._watched.pop(wid, []):
            if self.loop is not None:
                self.loop.remove_reader(fd)

    def _update_capacity(self) -> None:
        if self._capacity is not None and (self.free_slots() > 0 or not self.alive()):
            self._capacity.set()

    def _on_readable(self) -> None:
        for ev in self.pool.poll(0):
            label = self.devices[ev.wid].label
            if ev.kind == "done":
                job = self._jobs.pop(ev.task, None)
                self._speed[ev.wid] = 0.8 * self._speed[ev.wid] + 0.2 * ev.seconds
                if job is not None and not job.future.done():
                    job.future.set_result((ev.outputs, ev.seconds, label))
            elif ev.kind == "error":
                job = self._jobs.pop(ev.task, None)
                if job is not None and not job.future.done():
                    job.future.set_exception(WorkerError(ev.message))
            elif ev.kind == "died":
                self._died(ev.wid, ev.task, ev.message, ev.info.get("lost", []))
            elif ev.kind == "start_failed":
                self._unwatch(ev.wid)
                self._gone.add(ev.wid)
                log.error("%s: the restarted worker cannot load the model: %s", label, ev.message)
                self.on_event("gone", label, ev.message)
        self._update_capacity()

    def _died(self, wid: int, running: int, why: str, lost: list[int]) -> None:
        label = self.devices[wid].label
        self._unwatch(wid)
        for task in lost:
            job = self._jobs.pop(task, None)
            if job is not None and not job.future.done():
                was_running = task == running
                what = "running" if was_running else "holding"
                job.future.set_exception(WorkerCrashed(f"the {label} worker died ({why}) {what} this batch", was_running))
        if self._closed:
            return
        deaths = self._deaths[wid]
        now = time.monotonic()
        while deaths and now - deaths[0] > self.restart_window_s:
            deaths.popleft()
        if len(deaths) >= self.max_restarts:
            wait = self.restart_window_s - (now - deaths[0])
            log.error("%s: the worker died (%s) %d times in %.0f s; restarting it in %.0f s",
                      label, why, len(deaths) + 1, self.restart_window_s, wait)
            self.on_event("paused", label, why)
            self._pending[wid] = self.loop.call_later(wait, self._restart, wid, why)
            return
        log.warning("%s: the worker died (%s); restarting it", label, why)
        self._restart(wid, why)

    def _restart(self, wid: int, why: str) -> None:
        self._pending.pop(wid, None)
        if self._closed:
            return
        self._deaths[wid].append(time.monotonic())
        self.pool.restart(wid)
        self._watch(wid)
        self.on_event("restart", self.devices[wid].label, why)
        self._update_capacity()

    def pids(self) -> list[int | None]:
        """Process ids of the workers (tests kill one to see the pool recover)."""
        return [w.pid if w.alive else None for w in self.pool.workers]

    def info(self) -> list[dict[str, Any]]:
        return [{"device": str(d), "ready": w.ready, "alive": w.alive, "restarts": w.restarts}
                for d, w in zip(self.devices, self.pool.workers)]
