"""``onnxpipe bench``: latency percentiles, throughput and FLOP/s per device, thread count and batch
size, timed by the one timing loop (:mod:`onnxpipe.core.timing`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from rich.table import Table

from onnxpipe.core.errors import InputError, OnnxpipeError
from onnxpipe.core.timing import time_calls, time_session
from onnxpipe.runtimes.peak import Peak, cpu_peak

# the suite behind `onnxpipe bench` ---------------------------------------------------------------

@dataclass
class BenchRow:
    """One device x threads x batch size measurement (times in ms unless named ``_s``)."""

    device: str
    batch: int
    threads: int | None
    load_s: float = 0.0
    first_run_ms: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    runs: int = 0
    samples_per_s: float = 0.0
    flops: int = 0
    gflops: float | None = None
    peak_gflops: float | None = None
    peak_fraction: float | None = None  # of this machine's CPU peak
    threads_peak_fraction: float | None = None  # of the peak of the cores its threads can use
    engine_build_s: float | None = None
    placement: str | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchReport:
    """Every row, the CPU peak used for the fractions, and the model's FLOP count's caveats.

    Example:
        >>> report = bench("model.onnx", ["cpu"], batch_sizes=[1, 8])  # doctest: +SKIP
        >>> report.rows[0].p50_ms  # doctest: +SKIP
        0.42
    """

    model: str
    rows: list[BenchRow]
    peak: Peak
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"model": self.model, "cpu_peak": self.peak.as_dict(), "rows": [r.as_dict() for r in self.rows],
                "notes": self.notes}

    def table(self) -> Table:
        t = Table(title=f"bench {self.model} · CPU peak ~{self.peak.gflops:.0f} GFLOP/s ({self.peak.explain()})")
        for col in ("device", "threads", "batch", "load", "first run", "p50", "p90", "p99", "samples/s",
                    "GFLOP/s", "% peak", "nodes"):
            t.add_column(col, justify="left" if col in ("device", "nodes") else "right")
        for r in self.rows:
            if r.error:
                t.add_row(r.device, str(r.threads or "-"), str(r.batch), f"[red]{r.error}[/]", *[""] * 8)
                continue
            load = f"{r.load_s:.2f} s" + (f" (engine {r.engine_build_s:.1f} s)" if r.engine_build_s is not None else "")
            t.add_row(r.device, str(r.threads or "auto"), str(r.batch), load, f"{r.first_run_ms:.2f} ms",
                      f"{r.p50_ms:.3f} ms", f"{r.p90_ms:.3f} ms", f"{r.p99_ms:.3f} ms", f"{r.samples_per_s:,.0f}",
                      "-" if r.gflops is None else f"{r.gflops:.2f}",
                      "-" if r.peak_fraction is None else f"{r.peak_fraction:.1%}", r.placement or "")
        return t


def bench(model: onnx.ModelProto | str | os.PathLike, devices: Sequence[Any], *, batch_sizes: Sequence[int] = (1,),
          threads: Sequence[int | None] = (None,), dims: Mapping[str, int] | None = None, warmup: int = 5,
          min_runs: int = 10, budget_s: float = 1.0, seed: int = 0,
          on_row: Callable[[BenchRow], None] | None = None,
          inputs: Mapping[str, np.ndarray] | None = None) -> BenchReport:
    """Latency percentiles, throughput and FLOP/s per device, thread count and batch size.

    Load time (session creation) and the first run are reported apart from the steady state;
    for TensorRT their sum minus a steady run is the engine build. FLOPs per run come from
    :func:`onnxpipe.core.analysis.summarize` at each batch size; the peak is :func:`cpu_peak` for
    the threads used (GPU rows get no peak fraction).

    Args:
        model: the model.
        devices: device specs; ``threads`` multiplies CPU devices without their own ``threads``.
        batch_sizes: batch sizes for a symbolic first axis (a fixed batch dim keeps its size).
        threads: intra-op thread counts to try (None: ONNX Runtime's default).
        dims: sizes of other named symbolic dims.
        warmup: runs before timing.
        min_runs: timed runs at least, more while within ``budget_s``.
        budget_s: seconds of timed runs per row.
        seed: for the generated inputs.
        on_row: called with every finished row (progress).
        inputs: a batch of real inputs, cut or repeated to each batch size (default: generated ones).

    Example:
        >>> report = bench("model.onnx", ["cpu"], batch_sizes=[1, 32], threads=[1, 4])  # doctest: +SKIP
        >>> [(r.threads, r.batch, round(r.p50_ms, 2)) for r in report.rows]  # doctest: +SKIP
        [(1, 1, 0.41), (1, 32, 6.2), (4, 1, 0.2), (4, 32, 1.9)]
    """
    from onnxpipe.core.analysis import summarize
    from onnxpipe.core.inputs import example_inputs
    from onnxpipe.core.modelio import load_model
    from onnxpipe.core.tensors import tile_batch
    from onnxpipe.runtimes.device_session import DeviceSession
    from onnxpipe.runtimes.providers import Device

    proto = model if isinstance(model, onnx.ModelProto) else load_model(model, load_external_data=False)
    name = str(model) if not isinstance(model, onnx.ModelProto) else (proto.graph.name or "model")
    if any(b < 1 for b in batch_sizes):
        raise InputError(f"batch sizes must be >= 1, received {list(batch_sizes)}", hint="e.g. --batch-sizes 1,8,32")
    parsed = [Device.parse(d) for d in devices]
    for d in parsed:
        d.check_available()
    peak, notes = cpu_peak(), []
    flops: dict[int, int] = {}
    for b in batch_sizes:
        s = summarize(proto, batch=b, dims=dims)
        flops[b] = s.flops
        if s.uncounted and not notes:
            notes.append(f"{len(s.uncounted)} op(s) not counted: FLOP/s are a lower bound")
    combos = []
    for d in parsed:
        tries = [d.options.threads] if (d.is_gpu or d.options.threads) else list(dict.fromkeys(threads))
        combos += [(d, t) for t in tries]
    rows = []
    for d, t in combos:
        start = time.perf_counter()
        try:
            session = DeviceSession(proto, d, threads=t)
        except OnnxpipeError as exc:
            rows += [BenchRow(d.label, b, t, error=exc.message) for b in batch_sizes]
            continue
        load_s = time.perf_counter() - start
        with session:
            for b in batch_sizes:
                feeds = session.check_feeds(tile_batch(inputs, b) if inputs else example_inputs(proto, batch=b, seed=seed))
                real_batch = next(iter(feeds.values())).shape[0] if feeds and next(iter(feeds.values())).ndim else 1
                row = BenchRow(d.label, real_batch, t, load_s=load_s, flops=flops.get(b, 0))
                row.first_run_ms = time_calls(lambda: session.run(feeds), warmup=0, min_runs=1, budget_s=0).min_ms
                timing = time_session(session, feeds, warmup=warmup, min_runs=min_runs, budget_s=budget_s)
                row.runs, row.mean_ms = timing.runs, timing.mean_ms
                row.p50_ms, row.p90_ms, row.p99_ms = timing.p50_ms, timing.p90_ms, timing.p99_ms
                row.samples_per_s = real_batch / (row.p50_ms / 1e3) if row.p50_ms else 0.0
                if row.flops:
                    row.gflops = row.flops / (row.p50_ms / 1e3) / 1e9
                    if not d.is_gpu:
                        row.peak_gflops = peak.gflops
                        row.peak_fraction = row.gflops / peak.gflops
                        row.threads_peak_fraction = row.gflops / peak.for_threads(t)
                if d.kind == "tensorrt":
                    row.engine_build_s = load_s + (row.first_run_ms - row.p50_ms) / 1e3
                row.placement = session.placement.summary() if session.placement else None
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return BenchReport(name, rows, peak, notes)
