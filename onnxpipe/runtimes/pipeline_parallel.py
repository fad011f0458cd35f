"""Pipeline-parallel inference: one stage of a split model per device, micro-batches flowing stage to stage.

It is the batch runner with one worker per stage instead of one per copy of the model: the
same worker processes (or Ray actors), shared-memory transport, input reading, shards,
manifest and ``--resume``. Only the dispatching differs. A micro-batch enters stage 0 and,
when a stage returns it, waits for the next stage's worker; every worker holds ``depth``
micro-batches and at most ``stages x depth + 1`` are in the pipeline at once (the bounded
queues), so stage 1 works on batch k while stage 0 works on batch k+1. Tensors a later stage
(or the caller) needs are carried along by the dispatcher, so a stage receives only its inputs.

Crash recovery is the runner's: a stage worker that dies is restarted and the micro-batches it
held go back to that same stage, from the tensors the dispatcher kept for them; a batch that
keeps failing is split into single samples, which start again from stage 0.

Example:
    >>> with PipelineRunner("split", ["cpu:0", "cpu:1"], batch_size=8) as runner:  # doctest: +SKIP
    ...     result = runner.run("inputs.npz", outdir="out")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from rich.table import Table

from onnxpipe.core.errors import InputError, OnnxpipeError
from onnxpipe.core.sources import Source
from onnxpipe.partition.spec import PartSpec, PipelineSpec, carried
from onnxpipe.runtimes.batch import BatchRunner
from onnxpipe.runtimes.batch_result import BatchEvent, InferResult
from onnxpipe.runtimes.dispatch import Dispatcher, Task
from onnxpipe.runtimes.providers import parse_devices

__all__ = ["PipelineResult", "PipelineRunner"]


@dataclass
class PipelineResult(InferResult):
    """:class:`InferResult` of a pipeline: ``devices`` are its stages, in order.

    Example:
        >>> result.bubble  # doctest: +SKIP
        0.08
    """

    parts: list[PartSpec] = field(default_factory=list)

    @property
    def bubble(self) -> float:
        """Fraction of the stages' time spent idle (1 - mean busy time / wall time)."""
        if not self.devices or self.seconds <= 0:
            return 0.0
        return max(0.0, 1.0 - sum(d.busy_s for d in self.devices) / (len(self.devices) * self.seconds))

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "pipeline": {"bubble": self.bubble,
                                                  "parts": [p.file for p in self.parts]}}

    def table(self) -> Table:
        """Per stage: its part, device, busy time and share of the wall time; the bubble in the title."""
        t = Table(title=f"{self.computed} samples in {self.seconds:.2f} s: {self.throughput:,.0f} samples/s, "
                        f"{len(self.devices)} stages ({self.backend}), bubble {self.bubble:.0%}"
                        + (f", {self.skipped} already done" if self.skipped else ""))
        for col in ("stage", "part", "device", "thr", "batches", "busy s", "busy", "idle", "restarts", "load s"):
            t.add_column(col, justify="left" if col in ("part", "device") else "right")
        for k, d in enumerate(self.devices):
            busy = d.busy_s / self.seconds if self.seconds else 0.0
            t.add_row(str(k), self.parts[k].file if k < len(self.parts) else "-", d.device, str(d.threads or "-"),
                      str(d.batches), f"{d.busy_s:.2f}", f"{busy:.0%}", f"{max(0.0, 1 - busy):.0%}", str(d.restarts),
                      f"{d.load_s:.2f}" if d.load_s is not None else "-")
        return t


def interface(spec: PipelineSpec) -> onnx.ModelProto:
    """A node-less proto declaring the whole model's inputs and outputs (what the runner reads of a model)."""
    def vi(entry: dict[str, Any]) -> onnx.ValueInfoProto:
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(entry["dtype"])) if entry["dtype"] != "object" else 0
        return onnx.helper.make_tensor_value_info(entry["name"], elem, entry["shape"])

    graph = onnx.helper.make_graph([], "pipeline", [vi(e) for e in spec.inputs], [vi(e) for e in spec.outputs])
    return onnx.helper.make_model(graph)


@dataclass
class _Flow:
    """Where a micro-batch is: the stage it waits for or runs on, and the tensors carried with it."""

    stage: int
    values: dict[str, np.ndarray]


class PipelineDispatcher(Dispatcher):
    """The runner's dispatcher, moving each micro-batch through the stages in order."""

    def __init__(self, spec: PipelineSpec, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parts = spec.parts
        self.outputs = spec.output_names
        names = [i["name"] for i in spec.inputs]
        self.keep = [set(carried(self.parts, self.outputs, k, names)) for k in range(len(self.parts))]
        self.capacity = len(self.parts) * self.plan.depth + 1
        self.flow: dict[int, _Flow] = {}

    def _flow(self, task: Task) -> _Flow:
        if task.id not in self.flow:
            self.flow[task.id] = _Flow(0, task.feeds())
        return self.flow[task.id]

    def _submit(self, stage: int, task: Task) -> None:
        values = self._flow(task).values
        self.job.inflight[task.id] = (task, stage)
        self.pool.submit(stage, task.id, {t: values[t] for t in self.parts[stage].inputs})

    def _fill(self) -> None:
        job, workers = self.job, self.pool.workers
        # handed-over and retried batches first: later stages first, then input order
        for task in sorted(job.pending, key=lambda t: (-self._flow(t).stage, t.start, t.id)):
            stage = self.flow[task.id].stage
            if workers[stage].free() > 0:
                job.pending.remove(task)
                self._submit(stage, task)
        while workers[0].free() > 0 and len(job.inflight) + len(job.pending) < self.capacity:
            if job.exhausted or job.cut - job.emitted >= self.window:
                return
            task = next(self.tasks, None)
            if task is None:
                job.exhausted = True
                return
            self._submit(0, task)

    def _done(self, wid: int, task: Task, outputs: dict[str, np.ndarray], seconds: float) -> None:
        flow = self.flow[task.id]
        flow.values.update(outputs)
        if flow.stage == len(self.parts) - 1:
            del self.flow[task.id]
            super()._done(wid, task, {t: flow.values[t] for t in self.outputs}, seconds)
            return
        flow.values = {t: v for t, v in flow.values.items() if t in self.keep[flow.stage]}
        flow.stage += 1
        plan = self.plan
        self.stats[wid].record(task.count, seconds)
        self.job.pending.append(task)
        if plan.on_batch is not None:
            w = self.pool.workers[wid]
            plan.on_batch(BatchEvent(task.id, task.start, task.count, plan.devices[wid].label, wid, w.pid, seconds))

    def _failed(self, wid: int, task: Task, message: str, *, died: bool) -> None:
        if not message.startswith("stage "):
            message = f"stage {wid} ({self.parts[wid].file}): {message}"
        super()._failed(wid, task, message, died=died)
        if not any(t is task for t in self.job.pending):  # split into samples (they restart at 0) or given up
            self.flow.pop(task.id, None)

    def _handle(self, ev: Any) -> None:
        super()._handle(ev)
        if ev.wid in self.gone:  # a pipeline without one of its stages cannot go on
            w = self.pool.workers[ev.wid]
            raise OnnxpipeError(f"stage {ev.wid} on {self.plan.devices[ev.wid].label} is gone after {w.restarts} "
                                f"restart(s) ({ev.message})", hint="run the part alone with `onnxpipe validate` "
                                f"{self.parts[ev.wid].file} to see why")


class PipelineRunner(BatchRunner):
    """Run a split model (a folder with ``pipeline.json``) with one stage per device.

    Args:
        folder: the folder written by ``onnxpipe split``.
        devices: one device per stage (``["cpu:0", "cpu:1"]``, ``"cuda:0,cuda:1"``); a single
            device is used for every stage.
        **options: as for :class:`BatchRunner` (batch_size, shard_size, backend, address, depth, ...).

    Raises:
        InputError: no pipeline in ``folder``, or a device count that is not the stage count.

    Example:
        >>> PipelineRunner("split", "cpu:0,cpu:1").run({"x": x}).outputs["y"]  # doctest: +SKIP
    """

    def __init__(self, folder: str | os.PathLike, devices: Any = ("cpu",), **options: Any) -> None:
        self.spec = PipelineSpec.load(folder)
        stages = len(self.spec.parts)
        parsed = parse_devices(devices)
        if len(parsed) == 1 and stages > 1:
            parsed = parsed * stages
        if len(parsed) != stages:
            raise InputError(f"the pipeline in {folder} has {stages} stages: expected {stages} devices, "
                             f"received {len(parsed)}", hint="give one device per stage, e.g. --devices "
                                                             + ",".join(f"cpu:{k}" for k in range(stages)))
        super().__init__(folder, parsed, **options)

    def _open_model(self, model: str | os.PathLike | onnx.ModelProto) -> tuple[str, onnx.ModelProto]:
        return str(self.spec.path), interface(self.spec)

    def start(self, pool: Any = None) -> PipelineRunner:
        """Start one worker per stage, each loading only its part."""
        if pool is None and self._pool is None:
            paths = [str(self.spec.part_path(k)) for k in range(len(self.spec.parts))]
            if self.backend == "ray":
                from onnxpipe.runtimes.ray_backend import RayPool

                pool = RayPool(paths, self.devices, self.threads, address=self.address, depth=self.depth, spread=True)
            else:
                from onnxpipe.runtimes.worker import LocalPool

                for d in self.devices:
                    d.check_available()
                pool = LocalPool(paths, self.devices, self.threads, self._pins(), depth=self.depth)
        super().start(pool)
        return self

    def __enter__(self) -> PipelineRunner:
        return self.start()

    def run(self, inputs: Any, outdir: str | os.PathLike | None = None, *, resume: bool = False,
            progress: bool = False) -> PipelineResult:
        """Stream every sample through the stages; see :meth:`BatchRunner.run`.

        Example:
            >>> runner.run({"x": x}).table()  # doctest: +SKIP
        """
        result = super().run(inputs, outdir, resume=resume, progress=progress)
        return PipelineResult(**vars(result), parts=list(self.spec.parts))

    def dispatcher(self, source: Source, bar: Any, *, skip: set[int] | frozenset[int] = frozenset()) -> Dispatcher:
        """The pipeline's event loop: each micro-batch moves through the stages in order."""
        return PipelineDispatcher(self.spec, self._pool, source, self.plan(), self.stats, bar, skip=skip,
                                  on_ready=self._ready, on_stuck=self.close)
