"""What a run optimizes for, measured on the target: latency, throughput or size.

A recipe says ``target: {device: cpu, batch_size: 8}`` and ``objective: latency`` (or
``{goal: latency, max_drop: 0.01}``). After every pass the pipeline times the model before and
after the pass side by side on the target (:func:`measure`) and rolls the stage back when it made
the objective worse beyond noise.

Noise: the two models are timed in alternating rounds (:func:`onnxpipe.core.timing.interleaved_ms`,
the timing loop of ``onnxpipe bench``), each round giving one median per model and one ratio
after/before. The change is the median of those ratios; its noise is the standard error of that
median from the rounds' spread (1.4826 x MAD x 1.2533 / sqrt(rounds), the estimate ``onnxpipe
tune`` uses). A stage is worse when the ratio exceeds ``1 + max(min_change, 2 x noise)`` (and
better when below ``1 - max(min_change, 2 x noise)``): load from other processes moves both
models of a round alike, so it widens the spread instead of deciding. A stage already 1.5x slower
after two rounds is not timed further.

Example:
    >>> Objective.parse("latency").describe()
    'latency at batch 1 on cpu'
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from onnxpipe.core.errors import InputError
from onnxpipe.core.timing import ratio_noise

GOALS = ("latency", "throughput", "size")
MIN_CHANGE = 0.02  # below 2% a timing change is not worth a decision (tune uses the same floor)
SIZE_CHANGE = 0.001  # sizes are exact; a 0.1% growth is still growth worth reporting, not noise


@dataclass
class Objective:
    """The goal, where it is measured, and the metric budget.

    Attributes:
        goal: ``latency`` (median ms of one run at ``batch_size``), ``throughput`` (samples/s at
            ``batch_size``) or ``size`` (bytes of the model).
        device: any device spec the runtimes accept (``cpu``, ``cpu:0[threads=2]``, ``cuda:0``).
        batch_size: samples per run for the timings.
        max_drop: largest drop of the recipe's metric from the input model a stage may cause.
        min_change: smallest relative change that counts, besides the noise.
        rounds: interleaved rounds per comparison; round_s: seconds per model per round.
    """

    goal: Literal["latency", "throughput", "size"] = "latency"
    device: str = "cpu"
    batch_size: int = 1
    max_drop: float | None = None
    min_change: float = MIN_CHANGE
    rounds: int = 7
    round_s: float = 0.05

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | Objective, **target: Any) -> Objective:
        """``"latency"`` or ``{goal: latency, max_drop: 0.01}``, with ``device``/``batch_size`` from a target."""
        if isinstance(spec, Objective):
            return spec
        raw = {"goal": spec} if isinstance(spec, str) else dict(spec)
        raw.update({k: v for k, v in target.items() if v is not None})
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown objective option(s) {', '.join(sorted(unknown))}",
                             hint="objective: {goal: latency|throughput|size, max_drop: 0.01}")
        obj = cls(**raw)
        if obj.goal not in GOALS:
            raise InputError(f"unknown objective {obj.goal!r}", hint=f"use one of {', '.join(GOALS)}")
        if obj.batch_size < 1 or obj.rounds < 2 or obj.round_s <= 0:
            raise InputError(f"objective: batch_size >= 1, rounds >= 2 and round_s > 0, received {raw}",
                             hint="e.g. target: {device: cpu, batch_size: 8}")
        if obj.max_drop is not None and obj.max_drop < 0:
            raise InputError(f"max_drop must be >= 0, received {obj.max_drop}", hint="e.g. max_drop: 0.01")
        from onnxpipe.runtimes.providers import Device

        Device.parse(obj.device)  # a bad spec fails here, with the runtimes' own message
        return obj

    def describe(self) -> str:
        where = f"on {self.device}"
        return f"size {where}" if self.goal == "size" else f"{self.goal} at batch {self.batch_size} {where}"

    @property
    def unit(self) -> str:
        return {"latency": "ms", "throughput": "samples/s", "size": "bytes"}[self.goal]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Measurement:
    """Before and after a stage, in the goal's unit, and the verdict.

    ``ratio`` is after/before of the *cost* (latency or bytes; throughput is judged by the latency
    ratio at the same batch, so a ratio above 1 is worse for every goal).
    """

    goal: str
    unit: str
    before: float
    after: float
    ratio: float
    noise: float = 0.0
    rounds: int = 0
    threshold: float = 0.0
    before_rounds: list[float] = field(default_factory=list)
    after_rounds: list[float] = field(default_factory=list)

    @property
    def worse(self) -> bool:
        return self.ratio > 1 + self.threshold

    @property
    def better(self) -> bool:
        return self.ratio < 1 - self.threshold

    @property
    def verdict(self) -> str:
        return "worse" if self.worse else "better" if self.better else "within noise"

    def fmt(self, value: float) -> str:
        if self.unit == "bytes":
            from onnxpipe.core.units import human_bytes

            return human_bytes(value)
        return f"{value:.3f} ms" if self.unit == "ms" else f"{value:,.1f} samples/s"

    def describe(self) -> str:
        """``latency 0.412 ms -> 1.210 ms (x2.94, noise +-0.02, 7 rounds)``."""
        change = f"x{self.after / self.before:.3g}" if self.before else "n/a"
        noise = f", noise ±{self.noise:.3f}" if self.rounds else ""
        rounds = f", {self.rounds} interleaved rounds" if self.rounds else ""
        return f"{self.goal} {self.fmt(self.before)} -> {self.fmt(self.after)} ({change}{noise}{rounds})"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(verdict=self.verdict, change=(self.after / self.before if self.before else None))
        return d


def model_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model as saved (weights included, whether stored inside or as external data)."""
    from onnxpipe.core.modelio import EXTERNAL_DATA_THRESHOLD, tensor_bytes

    tb = tensor_bytes(model)
    return model.ByteSize() if tb < EXTERNAL_DATA_THRESHOLD else tb


def timing_feeds(model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]] | None,
                 batch_size: int) -> dict[str, np.ndarray]:
    """One input batch of ``batch_size`` samples: real data when there is some, else generated.

    Inputs whose first axis is symbolic get ``batch_size`` rows (the check batches joined, repeated
    when too few); a fixed first axis keeps its size.
    """
    from onnxpipe.core.inputs import example_inputs
    from onnxpipe.core.tensors import graph_inputs

    generated = example_inputs(model, batch=batch_size, seed=0)
    if not batches:
        return generated
    out = {}
    for info in graph_inputs(model):
        arrays = [b[info.name] for b in batches if info.name in b]
        if not arrays:
            out[info.name] = generated[info.name]
            continue
        first = arrays[0]
        fixed = info.shape is not None and info.shape and isinstance(info.shape[0], int) and info.shape[0] > 0
        if first.ndim == 0 or fixed or any(a.shape[1:] != first.shape[1:] for a in arrays):
            out[info.name] = first
            continue
        joined = np.concatenate(arrays, axis=0)
        reps = -(-batch_size // len(joined))
        out[info.name] = np.ascontiguousarray(np.concatenate([joined] * reps, axis=0)[:batch_size])
    return out


def _session(model: onnx.ModelProto, device: str) -> Any:
    from onnxpipe.runtimes.device_session import DeviceSession

    return DeviceSession(model, device)


def measure_one(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], objective: Objective) -> float:
    """The goal's value for one model alone (stage 0): bytes, median ms, or samples/s."""
    from onnxpipe.core.timing import time_session

    if objective.goal == "size":
        return float(model_bytes(model))
    with _session(model, objective.device) as s:
        checked = s.check_feeds(feeds)
        ms = time_session(s, checked, min_runs=5, budget_s=objective.round_s * objective.rounds).median_ms
    return ms if objective.goal == "latency" else _per_s(objective, checked, ms)


def _per_s(objective: Objective, feeds: Mapping[str, np.ndarray], ms: float) -> float:
    rows = next((v.shape[0] for v in feeds.values() if v.ndim), objective.batch_size)
    return rows / (ms / 1e3) if ms > 0 else 0.0


def measure(before: onnx.ModelProto, after: onnx.ModelProto, feeds_before: Mapping[str, np.ndarray],
            feeds_after: Mapping[str, np.ndarray], objective: Objective,
            deadline: float | None = None) -> Measurement:
    """The goal before and after a stage, side by side on the objective's device (see the module doc)."""
    from onnxpipe.core.timing import interleaved_ms

    if objective.goal == "size":
        a, b = float(model_bytes(before)), float(model_bytes(after))
        return Measurement("size", "bytes", a, b, b / a if a else 1.0, threshold=SIZE_CHANGE)
    with _session(before, objective.device) as sa, _session(after, objective.device) as sb:
        fa, fb = sa.check_feeds(feeds_before), sb.check_feeds(feeds_after)
        a_ms, b_ms = interleaved_ms([lambda: sa.run(fa), lambda: sb.run(fb)], rounds=objective.rounds,
                                    budget_s=objective.round_s, deadline=deadline,
                                    stop=lambda r: len(r[0]) >= 2 and ratio_noise(r[0], r[1])[0] > 1.5)
    ratio, noise = ratio_noise(a_ms, b_ms)
    threshold = max(objective.min_change, 2 * noise)
    ma, mb = statistics.median(a_ms), statistics.median(b_ms)
    if objective.goal == "latency":
        return Measurement("latency", "ms", ma, mb, ratio, noise, len(a_ms), threshold, a_ms, b_ms)
    return Measurement("throughput", "samples/s", _per_s(objective, fa, ma), _per_s(objective, fb, mb), ratio,
                       noise, len(a_ms), threshold, a_ms, b_ms)


def judge_stage(stage: Any, goal: Objective, current: onnx.ModelProto, candidate: onnx.ModelProto,
                feeds: Mapping[str, np.ndarray], new_feeds: Mapping[str, np.ndarray], base_metric: float | None,
                score: Any = None) -> None:
    """Measure the objective (and the metric budget) for a stage that passed its check; say why it
    stays (``stage.why``) or goes (``stage.reason``), both numbers in either case."""
    from onnxpipe.core.errors import OnnxpipeError

    try:
        m = measure(current, candidate, feeds, new_feeds, goal)
    except OnnxpipeError as exc:
        if stage.keep:
            stage.why = f"keep: true ({goal.goal} could not be measured on {goal.device}: {exc.message})"
        else:
            stage.reason = f"{goal.goal} could not be measured on {goal.device}: {exc.message}"
        return
    stage.objective = m.as_dict()
    if m.after_rounds:
        stage.latency_ms = statistics.median(m.after_rounds)
    problems = []
    if m.worse:
        problems.append(f"{m.describe()}: {goal.goal} worse beyond noise (threshold {m.threshold:.1%})")
    if goal.max_drop is not None and score is not None and base_metric is not None:
        stage.metric = score(candidate)
        drop = base_metric - stage.metric
        if drop > goal.max_drop:
            problems.append(f"metric {base_metric:.4f} -> {stage.metric:.4f}: drop {drop:.4f} > max_drop {goal.max_drop:g}")
    if problems and stage.keep:
        stage.why = "keep: true, although " + "; ".join(problems)
    elif problems:
        stage.reason = "; ".join(problems)
    else:
        stage.why = f"{m.describe()}: " + ("better beyond noise" if m.better else "not worse beyond noise")
