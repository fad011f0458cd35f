"""One device's tuning: the memory bound, the batch curve, the coordinate descent over setups and
the final side-by-side against the default (the steps listed in :mod:`onnxpipe.runtimes.tune`)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from onnxpipe.core.errors import InputError, OnnxpipeError
from onnxpipe.runtimes.providers import Device
from onnxpipe.runtimes.tune_measure import (
    Duel,
    batch_curve,
    doubling,
    duel,
    knee,
    median_ms,
    memory_cap_for,
    memory_model,
    output_mismatch,
    tolerance_for,
)
from onnxpipe.runtimes.tune_space import ModelFacts, Skipped, space, with_options
from onnxpipe.runtimes.tuned import CurvePoint, Measured, TunedEntry

ROUND_S = 0.025  # one round of one setup: long enough to time, short enough to interleave often
MIN_GAIN = 0.02  # below 2% a change is not worth a different setup


@dataclass
class Trial:
    """One candidate setup: what changed from the incumbent, and what became of it."""

    device: Device
    change: str
    status: Literal["default", "kept", "no gain", "slower", "rejected", "error"]
    latency_ms: float | None = None
    batch: int = 1
    ratio: float | None = None
    """Median latency ratio against the incumbent of that moment (below 1: faster)."""
    reason: str = ""

    @property
    def samples_per_s(self) -> float | None:
        return self.batch / (self.latency_ms / 1e3) if self.latency_ms else None


@dataclass
class DeviceTuning:
    """Everything tuning one device found."""

    default: Device
    chosen: Device
    batch: int
    trials: list[Trial] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    curve: list[tuple[int, float]] = field(default_factory=list)
    max_batch: int | None = None
    knee_batch: int | None = None
    confirm: Duel | None = None
    default_ms: float = 0.0
    tuned_ms: float = 0.0
    significant: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def speedup(self) -> float:
        return self.default_ms / self.tuned_ms if self.tuned_ms and self.significant else 1.0

    def entry(self) -> TunedEntry:
        def tput(ms: float) -> float:
            return self.batch / (ms / 1e3) if ms else 0.0

        return TunedEntry(
            device=str(self.chosen), batch_size=self.batch, default_device=str(self.default),
            tuned=Measured(latency_ms=self.tuned_ms, samples_per_s=tput(self.tuned_ms), batch=self.batch),
            default=Measured(latency_ms=self.default_ms, samples_per_s=tput(self.default_ms), batch=self.batch),
            speedup=round(self.speedup, 4), significant=self.significant,
            noise=None if self.confirm is None or not math.isfinite(self.confirm.noise) else round(self.confirm.noise, 4),
            max_batch=self.max_batch, knee_batch=self.knee_batch,
            curve=[CurvePoint(batch=b, latency_ms=ms, samples_per_s=b / (ms / 1e3)) for b, ms in self.curve],
            candidates=sum(t.status != "default" for t in self.trials),
            rejected=[f"{t.change}: {t.reason}" for t in self.trials if t.status == "rejected"],
            notes=list(self.notes))


class _Live:
    """An open session on fixed feeds; ``run()`` is what gets timed."""

    def __init__(self, model: onnx.ModelProto, device: Device, feeds: Mapping[str, np.ndarray],
                 opener: Opener) -> None:
        self.device = device
        self.session = opener(model, device)
        self.feeds = dict(feeds)

    def run(self) -> Any:
        return self.session.run(self.feeds)

    def close(self) -> None:
        self.session.close()


Opener = Callable[[onnx.ModelProto, Device], Any]
"""How tuning opens a session for a setup: ``opener(model, device)`` returns an object with
``run(feeds) -> {name: array}`` and ``close()``. :func:`open_session` by default; pass another to
:func:`onnxpipe.runtimes.tune.tune` (``open_session=``) to wrap or replace sessions, e.g. in tests."""


def open_session(model: onnx.ModelProto, device: Device) -> Any:
    """The default :data:`Opener`: a :class:`~onnxpipe.runtimes.device_session.DeviceSession`."""
    from onnxpipe.runtimes.device_session import DeviceSession

    return DeviceSession(model, device)


def dynamic_batch(model: onnx.ModelProto) -> bool:
    """Whether the model's batch axis (axis 0 of its inputs) is free."""
    from onnxpipe.core.tensors import graph_inputs

    return any(i.shape and not (isinstance(i.shape[0], int) and i.shape[0] > 0) for i in graph_inputs(model))


def tune_feeds(model: onnx.ModelProto, batch: int, dims: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """Random inputs of ``batch`` samples, named dims from ``dims``, reproducible by ``seed``."""
    from onnxpipe.core.inputs import generated_feeds

    return generated_feeds(model, batch, np.random.default_rng(seed), dims)


def with_cache(device: Device, cache_dir: str | os.PathLike | None, fixed: set[str]) -> Device:
    """A TensorRT device with its engine cache in a folder per precision and builder level under ``cache_dir``."""
    if device.kind != "tensorrt" or cache_dir is None or "cache_dir" in fixed:
        return device
    o = device.options
    # one folder per engine-shaping setting: a cached engine must never stand in for another precision
    tag = f"{'int8' if o.int8 else 'fp16' if o.fp16 else 'fp32'}-L{o.builder_level if o.builder_level is not None else 'd'}"  # type: ignore[attr-defined]
    path = Path(cache_dir) / tag
    path.mkdir(parents=True, exist_ok=True)
    return with_options(device, {"cache_dir": str(path)})


def tune_device(model: onnx.ModelProto, device: Device, facts: ModelFacts, *, objective: str,
                batch_sizes: Sequence[int] | None, budget_s: float, memory_cap: int | None, max_batch: int,
                dims: Mapping[str, int], atol: float | None, rtol: float | None, cache_dir: Any, cores: int,
                extra: Sequence[Device], seed: int, notify: Callable[[str], None],
                opener: Opener = open_session, inputs: Mapping[str, np.ndarray] | None = None) -> DeviceTuning:
    """Tune one device within ``budget_s`` (the steps in :mod:`onnxpipe.runtimes.tune`).

    ``inputs``: a batch of real inputs, cut or repeated to each batch size (default: generated ones).
    """
    from onnxpipe.core.tensors import tile_batch

    def feeds(b: int, s: int) -> dict[str, np.ndarray]:
        return tile_batch(inputs, b) if inputs else tune_feeds(model, b, dims, s)

    t0 = time.perf_counter()
    deadline = t0 + budget_s
    fixed = set(device.options.model_fields_set)
    default = with_cache(device, cache_dir, fixed)
    dynamic = dynamic_batch(model)
    sizes = sorted(set(batch_sizes or [1]))
    batch = sizes[0]
    result = DeviceTuning(default, default, batch)
    notify(f"{device.label}: opening the default setup")
    live_default = _Live(model, default, feeds(batch, seed), opener)  # fails loudly: nothing to tune
    try:
        # memory bound on the batch
        if dynamic:
            cap, why = memory_cap_for(device, memory_cap)
            mem = memory_model(model, dims)
            if mem is None or cap is None:
                result.max_batch = max_batch
                result.notes.append(f"max batch {max_batch} (--max-batch): "
                                    + ("activation sizes unknown" if mem is None else why))
            else:
                fit = mem.max_batch(cap)
                result.max_batch = min(fit, max_batch)
                result.notes.append(f"max batch {result.max_batch}: ~{mem.per_sample / 2**20:.2f} MiB per sample + "
                                    f"{mem.fixed / 2**20:.1f} MiB fixed within {cap / 2**30:.1f} GiB ({why})"
                                    + (" (capped by --max-batch)" if fit > max_batch else ""))
                if fit < 1:
                    raise InputError(f"{device.label}: even batch 1 needs ~{mem.bytes_at(1) / 2**30:.2f} GiB, more than "
                                     f"{cap / 2**30:.2f} GiB ({why})", hint="raise --memory-cap or free memory")
        else:
            fixed_batch = next(iter(live_default.feeds.values())).shape[0] if live_default.feeds else 1
            if batch_sizes and any(b != fixed_batch for b in sizes):
                result.notes.append(f"the model's batch is fixed at {fixed_batch}: --batch-sizes ignored")
            sizes, batch = [fixed_batch], fixed_batch
        if dynamic and result.max_batch is not None:
            over = [b for b in sizes if b > result.max_batch]
            if over:
                result.notes.append(f"batch sizes {over} do not fit memory: left out")
            sizes = [b for b in sizes if b <= result.max_batch] or [min(result.max_batch, 1) or 1]
            batch = sizes[0]
        # the throughput curve
        curve_sizes = (doubling(1, result.max_batch or max_batch) if objective == "throughput" and not batch_sizes
                       else sizes if (len(sizes) > 1 or objective == "throughput") else [])
        if dynamic and curve_sizes:
            notify(f"{device.label}: samples/s over batch sizes")
            result.curve = batch_curve(live_default.session.run, lambda b: feeds(b, seed), curve_sizes,
                                       t0 + 0.3 * budget_s)
            result.knee_batch = knee([(b, b / (ms / 1e3)) for b, ms in result.curve])
            if objective == "throughput" and result.knee_batch:
                batch = result.knee_batch
        result.batch = batch
        check = [feeds(batch, seed), feeds(batch, seed + 1)]
        live_default.feeds = check[0]
        reference = [live_default.session.run(b) for b in check]
        for _ in range(2):
            live_default.run()  # warm-up: first runs allocate and pick kernels
        one = median_ms(live_default.run, 3)
        runs = max(1, min(100, math.ceil(ROUND_S * 1e3 / max(one, 1e-3))))
        result.trials.append(Trial(default, "default", "default", one, batch))
        reserve = max(0.15 * budget_s, 12 * 2 * runs * one / 1e3)
        best = _search(model, result, live_default, check, reference, facts, cores=cores, runs=runs,
                       round_s=runs * one / 1e3, deadline=deadline - reserve, fixed=fixed, cache_dir=cache_dir, atol=atol, rtol=rtol,
                       extra=extra, notify=notify, opener=opener)
        _confirm(model, result, live_default, best, runs, runs * one / 1e3, deadline, notify, opener)
        if best is not live_default:
            best.close()
    finally:
        live_default.close()
    result.seconds = time.perf_counter() - t0
    return result


def _search(model: onnx.ModelProto, result: DeviceTuning, live_default: _Live, check: list[dict[str, np.ndarray]],
            reference: list[dict[str, np.ndarray]], facts: ModelFacts, *, cores: int, runs: int, round_s: float,
            deadline: float,
            fixed: set[str], cache_dir: Any, atol: float | None, rtol: float | None, extra: Sequence[Device],
            notify: Callable[[str], None], opener: Opener) -> _Live:
    """Coordinate descent from the default; returns the live session of the best setup found."""
    dims, skipped = space(result.default, facts, cores=cores)
    result.skipped = skipped
    incumbent = live_default
    seen = {str(result.default)}
    # setups the user asked for go first: the budget must not run out before them
    steps: list[tuple[str, str, Any, Any]] = [("extra", str(e), None, e) for e in extra]
    steps += [(d.name, v.label, v, d) for d in dims for v in d.values]
    for k, (dim_name, label, value, owner) in enumerate(steps):
        if time.perf_counter() >= deadline:
            result.notes.append(f"budget reached after {len(result.trials) - 1} candidate(s)")
            break
        try:
            cand = owner if value is None else value.apply(incumbent.device)
            cand = with_cache(cand, cache_dir, fixed)
        except OnnxpipeError as exc:
            result.skipped.append(Skipped(dim_name, label, exc.message))
            continue
        if str(cand) in seen:
            continue
        seen.add(str(cand))
        if value is not None and (why := owner.check(cand, value)):
            result.skipped.append(Skipped(dim_name, label, why))
            continue
        notify(f"{result.default.label}: trying {label}")
        trial = Trial(cand, label, "error", batch=result.batch)
        result.trials.append(trial)
        try:
            live = _Live(model, cand, check[0], opener)
        except OnnxpipeError as exc:
            trial.reason = exc.message
            continue
        try:
            wrong = output_mismatch(live.session, check, reference, tolerance_for(cand, atol, rtol))
        except Exception as exc:  # noqa: BLE001 - a setup that cannot run the model is a failed candidate, not a crash
            wrong = f"run failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        if wrong:
            trial.status, trial.reason = "rejected", wrong
            live.close()
            continue
        for _ in range(2):
            live.run()
        # spend the budget evenly: more rounds per candidate when there is time, never fewer than 7
        share = (deadline - time.perf_counter()) / (len(steps) - k)
        rounds = max(7, min(41, int(share / (2 * max(round_s, 1e-6)))))
        d = duel(incumbent.run, live.run, runs=runs, max_rounds=rounds,
                 deadline=min(deadline, time.perf_counter() + share))
        trial.latency_ms, trial.ratio = d.b_median, d.ratio
        if d.faster(MIN_GAIN):
            trial.status, trial.reason = "kept", f"{1 / d.ratio:.2f}x faster than {incumbent.device}"
            if incumbent is not live_default:
                incumbent.close()
            incumbent = live
        else:
            clearly = d.stopped is not None and d.stopped.startswith("clearly")
            trial.status = "slower" if clearly or d.ratio > 1 + max(MIN_GAIN, 2 * d.noise) else "no gain"
            trial.reason = (d.stopped if d.stopped and d.stopped != "budget"
                            else f"ratio {d.ratio:.3f} ± {d.noise:.3f} over {len(d.a_ms)} rounds")
            live.close()
    return incumbent


def _confirm(model: onnx.ModelProto, result: DeviceTuning, default: _Live, best: _Live, runs: int, round_s: float,
             deadline: float, notify: Callable[[str], None], opener: Opener) -> None:
    """Time the winner against the default side by side; keep it only if faster beyond the noise."""
    if best is default:
        result.default_ms = result.tuned_ms = median_ms(default.run, max(runs, 5))
        result.notes.append("no setup beat the default beyond noise: the default is kept")
        return
    notify(f"{result.default.label}: confirming {best.device} against the default")
    # fresh sessions for both, the winner's first: a session that merely happened to be fast in the
    # search (memory placement, allocation luck) must not carry its luck into the claim
    fresh = [_Live(model, best.device, best.feeds, opener), _Live(model, default.device, default.feeds, opener)]
    try:
        for live in fresh:
            for _ in range(2):
                live.run()
        rounds = max(5, min(61, int((deadline - time.perf_counter()) / (2 * max(round_s, 1e-6)))))
        d = duel(fresh[1].run, fresh[0].run, runs=runs, min_rounds=5, max_rounds=rounds, deadline=deadline,
                 worse=float("inf"))
    finally:
        for live in fresh:
            live.close()
    result.confirm = d
    result.default_ms = d.a_median
    if d.faster(MIN_GAIN):
        result.chosen, result.tuned_ms, result.significant = best.device, d.b_median, True
    else:
        result.tuned_ms = d.a_median
        result.notes.append(f"best candidate {best.device} was not faster than the default beyond noise "
                            f"in the final side-by-side (ratio {d.ratio:.3f} ± {d.noise:.3f}): the default is kept")
