"""The batch runner: micro-batches over one worker per device, outputs in input order, nothing lost.

The dispatcher (this process) reads the input lazily, cuts micro-batches that never cross a
shard boundary, and gives each to the fastest worker with a free slot: a worker holds at most
``depth`` batches, so faster devices come back for more sooner and get more (load balancing by
pull, ties going to the best measured speed), and no more than a window of samples is ever in
flight or waiting to be written (memory does not grow with the dataset).

Failures: a batch that raises is split into single samples to find the culprit; a sample that
fails ``max_attempts`` times is reported by index and left out. A worker that dies is restarted
(up to ``max_restarts`` times); the batch it was running counts as an attempt and goes to
another worker, the ones only queued on it go back unharmed.

Example:
    >>> with BatchRunner("model.onnx", ["cpu:0", "cpu:1"], batch_size=32) as runner:  # doctest: +SKIP
    ...     result = runner.run("inputs.npz", outdir="out")
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpipe.core.errors import InputError, OnnxpipeError
from onnxpipe.core.files import file_digest
from onnxpipe.core.modelio import load_model, save_model
from onnxpipe.core.sources import Source, first_chunk, open_source
from onnxpipe.core.tensors import graph_inputs, value_infos
from onnxpipe.runtimes.batch_result import (
    BatchEvent,
    DeviceStats,
    FailedSample,
    InferResult,
    SamplesFailedError,
)
from onnxpipe.runtimes.cpu_pool import cpu_share
from onnxpipe.runtimes.dispatch import Dispatcher, Plan
from onnxpipe.runtimes.manifest import ShardWriter
from onnxpipe.runtimes.providers import Device, parse_devices

__all__ = ["BatchRunner", "SamplesFailedError"]

SHARD_BYTES = 64 << 20  # inputs per shard by default


class BatchRunner:
    """Run a model over many samples on several devices, locally or on Ray.

    Args:
        model: an ``.onnx`` path or a ``ModelProto``.
        devices: device specs (``["cpu:0", "cpu:1"]``, ``"cuda:0,cuda:1"``, :class:`Device`).
        batch_size: samples per micro-batch (forced to the model's batch when its batch dim is fixed).
        shard_size: samples per output shard (default: ~64 MiB of inputs, a multiple of ``batch_size``).
        backend: ``local`` (one process per device) or ``ray`` (one actor per device).
        address: Ray cluster address (``auto``, ``ray://host:10001``); None starts a local Ray.
        depth: micro-batches a worker holds at once.
        max_attempts: tries per sample before it is reported failed.
        max_restarts: restarts per worker before its device is given up.
        on_batch: called in the dispatcher after every finished micro-batch (tests, custom logging).

    Example:
        >>> runner = BatchRunner("model.onnx", devices=["cpu:0", "cpu:1"])  # doctest: +SKIP
        >>> runner.run({"x": x}).outputs["y"]  # doctest: +SKIP
    """

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, devices: Any = ("cpu",), *,
                 batch_size: int = 32, shard_size: int | None = None, backend: str = "local",
                 address: str | None = None, depth: int = 2, max_attempts: int = 2, max_restarts: int = 3,
                 on_batch: Callable[[BatchEvent], None] | None = None) -> None:
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, received {batch_size}", hint="use e.g. --batch-size 32")
        if backend not in ("local", "ray"):
            raise InputError(f"unknown backend {backend!r}", hint="use local or ray")
        self.devices: list[Device] = parse_devices(devices)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.model_path, proto = self._open_model(model)
        self.inputs = graph_inputs(proto)
        self.notes: list[str] = []
        ranked = [i for i in self.inputs if i.shape]  # scalars have no batch axis to fix
        fixed = {i.shape[0] if isinstance(i.shape[0], int) and i.shape[0] > 0 else None for i in ranked}
        self.fixed_batch = fixed.pop() if len(fixed) == 1 else None
        if self.fixed_batch is not None and batch_size != self.fixed_batch:
            self.notes.append(f"the model's batch dim is fixed at {self.fixed_batch}: micro-batches of {self.fixed_batch}")
            batch_size = self.fixed_batch
        self.batch_size = batch_size
        self.shard_size = shard_size or self._default_shard(batch_size)
        if self.shard_size < 1:
            raise InputError(f"shard size must be >= 1, received {shard_size}", hint="use e.g. --shard-size 4096")
        # an output whose declared first dim is a fixed number other than the batch has no sample axis
        self.no_axis = {o.name for o in value_infos(proto.graph.output)
                         if o.shape is not None and (not o.shape or (isinstance(o.shape[0], int) and o.shape[0] > 0
                                                                     and o.shape[0] != self.fixed_batch))}
        self.backend, self.address, self.depth = backend, address, depth
        self.max_attempts, self.max_restarts, self.on_batch = max(1, max_attempts), max_restarts, on_batch
        share = cpu_share(len(self.devices))
        self.threads = [d.options.threads or share for d in self.devices]
        self._pool: Any = None
        self.stats: list[DeviceStats] = []

    def _open_model(self, model: str | os.PathLike | onnx.ModelProto) -> tuple[str, onnx.ModelProto]:
        """The path the workers load and a proto whose graph inputs and outputs are the job's
        interface (weights not loaded); a subclass may run something other than one file."""
        if isinstance(model, onnx.ModelProto):
            self._tmp = tempfile.TemporaryDirectory(prefix="onnxpipe-infer-")
            return str(save_model(model, Path(self._tmp.name) / "model.onnx")), model
        return str(model), load_model(model, load_external_data=False)

    def _default_shard(self, batch_size: int) -> int:
        """About 64 MiB of inputs per shard (so the window in flight stays a few hundred MiB),
        between one batch and 16384 samples, a multiple of the batch size."""
        sample = 0
        for info in self.inputs:
            dims = [d if isinstance(d, int) and d > 0 else 1 for d in (info.shape or [1])[1:]]
            sample += math.prod(dims) * (info.dtype.itemsize or 8)
        samples = SHARD_BYTES // max(1, sample)
        return batch_size * max(1, min(16384, samples) // batch_size)

    # lifecycle -----------------------------------------------------------------------------
    def start(self, pool: Any = None) -> BatchRunner:
        """Start the workers and wait until each has its session open (load time is recorded).

        ``pool`` replaces the backend's pool by any object with :class:`LocalPool`'s interface
        (``workers``, ``start``, ``submit``, ``poll``, ``restart``, ``close``): another backend,
        or a simulated one in tests.
        """
        if self._pool is not None:
            return self
        if pool is not None:
            pass
        elif self.backend == "ray":
            from onnxpipe.runtimes.ray_backend import RayPool

            pool = RayPool(self.model_path, self.devices, self.threads, address=self.address, depth=self.depth)
        else:
            from onnxpipe.runtimes.worker import LocalPool

            for d in self.devices:  # a missing provider is named here, before any process starts
                d.check_available()
            pool = LocalPool(self.model_path, self.devices, self.threads, self._pins(), depth=self.depth)
        self._pool = pool
        self.stats = [DeviceStats(d.label, str(d), t) for d, t in zip(self.devices, self.threads)]
        try:
            pool.start()
            waiting = set(range(len(self.devices)))
            deadline = time.monotonic() + 900  # TensorRT may build engines at session creation
            while waiting:
                if time.monotonic() > deadline:
                    raise OnnxpipeError("workers did not start within 15 minutes", hint="check the devices")
                for ev in pool.poll(0.5):
                    if ev.kind == "start_failed":
                        raise OnnxpipeError(f"{self.devices[ev.wid].label}: {ev.message}",
                                            hint="check the device with `onnxpipe providers`")
                    if ev.kind == "died":
                        raise OnnxpipeError(f"{self.devices[ev.wid].label}: the worker died while starting ({ev.message})",
                                            hint="run with one device to see its error")
                    if ev.kind in ("ready", "placement"):
                        self._ready(ev)
                        waiting.discard(ev.wid)
        except BaseException:
            self.close()
            raise
        return self

    @property
    def pool(self) -> Any:
        """The started pool of workers (None before :meth:`start` and after :meth:`close`)."""
        return self._pool

    def plan(self) -> Plan:
        """The dispatcher's view of this runner, read when a run starts (``on_batch`` may change between runs)."""
        return Plan(self.devices, self.inputs, self.batch_size, self.shard_size, self.fixed_batch,
                    frozenset(self.no_axis), self.depth, self.max_attempts, self.max_restarts, self.on_batch)

    def dispatcher(self, source: Source, bar: Any, *, skip: set[int] | frozenset[int] = frozenset()) -> Dispatcher:
        """The event loop for one run over ``source`` on the started pool (a subclass may route differently)."""
        return Dispatcher(self._pool, source, self.plan(), self.stats, bar, skip=skip,
                          on_ready=self._ready, on_stuck=self.close)

    def _ready(self, ev: Any) -> None:
        s = self.stats[ev.wid]
        s.load_s = ev.info.get("load_s", s.load_s)
        s.placement = ev.info.get("placement") or s.placement

    def _pins(self) -> list[list[int] | None]:
        allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        pins, at = [], 0
        for d, t in zip(self.devices, self.threads):
            if d.kind == "cpu" and d.options.pin:
                pins.append([allowed[(at + k) % len(allowed)] for k in range(t)])
                at += t
            else:
                pins.append(None)
        return pins

    def close(self) -> None:
        """Stop the workers and remove temporary files."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> BatchRunner:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # running -------------------------------------------------------------------------------
    def run(self, inputs: Any, outdir: str | os.PathLike | None = None, *, resume: bool = False,
            progress: bool = False) -> InferResult:
        """Run every sample; outputs in memory, or as shards and a manifest in ``outdir``.

        Samples that failed on every attempt are listed in ``result.failed`` (and the manifest);
        the ``infer`` command then exits 1.

        Args:
            inputs: a ``.npz``, a folder, ``file.py:function``, a dict of arrays or an iterable of them.
            outdir: write shards and ``manifest.json`` there instead of keeping outputs in memory.
            resume: continue the job in ``outdir``, skipping the shards its manifest lists.
            progress: draw a progress bar on stderr.

        Raises:
            InputError: inputs that do not fit the model, an ``outdir`` holding another job.
            OnnxpipeError: no worker left, or every sample failing from the start.
        """
        from onnxpipe.runtimes.progress import job_progress

        source = open_source(inputs, self.inputs)
        if source.total == 0:
            raise InputError(f"{source.description} holds no samples", hint="give data with at least one sample")
        if isinstance(inputs, (str, os.PathLike, Mapping)):  # read again from the start: a one-shot iterable is not
            self._precheck(source)
        writer = None
        if outdir is not None:
            from onnxpipe.runtimes.manifest import data_digest

            meta = {"model": self.model_path, "model_sha256": file_digest(self.model_path),
                    "data_sha256": data_digest(inputs),
                    "shard_size": self.shard_size, "batch_size": self.batch_size,
                    "inputs": [[i.name, str(i.dtype)] for i in self.inputs], "source": source.description}
            writer = ShardWriter(outdir, meta, resume=resume)
        started_here = self._pool is None
        self.start()
        for s in self.stats:
            s.samples = s.batches = 0
            s.busy_s = 0.0
        parts: dict[str, list[np.ndarray]] = {}
        per_batch: dict[str, np.ndarray] = {}
        indices: list[np.ndarray] = []
        failed: dict[int, str] = dict(writer.failed) if writer else {}
        t0 = time.perf_counter()
        try:
            done = sum(s["count"] for s in writer.shards.values()) if writer else 0
            with job_progress(progress, source.total, done=done) as bar:
                dispatcher = self.dispatcher(source, bar, skip=writer.done if writer else set())
                job = dispatcher.job
                for shard in dispatcher.shards():
                    failed.update(shard.failed)
                    if writer is not None:
                        writer.write(shard)
                        continue
                    indices.append(shard.indices)
                    for k, v in shard.outputs.items():
                        parts.setdefault(k, []).append(v)
                    per_batch.update(shard.per_batch)
        finally:
            for wid, w in enumerate(self._pool.workers if self._pool else []):
                self.stats[wid].restarts = w.restarts
            if started_here:
                self.close()
        seconds = time.perf_counter() - t0
        if job.cut == 0:
            raise InputError(f"{source.description} holds no samples", hint="give data with at least one sample")
        result = InferResult(samples=job.cut, computed=job.cut - job.skipped, skipped=job.skipped, seconds=seconds,
                             devices=list(self.stats), failed=[FailedSample(i, e) for i, e in sorted(failed.items())],
                             outdir=Path(outdir) if outdir is not None else None, backend=self.backend,
                             notes=list(self.notes))
        for d, st in zip(self.devices, self.stats):
            counts = (st.placement or {}).get("counts", {})
            on_cpu = counts.get("CPUExecutionProvider", 0)
            if d.is_gpu and on_cpu:
                ops = ", ".join(dict.fromkeys(st.placement.get("cpu_nodes", [])))
                result.notes.append(f"{d.label}: {on_cpu} of {sum(counts.values())} nodes run on CPU ({ops})")
        if writer is not None:
            writer.save(complete=True, extra={"devices": [d.as_dict(seconds) for d in self.stats],
                                              "seconds": seconds, "backend": self.backend})
        else:
            ragged = [k for k, v in parts.items() if len(v) != len(indices) or len({a.shape[1:] for a in v}) > 1]
            result.outputs = {k: np.concatenate(v) for k, v in parts.items() if k not in ragged}
            result.indices = np.concatenate(indices) if indices else np.zeros(0, np.int64)
            result.per_batch = per_batch
            if ragged:
                result.notes.append(f"outputs {', '.join(ragged)} change shape between shards: see per_batch")
        return result

    def check_data(self, inputs: Any) -> None:
        """Read the first chunk of ``inputs`` and check it against the model, before any worker starts:
        data that cannot be read or does not fit fails in a moment, naming the data.

        Example:
            >>> BatchRunner("m.onnx").check_data("inputs.npz")  # doctest: +SKIP
        """
        source = open_source(inputs, self.inputs)
        if source.total == 0:
            raise InputError(f"{source.description} holds no samples", hint="give data with at least one sample")
        self._precheck(source)

    def _precheck(self, source: Source) -> None:
        """Read the first chunk before any worker starts: data that cannot be read or does not fit the
        model fails in a moment, naming the data, and no output folder is created."""
        first_chunk(source, self.inputs, source.description)



