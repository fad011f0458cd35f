"""Serving a split model: one device pool per stage, each batch handed from stage to stage on the event loop.

A folder written by ``onnxpipe split`` is served as one model. Each stage gets its own
:class:`~onnxpipe.serve.workers.DevicePool` loading only its part, on devices dealt round-robin
from ``--devices`` (stage ``k`` on device ``k``; with more devices than stages, stage ``k`` also
gets devices ``k + S``, ``k + 2S``, ...; with fewer, stages share them). A batch runs stage 0,
then, as soon as stage 1 has a free slot, stage 1, and so on: while stage 1 runs batch k, stage 0
already runs batch k+1. Tensors a later stage (or the client) needs are carried along on the
server's side, as ``pipeline.json``'s ``sends`` list them, so each stage receives only its inputs.

To the batcher and the HTTP routes a :class:`StagedPool` is a :class:`DevicePool`: the same
``submit`` future, capacity, readiness and restart accounting. A stage worker that dies is
restarted by its stage's pool; the batches it only held go back to that stage (they lose nothing
and did nothing wrong), the batch it was running fails with ``WorkerCrashed(running=True)`` so
the batcher's retry-alone rule finds a request that kills workers.

Example:
    >>> pool = StagedPool(PipelineSpec.load("split"), parse_devices("cpu:0,cpu:1"))  # doctest: +SKIP
    >>> pool.start(); pool.attach(asyncio.get_running_loop())  # doctest: +SKIP
    >>> outputs, seconds, device = await pool.submit({"x": x})  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from onnxpipe.core.errors import OnnxpipeError
from onnxpipe.partition.spec import PipelineSpec, carried
from onnxpipe.runtimes.cpu_pool import cpu_share
from onnxpipe.runtimes.providers import Device
from onnxpipe.serve.repository import ModelEntry
from onnxpipe.serve.workers import DevicePool, WorkerCrashed, WorkerError

log = logging.getLogger("onnxpipe.serve")

__all__ = ["StagedPool", "pool_for", "stage_devices"]


def stage_devices(devices: list[Device], stages: int) -> list[list[Device]]:
    """Deal ``devices`` round-robin over ``stages``: every stage gets at least one, none is left idle.

    Example:
        >>> [[d.label for d in s] for s in stage_devices([Device.parse(f"cpu:{i}") for i in range(3)], 2)]
        [['cpu:0', 'cpu:2'], ['cpu:1']]
    """
    if not devices:
        raise OnnxpipeError("no devices to serve the pipeline on", hint="give --devices, e.g. cpu:0,cpu:1")
    if len(devices) >= stages:
        return [devices[k::stages] for k in range(stages)]
    return [[devices[k % len(devices)]] for k in range(stages)]


def _with_threads(groups: list[list[Device]]) -> list[list[Device]]:
    # each stage's DevicePool would give its CPU workers the machine's cores as if it were alone;
    # the stages run at once, so the cores are shared over every stage's workers
    workers = sum(len(g) for g in groups)
    share = cpu_share(workers, reserve=1)
    return [[Device.parse(d, threads=share) if d.kind == "cpu" and not d.options.threads else d for d in g]
            for g in groups]


class StagedPool:
    """The stage workers of one split model, used like a :class:`DevicePool`.

    Args:
        spec: the split model (:meth:`PipelineSpec.load`).
        devices: dealt over the stages by :func:`stage_devices`.
        depth: batches each stage worker holds at once.
        max_restarts: restarts per worker before its device is given up.
        on_event: called with ``(kind, "stage<k>/<device>", detail)`` for ``restart`` and ``gone``.

    Example:
        >>> pool = StagedPool(PipelineSpec.load("split"), [Device.parse("cpu:0"), Device.parse("cpu:1")])  # doctest: +SKIP
        >>> [s.devices[0].label for s in pool.stages]  # doctest: +SKIP
        ['cpu:0', 'cpu:1']
    """

    def __init__(self, spec: PipelineSpec, devices: list[Device], *, depth: int = 2, max_restarts: int = 5,
                 restart_window_s: float = 60.0, on_event: Callable[[str, str, str], None] | None = None) -> None:
        self.spec = spec
        self.parts = spec.parts
        self.max_restarts = max_restarts
        self.on_event = on_event or (lambda kind, device, detail: None)
        groups = _with_threads(stage_devices(devices, len(self.parts)))
        self.stages = [DevicePool(spec.part_path(k), g, depth=depth, max_restarts=max_restarts,
                                  restart_window_s=restart_window_s, on_event=self._stage_event(k)) for k, g in enumerate(groups)]
        self.devices = [d for g in groups for d in g]
        names = [i["name"] for i in spec.inputs]
        self.outputs = spec.output_names
        self._keep = [set(carried(self.parts, self.outputs, k, names)) for k in range(len(self.parts))]
        # room for every stage worker's slots: enough batches in flight that no stage waits for work
        self.limit = sum(depth * len(g) for g in groups)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._capacity: asyncio.Event | None = None
        self._flows: set[asyncio.Task] = set()
        self._busy = [0] * len(self.parts)  # batches each stage holds now
        self.peak_busy_stages = 0  # most stages that held a batch at one moment (2+: the pipeline overlapped)

    def _stage_event(self, k: int) -> Callable[[str, str, str], None]:
        def on_event(kind: str, device: str, detail: str) -> None:
            self.on_event(kind, f"stage{k}/{device}", detail)
            self._update_capacity()  # a stage given up: waiting batches must hear that nothing is left
        return on_event

    # lifecycle -----------------------------------------------------------------------------
    def launch(self) -> None:
        """Start every stage's workers (they load their parts at once)."""
        for stage in self.stages:
            stage.launch()

    def wait_ready(self, timeout: float = 900.0) -> None:
        """Block until every stage has its sessions open; raise naming the stage that failed."""
        deadline = time.monotonic() + timeout
        for k, stage in enumerate(self.stages):
            try:
                stage.wait_ready(max(1.0, deadline - time.monotonic()))
            except OnnxpipeError as exc:
                raise OnnxpipeError(f"stage {k} ({self.parts[k].file}): {exc.message}", hint=exc.hint) from None

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let ``loop`` watch every stage; call from the loop's thread before the first submit."""
        self.loop = loop
        self._capacity = asyncio.Event()
        for stage in self.stages:
            stage.attach(loop)
        self._update_capacity()

    def close(self, grace: float = 5.0) -> None:
        for task in list(self._flows):
            task.cancel()
        self._flows.clear()
        deadline = time.monotonic() + grace
        for stage in self.stages:
            stage.close(max(0.0, deadline - time.monotonic()))

    # state ---------------------------------------------------------------------------------
    def free_slots(self) -> int:
        return max(0, self.limit - len(self._flows)) if self.alive() else 0

    def ready_workers(self) -> int:
        """Complete pipelines that can run now: the fewest ready workers of any stage."""
        return min(stage.ready_workers() for stage in self.stages)

    def alive(self) -> bool:
        """Whether every stage has a worker running or restarting (one stage gone stops the pipeline)."""
        return all(stage.alive() for stage in self.stages)

    def restarts(self) -> int:
        return sum(stage.restarts() for stage in self.stages)

    def retry_after(self) -> float | None:
        """Seconds until every stage has a worker again; None when some stage will not."""
        waits = [stage.retry_after() for stage in self.stages]
        return None if any(w is None for w in waits) else max(waits, default=0.0)

    def held(self) -> list[int]:
        """Batches each stage holds now (running or queued on its workers)."""
        return list(self._busy)

    async def wait_capacity(self) -> None:
        """Return once another batch may enter the pipeline, or a stage is gone."""
        assert self._capacity is not None, "attach() the pool to the loop first"
        while self.free_slots() == 0 and self.alive():
            self._capacity.clear()
            await self._capacity.wait()

    def _update_capacity(self) -> None:
        if self._capacity is not None and (self.free_slots() > 0 or not self.alive()):
            self._capacity.set()

    # running -------------------------------------------------------------------------------
    def submit(self, feeds: dict[str, np.ndarray]) -> asyncio.Future:
        """Send ``feeds`` through every stage; the future gives ``(outputs, seconds, devices)``.

        ``seconds`` is the compute time summed over the stages and ``devices`` the stage devices
        that ran the batch, joined by ``>``.
        """
        assert self.loop is not None, "attach() the pool to the loop first"
        if not self.alive():
            raise WorkerCrashed("a stage of the pipeline has no device worker left", running=False)
        fut = self.loop.create_future()
        # counted now, not when the task first runs: the batcher's next wait_capacity() must see it
        task = self.loop.create_task(self._flow(dict(feeds), fut))
        self._flows.add(task)
        task.add_done_callback(self._flow_done)
        return fut

    def _flow_done(self, task: asyncio.Task) -> None:
        self._flows.discard(task)
        self._update_capacity()

    async def _flow(self, values: dict[str, np.ndarray], fut: asyncio.Future) -> None:
        seconds, labels = 0.0, []
        try:
            for k, part in enumerate(self.parts):
                outputs, took, label = await self._run_stage(k, {t: values[t] for t in part.inputs})
                seconds += took
                labels.append(label)
                values.update(outputs)
                values = {t: v for t, v in values.items() if t in self._keep[k]}
            result = ({t: values[t] for t in self.outputs}, seconds, ">".join(labels))
        except asyncio.CancelledError:
            if not fut.done():
                fut.set_exception(WorkerCrashed("the server is shutting down", running=False))
            raise
        except (WorkerError, WorkerCrashed) as exc:  # the batcher retries or answers these
            if not fut.done():  # the batcher's task may have been cancelled, and this future with it
                fut.set_exception(exc)
            return
        except Exception as exc:  # a bug here must still answer the request, not leave it hanging
            log.exception("a batch failed between the stages of %s", self.spec.folder)
            if not fut.done():
                fut.set_exception(WorkerError(f"internal error between stages: {type(exc).__name__}: {exc}"))
            return
        if not fut.done():
            fut.set_result(result)

    async def _run_stage(self, k: int, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float, str]:
        stage = self.stages[k]
        for attempt in range(self.max_restarts + 2):
            await stage.wait_capacity()
            if not stage.alive():
                raise WorkerCrashed(f"stage {k} ({self.parts[k].file}) has no device worker left", running=False)
            self._enter(k)
            try:
                return await stage.submit(feeds)
            except WorkerError as exc:
                raise WorkerError(f"stage {k} ({self.parts[k].file}): {exc}") from None
            except WorkerCrashed as exc:
                if exc.running or attempt > self.max_restarts:
                    raise WorkerCrashed(f"stage {k}: {exc}", exc.running) from None
                # only queued on the worker that died: run it again at this stage, earlier stages' work kept
                log.info("stage %d: re-running a batch its dead worker held", k)
            finally:
                self._busy[k] -= 1
        raise AssertionError("unreachable")

    def _enter(self, k: int) -> None:
        self._busy[k] += 1
        self.peak_busy_stages = max(self.peak_busy_stages, sum(1 for b in self._busy if b))

    # introspection -------------------------------------------------------------------------
    def pids(self) -> list[int | None]:
        """Process ids of every stage's workers, stage by stage (tests kill one to see it recover)."""
        return [pid for stage in self.stages for pid in stage.pids()]

    def info(self) -> list[dict[str, Any]]:
        return [{**w, "stage": k, "part": self.parts[k].file} for k, stage in enumerate(self.stages) for w in stage.info()]


def pool_for(entry: ModelEntry, devices: list[Device], **options: Any) -> DevicePool | StagedPool:
    """The pool serving ``entry``: a :class:`StagedPool` for a split model, else a :class:`DevicePool`.

    Example:
        >>> pool_for(ModelEntry.load("m.onnx", "m"), [Device.parse("cpu")])  # doctest: +SKIP
        <onnxpipe.serve.workers.DevicePool object at ...>
    """
    if entry.pipeline is not None:
        return StagedPool(entry.pipeline, devices, **options)
    return DevicePool(entry.path, devices, **options)
