"""What a batch-runner job did: per-device throughput, failed samples, and the outputs or their folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from onnxpipe.core.errors import OnnxpipeError


class SamplesFailedError(OnnxpipeError):
    """Some samples failed on every attempt; the others were written. Exits with code 1."""

    exit_code = 1


@dataclass
class FailedSample:
    """A sample that failed ``attempts`` times, by its position in the input."""

    index: int
    error: str


@dataclass
class BatchEvent:
    """One finished micro-batch, as the ``on_batch`` hook sees it."""

    task: int
    start: int
    count: int
    device: str
    worker: int
    pid: int | None
    seconds: float


@dataclass
class DeviceStats:
    """One worker's share of a job."""

    device: str
    spec: str
    threads: int | None = None
    samples: int = 0
    batches: int = 0
    busy_s: float = 0.0
    restarts: int = 0
    load_s: float | None = None
    placement: dict[str, Any] | None = None
    speed: float | None = None  # samples per busy second, smoothed: the dispatcher's load balance

    def record(self, count: int, seconds: float) -> None:
        self.samples += count
        self.batches += 1
        self.busy_s += seconds
        rate = count / seconds if seconds > 0 else None
        if rate is not None:
            self.speed = rate if self.speed is None else 0.7 * self.speed + 0.3 * rate

    def as_dict(self, wall: float) -> dict[str, Any]:
        return {"device": self.device, "spec": self.spec, "threads": self.threads, "samples": self.samples,
                "batches": self.batches, "busy_s": self.busy_s, "samples_per_s": self.samples / wall if wall else 0.0,
                "utilisation": self.busy_s / wall if wall else 0.0, "restarts": self.restarts,
                "load_s": self.load_s, "placement": self.placement}


@dataclass
class InferResult:
    """The outcome of :meth:`BatchRunner.run`.

    In memory (no ``outdir``): ``outputs`` holds every batched output concatenated in input
    order and ``indices`` the samples they belong to (failed samples are absent); outputs with
    no sample axis are in ``per_batch`` as ``<name>@<first sample>``. With an ``outdir`` they are
    in its shards (read them back with :func:`onnxpipe.runtimes.manifest.load_outputs`).

    Example:
        >>> result = BatchRunner("m.onnx", ["cpu:0", "cpu:1"]).run({"x": x})  # doctest: +SKIP
        >>> result.outputs["y"].shape, result.throughput  # doctest: +SKIP
        ((10000, 10), 15234.1)
    """

    samples: int
    computed: int
    skipped: int
    seconds: float
    devices: list[DeviceStats]
    failed: list[FailedSample] = field(default_factory=list)
    outputs: dict[str, np.ndarray] | None = None
    indices: np.ndarray | None = None
    per_batch: dict[str, np.ndarray] = field(default_factory=dict)
    outdir: Path | None = None
    backend: str = "local"
    notes: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Samples computed per second of wall time."""
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "computed": self.computed, "skipped_finished": self.skipped,
                "seconds": self.seconds, "samples_per_s": self.throughput, "backend": self.backend,
                "outdir": str(self.outdir) if self.outdir else None,
                "failed": [{"index": f.index, "error": f.error} for f in self.failed],
                "devices": [d.as_dict(self.seconds) for d in self.devices], "notes": self.notes}

    def table(self) -> Table:
        """Per-device throughput, share, utilisation, restarts and node placement."""
        t = Table(title=f"{self.computed} samples in {self.seconds:.2f} s: {self.throughput:,.0f} samples/s "
                        f"({self.backend})" + (f", {self.skipped} already done" if self.skipped else ""))
        for col in ("device", "thr", "batches", "samples", "share", "per s", "busy", "restarts", "load s", "nodes"):
            t.add_column(col, justify="left" if col in ("device", "nodes") else "right")
        total = max(1, sum(d.samples for d in self.devices))
        for d in self.devices:
            placed = ""
            if d.placement:
                placed = ", ".join(f"{p.replace('ExecutionProvider', '').lower()} {n}"
                                   for p, n in d.placement["counts"].items())
            t.add_row(d.device, str(d.threads or "-"), str(d.batches), str(d.samples), f"{d.samples / total:.0%}",
                      f"{d.samples / self.seconds:,.0f}" if self.seconds else "-",
                      f"{d.busy_s / self.seconds:.0%}" if self.seconds else "-", str(d.restarts),
                      f"{d.load_s:.2f}" if d.load_s is not None else "-", placed)
        return t
