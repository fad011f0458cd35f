"""``onnxpipe auto``: search pipelines built from our passes, measured on the target, keep the best.

Olive's ``auto-opt`` picks passes by rules. Here every candidate is built by the pipeline (so each
pass still proves it kept the model correct), then timed on the user's device side by side with
the simplified float model (:func:`onnxpipe.core.timing.interleaved_ms`: alternating rounds,
medians, the per-round ratio's median and its noise, as the recipe objectives judge stages) and
scored on the metric (or on agreement with the float model).

The search, within ``budget_s``:

1. the input model and ``simplify`` (the baseline every candidate is timed against);
2. each pass family alone on top of it, in the variants that suit the device: ``fuse`` when that
   pass exists; ``prune`` at a few ratios (reconstructed on the calibration data when given);
   int8 ``dynamic`` on CPU (first for MatMul-heavy models, last for CNNs), ``static`` in the
   formats that suit the device (QOperator then QDQ on CPU, QDQ for CUDA/TensorRT) when there is
   data; ``int4`` for MatMul-heavy models when the quantize pass has it; ``fp16`` on GPUs; ``strip``;
3. what it learned prunes the rest: a variant that hurt alone (worse objective, or over the
   metric budget) is never combined further; a quantize variant that paid on the objective but
   went over the metric budget is retried with another calibrator (percentile on CPU, entropy on
   GPUs), then with the pass's own ``max_drop`` search; the best helpful variant of each family is stacked in pass
   order (fuse, prune, precision, strip), each step kept only when better than the model it builds
   on, timed side by side with it;
4. the tuner's session settings for the winner (:func:`onnxpipe.runtimes.tune.tune`) with what is
   left of the budget.

A candidate that would not fit in the remaining budget (estimated from what its passes and the
measurements cost so far) is listed as skipped, so the search ends within the budget (+10%). The
budget starts once the model is converted and the baseline built (that time is reported beside
it: it is the same whatever the budget). A pass cannot
be interrupted, so each builds in a thread: one still running at the budget's end (+5%) is listed
as abandoned and ends the search (the thread finishes in the background, its result unused).

Example:
    >>> result = auto("model.onnx", "out", objective="latency", budget_s=60)  # doctest: +SKIP
    >>> result.winner.name  # doctest: +SKIP
    'simplify + quantize(static qdq minmax)'
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpipe.core.errors import InputError, OnnxpipeError
from onnxpipe.pipeline.objective import GOALS, Objective, model_bytes, ratio_noise, timing_feeds

FAMILY_ORDER = ("fuse", "prune", "precision", "strip")
PRUNE_RATIOS = (0.25, 0.5)
CLEARLY_SLOWER = 1.5  # a candidate this much slower than the baseline after two rounds is not timed further
TUNE_SHARE = 0.15
ABANDON_GRACE = 0.05  # of the budget: how long past its end the search waits for a pass still building  # of the budget kept for the tuner's session settings
MIN_TUNE_S = 3.0


@dataclass
class Candidate:
    """One pipeline tried: its passes (after the input), what it measured, and its fate."""

    name: str
    passes: list[Any]
    family: str = "baseline"
    parent: str | None = None
    status: str = "pending"  # pending, measured, failed, skipped
    kept: bool = False
    why: str = ""
    latency_ms: float | None = None
    throughput: float | None = None
    size_bytes: int | None = None
    metric: float | None = None
    ratio: float | None = None
    """Median per-round latency ratio against the baseline (below 1: faster)."""
    noise: float | None = None
    parent_ratio: float | None = None
    parent_noise: float | None = None
    build_s: float = 0.0
    measure_s: float = 0.0
    model: onnx.ModelProto | None = field(default=None, repr=False)

    def objective_value(self, goal: str) -> float | None:
        return {"latency": self.latency_ms, "throughput": self.throughput, "size": self.size_bytes}[goal]

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "model"}
        d["passes"] = [p if isinstance(p, (str, Mapping)) else repr(p) for p in self.passes]
        d["speedup"] = (1 / self.ratio) if self.ratio else None
        return d


@dataclass
class AutoResult:
    """Every candidate, the winner, and where the files went."""

    outdir: Path
    objective: Objective
    candidates: list[Candidate]
    winner: Candidate
    baseline: Candidate
    metric_name: str
    elapsed_s: float
    budget_s: float
    machine: dict[str, Any] = field(default_factory=dict)
    tuned_device: str | None = None
    conversion_s: float = 0.0
    prepare_s: float = 0.0
    """Checks, conversion, reading the data and building the baseline: before the budget's clock starts."""

    def as_dict(self) -> dict[str, Any]:
        return {"objective": self.objective.as_dict(), "metric": self.metric_name, "budget_s": self.budget_s,
                "elapsed_s": round(self.elapsed_s, 3), "conversion_s": round(self.conversion_s, 3),
                "prepare_s": round(self.prepare_s, 3), "machine": self.machine, "winner": self.winner.name,
                "baseline": self.baseline.name, "tuned_device": self.tuned_device,
                "candidates": [c.as_dict() for c in self.candidates]}


# -- what to try ---------------------------------------------------------------------------------

def _has_pass(name: str) -> bool:
    from onnxpipe.passes import PASSES

    return name in PASSES


def _accepts(name: str, cfg: Mapping[str, Any]) -> bool:
    """Whether pass ``name`` takes these options (so options that land later join without a change here)."""
    from onnxpipe.passes import get_pass

    try:
        get_pass(name).parse_config(dict(cfg))
        return True
    except InputError:
        return False


def _quantize_accepts(cfg: Mapping[str, Any]) -> bool:
    return _accepts("quantize", cfg)


def _matmul_heavy(model: onnx.ModelProto) -> bool:
    from onnxpipe.passes.quantize import _conv_share

    ops = {n.op_type for n in model.graph.node}
    return bool(ops & {"MatMul", "Gemm"}) and _conv_share(model) < 0.5


def singles(model: onnx.ModelProto, device: str, *, has_data: bool) -> list[tuple[str, str, Any]]:
    """``(label, family, pass spec)`` of every variant worth trying alone on this model and device.

    Availability comes from the pass registry and the quantize pass's own options, so passes that
    land later (``fuse``, ``quantize: {mode: int4}``) join the search without a change here.
    """
    from onnxpipe.runtimes.providers import Device

    d = Device.parse(device)
    gpu = d.is_gpu
    target = "tensorrt" if d.kind == "tensorrt" else "cuda" if gpu else "cpu"
    out: list[tuple[str, str, Any]] = []
    if _has_pass("fuse"):  # the target where the pass times its fusions, when it takes one
        out.append(("fuse", "fuse", {"fuse": {"target": device}} if _accepts("fuse", {"target": device}) else "fuse"))
    heavy = _matmul_heavy(model)
    if not gpu and heavy:  # dynamic int8: no data needed, and what MatMul-heavy models run fastest on CPU
        out.append(("int8 dynamic", "precision", {"quantize": {"mode": "dynamic"}}))
    if has_data:  # one variant per format first: formats change speed; calibrators only accuracy (fallbacks)
        # on CPU, QOperator first: the kernels (QLinearConv, QGemm) ORT's CPU provider runs as they are;
        # QDQ runs fast only where ORT fuses each group back into them
        for fmt in ("qoperator", "qdq") if target == "cpu" else ("qdq",):
            out.append((f"int8 static {fmt} minmax", "precision",
                        {"quantize": {"mode": "static", "target": target, "format": fmt, "calibration": "minmax"}}))
    if heavy and _quantize_accepts({"mode": "int4"}):
        out.append(("int4", "precision", {"quantize": {"mode": "int4"}}))
    if gpu:
        out.append(("fp16", "precision", {"fp16": {}}))
    for r in PRUNE_RATIOS:
        cfg: dict[str, Any] = {"ratio": r, "round_to": 8}
        if has_data:
            cfg["reconstruct"] = True
        out.append((f"prune {r:g}", "prune", {"prune": cfg}))
    out.append(("strip", "strip", "strip"))
    if not gpu and not heavy:  # ConvInteger seldom pays on CPU: last, and stopped early when clearly slower
        out.append(("int8 dynamic", "precision", {"quantize": {"mode": "dynamic"}}))
    return out


def fallbacks(label: str, spec: Any, device: str, max_drop: float) -> list[tuple[str, Any]]:
    """Variants of a quantize candidate that was fast enough but over the metric budget.

    Another calibrator (percentile on CPU, entropy on GPUs) for static models, then the pass's own
    ``max_drop`` search, which keeps the most sensitive nodes in float until the budget holds.

    Example:
        >>> [lbl for lbl, _ in fallbacks("int8 dynamic", {"quantize": {"mode": "dynamic"}}, "cpu", 0.01)]
        ['int8 dynamic max_drop']
    """
    from onnxpipe.runtimes.providers import Device

    if not (isinstance(spec, Mapping) and "quantize" in spec):
        return []
    cfg = dict(spec["quantize"])
    out = []
    if cfg.get("mode") == "static" and cfg.get("calibration", "minmax") == "minmax":
        cal = "entropy" if Device.parse(device).is_gpu else "percentile"
        out.append((label.replace("minmax", cal), {"quantize": {**cfg, "calibration": cal}}))
    out.append((f"{label} max_drop", {"quantize": {**cfg, "max_drop": max_drop}}))
    return out


def _pass_name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    return next(iter(spec)) if isinstance(spec, Mapping) else getattr(spec, "name", type(spec).__name__)


def _label(passes: Sequence[str]) -> str:
    return " + ".join(passes)


# -- measuring -----------------------------------------------------------------------------------

class _Metric:
    """The task metric on evaluation data, or mean cosine agreement with the float model's outputs."""

    def __init__(self, reference: onnx.ModelProto, inputs: list[dict[str, np.ndarray]],
                 evaluation: tuple[dict[str, np.ndarray], np.ndarray] | None, metric: Any) -> None:
        from onnxpipe.core.metrics import resolve

        self.evaluation = evaluation
        if evaluation is not None:
            self.fn = resolve(metric or "top1")
            self.name = metric if isinstance(metric, str) else getattr(self.fn, "__name__", "metric")
            return
        from onnxpipe.core.compare import outputs_on

        self.name = "cosine vs float"
        self.inputs = inputs
        self.reference = outputs_on(reference, inputs)

    def __call__(self, model: onnx.ModelProto) -> float:
        if self.evaluation is not None:
            from onnxpipe.core.metrics import evaluate

            return evaluate(model, self.evaluation[0], self.evaluation[1], self.fn)
        from onnxpipe.core.compare import outputs_on, sample_cosines
        from onnxpipe.pipeline import fit_inputs

        got = outputs_on(model, fit_inputs(model, self.inputs))
        scores = []
        for ref, out in zip(self.reference, got):
            for name, r in ref.items():
                if name in out and np.issubdtype(r.dtype, np.floating):
                    a = np.asarray(out[name], dtype=np.float64)
                    if a.shape != r.shape:
                        a = a[: len(r)]
                    scores.append(sample_cosines(r.astype(np.float64), a))
        return float(np.mean(np.concatenate(scores))) if scores else 1.0


def _time(models: Sequence[onnx.ModelProto], feeds: Mapping[str, np.ndarray], objective: Objective,
          deadline: float | None) -> list[list[float]]:
    """Per-round medians (ms) of every model, timed in interleaved rounds on the objective's device."""
    import contextlib

    from onnxpipe.core.timing import interleaved_ms
    from onnxpipe.pipeline import fit_inputs
    from onnxpipe.runtimes.device_session import DeviceSession

    with contextlib.ExitStack() as stack:
        runs, slowest = [], 0.0
        for m in models:
            s = stack.enter_context(DeviceSession(m, objective.device))
            f = s.check_feeds(fit_inputs(m, [feeds])[0])
            runs.append(lambda s=s, f=f: s.run(f))
            t0 = time.perf_counter()
            runs[-1]()  # a probe: slow models get fewer runs per round, not a blown budget
            slowest = max(slowest, time.perf_counter() - t0)
        repeat = 3 if slowest < objective.round_s / 3 else 1
        return interleaved_ms(runs, rounds=objective.rounds, budget_s=objective.round_s, deadline=deadline,
                              min_runs=repeat, stop=_clearly_slower)


def _clearly_slower(rounds: list[list[float]]) -> bool:
    """After two rounds, the last model (the candidate) at 1.5x the first (the baseline) or worse: stop timing."""
    return len(rounds[0]) >= 2 and ratio_noise(rounds[0], rounds[-1])[0] > CLEARLY_SLOWER


# -- the search ----------------------------------------------------------------------------------

class _Search:
    def __init__(self, model: onnx.ModelProto, objective: Objective, *, calibration: Any, evaluation: Any,
                 metric: Any, max_drop: float, budget_s: float, on_update: Callable[[list[Candidate]], None],
                 candidates_filter: Callable[[list[tuple[str, str, Any]]], list[tuple[str, str, Any]]] | None) -> None:
        from onnxpipe.core.data import take
        from onnxpipe.pipeline import generated_inputs

        self.start = time.perf_counter()
        self.deadline = float("inf")  # the clock starts once the baseline is built (start_clock)
        self.budget_s = budget_s
        self.objective = objective
        self.goal = objective.goal
        self.calibration, self.evaluation = calibration, evaluation
        self.check = (take(calibration, 2) if calibration is not None else []) or generated_inputs(model)
        self.feeds = timing_feeds(model, self.check, objective.batch_size)
        self.max_drop = max_drop
        self.metric = _Metric(model, self.check, evaluation, metric)
        self.on_update = on_update
        self.filter = candidates_filter
        self.candidates: list[Candidate] = []
        self.cost: dict[str, float] = {}  # seconds building took, by pass name (prune, quantize ...)
        self.measure_costs: list[float] = []
        self.abandoned = False
        self.input_model = model

    # budget
    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def affordable(self, kinds: Sequence[str]) -> tuple[bool, float]:
        """Whether building and measuring a candidate fits what is left, from what similar ones cost."""
        measure = statistics.median(self.measure_costs) if self.measure_costs else 1.0
        # a pass never run: assume it costs what the dearest known pass did (at least a second)
        est = sum(self.cost.get(k, max([1.0, *self.cost.values()])) for k in kinds) + measure
        return est <= self.left(), est

    def add(self, c: Candidate) -> Candidate:
        self.candidates.append(c)
        self.on_update(self.candidates)
        return c

    # building and measuring
    def build(self, parent: Candidate, label: str, spec: Any, family: str) -> Candidate:
        from onnxpipe.pipeline import optimize

        name = _label([*([parent.name] if parent.passes else []), label])
        c = Candidate(name, [*parent.passes, spec], family=family, parent=parent.name)
        kind = _pass_name(spec)
        ok, est = self.affordable([kind])
        if self.abandoned:
            c.status, c.why = "skipped", "budget: the search ended when a build was abandoned"
            return self.add(c)
        if not ok:
            c.status, c.why = "skipped", f"budget: ~{est:.1f} s needed, {max(self.left(), 0):.1f} s left"
            return self.add(c)
        t0 = time.perf_counter()
        budgeted = isinstance(spec, Mapping) and "max_drop" in next(iter(spec.values()), {})
        box: dict[str, Any] = {}

        def work() -> None:
            try:  # a pass with its own max_drop search gets the task metric to search on
                box["result"] = optimize(parent.model, [spec], check_inputs=self.check, calibration=self.calibration,
                                         evaluation=self.evaluation if budgeted else None,
                                         metric=self.metric.fn if budgeted and self.evaluation is not None else None,
                                         measure_latency=False)
            except BaseException as exc:  # noqa: BLE001 - handed to the search's thread below
                box["error"] = exc

        # a pass cannot be interrupted: it builds in a thread the search stops waiting for at the
        # budget's end (+5%); an abandoned build is listed and ends the search
        worker = threading.Thread(target=work, name=f"onnxpipe-auto-{label}", daemon=True)
        worker.start()
        worker.join(timeout=max(self.left(), 0.0) + ABANDON_GRACE * self.budget_s)
        c.build_s = time.perf_counter() - t0
        if worker.is_alive():
            self.cost[kind] = max(self.cost.get(kind, 0.0), c.build_s)
            self.abandoned = True
            c.status, c.why = "skipped", f"budget: still building after {c.build_s:.0f} s, abandoned at the budget's end"
            return self.add(c)
        result = box.get("result")
        if isinstance(box.get("error"), OnnxpipeError):
            c.why = f"pass refused: {box['error'].message}"
        elif "error" in box:
            raise box["error"]
        self.cost[kind] = max(self.cost.get(kind, 0.0), c.build_s)
        if result is not None:
            stage = result.stages[-1]
            if not stage.kept:
                c.why = f"rolled back by its check: {stage.reason}"
            else:
                c.model = result.model
        if c.model is None:
            c.status = "failed"
            return self.add(c)
        return self.measure(c, parent)

    def measure(self, c: Candidate, parent: Candidate | None) -> Candidate:
        t0 = time.perf_counter()
        base = self.baseline
        models = [base.model] + ([parent.model] if parent is not None and parent is not base and parent.model
                                 is not None and parent.passes else []) + [c.model]
        try:
            rounds = _time(models, self.feeds, self.objective, self.deadline)
        except OnnxpipeError as exc:
            c.status, c.why = "failed", f"cannot run on {self.objective.device}: {exc.message}"
            return self.add(c)
        c.latency_ms = statistics.median(rounds[-1])
        c.ratio, c.noise = ratio_noise(rounds[0], rounds[-1])
        if len(models) == 3:
            c.parent_ratio, c.parent_noise = ratio_noise(rounds[1], rounds[-1])
        else:
            c.parent_ratio, c.parent_noise = c.ratio, c.noise
        c.throughput = self.objective.batch_size / (c.latency_ms / 1e3) if c.latency_ms else None
        c.size_bytes = model_bytes(c.model)
        c.metric = self.metric(c.model)
        c.status = "measured"
        c.measure_s = time.perf_counter() - t0
        self.measure_costs.append(c.measure_s)
        self.add(c)
        return c

    # verdicts
    def threshold(self, noise: float | None) -> float:
        return max(self.objective.min_change, 2 * (noise or 0.0))

    def within_budget(self, c: Candidate) -> bool:
        return c.metric is not None and self.reference_metric - c.metric <= self.max_drop

    def better_than(self, c: Candidate, other: Candidate, *, ratio: float | None, noise: float | None) -> bool:
        """``c`` beats ``other`` on the goal beyond noise (size: exact bytes; timing: the interleaved ratio)."""
        if self.goal == "size":
            return c.size_bytes is not None and other.size_bytes is not None and c.size_bytes < other.size_bytes * (1 - 1e-3)
        return ratio is not None and ratio < 1 - self.threshold(noise)

    def worse_than(self, c: Candidate, other: Candidate, *, ratio: float | None, noise: float | None) -> bool:
        if self.goal == "size":
            return c.size_bytes is None or other.size_bytes is None or c.size_bytes > other.size_bytes * (1 + 1e-3)
        return ratio is None or ratio > 1 + self.threshold(noise)

    def describe_vs(self, c: Candidate, other: Candidate, ratio: float | None, noise: float | None) -> str:
        if self.goal == "size":
            return f"size {c.size_bytes:,} vs {other.size_bytes:,} bytes of {other.name}"
        return f"latency x{ratio:.3f} ±{noise:.3f} of {other.name}"

    def judge(self, c: Candidate, against: Candidate, ratio: float | None, noise: float | None) -> bool:
        if c.status != "measured":
            return False
        if not self.within_budget(c):
            c.why = (f"{self.metric.name} {c.metric:.4f}: drop {self.reference_metric - c.metric:.4f} "
                     f"> max_drop {self.max_drop:g}")
            return False
        if not self.better_than(c, against, ratio=ratio, noise=noise):
            verdict = ("worse" if self.worse_than(c, against, ratio=ratio, noise=noise)
                       else "not smaller" if self.goal == "size" else "not better beyond noise")
            c.why = f"{verdict}: {self.describe_vs(c, against, ratio, noise)}"
            return False
        c.kept = True
        c.why = f"better: {self.describe_vs(c, against, ratio, noise)}"
        self.on_update(self.candidates)
        return True

    def prepare(self) -> None:
        """Build the baseline (simplify), before the budget's clock starts: every search needs it."""
        from onnxpipe.pipeline import optimize

        t0 = time.perf_counter()
        self._simplified = optimize(self.input_model, ["simplify"], check_inputs=self.check,
                                    calibration=self.calibration, measure_latency=False)
        self._simplify_s = time.perf_counter() - t0

    def start_clock(self) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + self.budget_s

    def run(self) -> tuple[Candidate, Candidate]:
        # 1. the input and the simplified float model (the baseline)
        inp = Candidate("input (float)", [], model=self.input_model)
        self.baseline = inp
        self.measure(inp, None)
        self.reference_metric = inp.metric if inp.metric is not None else 1.0
        inp.why = "the input model"
        result = self._simplified
        simp = Candidate("simplify", ["simplify"], family="baseline", parent=inp.name, build_s=self._simplify_s)
        if result.stages[-1].kept:
            simp.model = result.model
            self.measure(simp, None)  # against the input
            self.baseline = simp
            simp.kept = True
            simp.why = "baseline: the simplified float model every candidate is timed against"
        else:
            simp.status, simp.why = "failed", f"rolled back by its check: {result.stages[-1].reason}"
            self.add(simp)
            inp.kept, inp.why = True, "baseline (simplify was rolled back)"
        base = self.baseline

        # 2. every family alone on the baseline
        options = singles(base.model, self.objective.device, has_data=self.calibration is not None)
        if self.filter is not None:
            options = self.filter(options)
        helpful: dict[str, list[tuple[Candidate, str, Any]]] = {}
        for label, family, spec in options:
            c = self.build(base, label, spec, family)
            if c.status == "measured" and self.judge(c, base, c.ratio, c.noise):
                helpful.setdefault(family, []).append((c, label, spec))
                continue
            if not (c.status == "measured" and not self.within_budget(c)
                    and self.better_than(c, base, ratio=c.ratio, noise=c.noise)):
                continue
            # it paid on the objective but lost too much: other calibrators, then the pass's own budget search
            for label2, spec2 in fallbacks(label, spec, self.objective.device, self.max_drop):
                c2 = self.build(base, label2, spec2, family)
                if self.judge(c2, base, c2.ratio, c2.noise):
                    helpful.setdefault(family, []).append((c2, label2, spec2))
                    break

        # 3. stack the best helpful variant of each family, in pass order; hurt-alone variants never
        best_single = self._best([c for v in helpful.values() for c, _, _ in v]) or base
        chain = base
        for family in FAMILY_ORDER:
            variants = sorted(helpful.get(family, []), key=lambda t: self._key(t[0]))
            for c, label, spec in variants[:2]:
                if chain is base:
                    chain = c
                    break
                combo = self.build(chain, label, spec, family)
                if self.judge(combo, chain, combo.parent_ratio, combo.parent_noise):
                    chain = combo
                    break
        pool = [c for c in self.candidates if c.kept and c.status == "measured" and c is not base]
        winner = self._best(pool + [best_single] if best_single is not base else pool) or base
        if winner is not base and not self.better_than(winner, base, ratio=winner.ratio, noise=winner.noise):
            winner = base
        return winner, base

    def _key(self, c: Candidate) -> float:
        if self.goal == "size":
            return float(c.size_bytes or float("inf"))
        return c.ratio if c.ratio is not None else float("inf")

    def _best(self, pool: Iterable[Candidate]) -> Candidate | None:
        pool = [c for c in pool if c.status == "measured" and self.within_budget(c)]
        return min(pool, key=self._key) if pool else None


# -- outputs -------------------------------------------------------------------------------------

def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (lower x, higher y), by ascending x.

    Example:
        >>> pareto([(1.0, 0.9), (2.0, 0.95), (3.0, 0.94), (0.5, 0.5)])
        [3, 0, 1]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -float("inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def leaderboard_md(result: AutoResult) -> str:
    o = result.objective
    lines = [f"# onnxpipe auto: {o.describe()}", "",
             f"Machine: {result.machine.get('cpu', '?')}. Budget {result.budget_s:g} s, used {result.elapsed_s:.1f} s "
             f"(after {result.prepare_s:.1f} s of conversion and baseline, not counted). "
             f"Metric: {result.metric_name} (max drop {o.max_drop:g}). Latency: median ms of one run at batch "
             f"{o.batch_size}, each candidate timed in {o.rounds} interleaved rounds with the baseline "
             f"({result.baseline.name}); speedup = 1 / median per-round ratio (± its noise).",
             f"Winner: **{result.winner.name}**" + (f", session {result.tuned_device}" if result.tuned_device else ""), "",
             "| # | candidate | latency | speedup | throughput | size | metric | kept / why not |",
             "|---|---|---|---|---|---|---|---|"]
    from onnxpipe.core.units import human_bytes

    for i, c in enumerate(result.candidates):
        lat = f"{c.latency_ms:.3f} ms" if c.latency_ms is not None else "-"
        sp = f"{1 / c.ratio:.2f}x ±{c.noise:.2f}" if c.ratio else "-"
        tp = f"{c.throughput:,.0f}/s" if c.throughput else "-"
        size = human_bytes(c.size_bytes) if c.size_bytes else "-"
        met = f"{c.metric:.4f}" if c.metric is not None else "-"
        fate = ("**winner**: " if c is result.winner else "yes: " if c.kept else f"{c.status}: " if c.status !=
                "measured" else "no: ") + c.why
        lines.append(f"| {i} | {c.name} | {lat} | {sp} | {tp} | {size} | {met} | {fate.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _pyplot(warm: bool = False) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if warm:  # the first figure loads the fonts: seconds on a loaded machine
        import io

        fig, ax = plt.subplots(figsize=(1, 1))
        ax.set_title("warm-up")
        fig.savefig(io.BytesIO(), format="png")
        plt.close(fig)
    return plt


def chart(result: AutoResult, path: str | os.PathLike) -> Path:
    """Metric against latency for every measured candidate, the Pareto front marked (PNG, atomic)."""
    plt = _pyplot()

    from onnxpipe.core.files import save_figure

    pts = [c for c in result.candidates if c.status == "measured" and c.latency_ms is not None and c.metric is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    xs, ys = [c.latency_ms for c in pts], [c.metric for c in pts]
    ax.scatter(xs, ys, c=["#C44E52" if c is result.winner else "#4C72B0" for c in pts], s=28, zorder=3)
    front = pareto(list(zip(xs, ys)))
    if front:
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="#55A868", lw=1.5,
                label="Pareto front", zorder=2)
        ax.scatter([xs[i] for i in front], [ys[i] for i in front], facecolors="none", edgecolors="#55A868", s=90,
                   zorder=4)
    for c, x, y in zip(pts, xs, ys):
        ax.annotate(c.name.replace("simplify + ", ""), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    floor = result.baseline.metric
    if floor is not None:
        ax.axhline(floor - result.objective.max_drop, color="grey", ls=":", lw=1, label="metric budget")
    ax.set_xlabel(f"latency (ms, median, batch {result.objective.batch_size}, {result.objective.device})")
    ax.set_ylabel(result.metric_name)
    ax.set_title(f"onnxpipe auto ({result.objective.goal}): winner {result.winner.name}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _live_table(candidates: list[Candidate], title: str) -> Any:
    from rich.table import Table

    from onnxpipe.core.units import human_bytes

    t = Table(title=title)
    for col in ("candidate", "latency", "speedup", "size", "metric", "status"):
        t.add_column(col, justify="left" if col in ("candidate", "status") else "right", overflow="fold")
    for c in candidates:
        t.add_row(c.name, f"{c.latency_ms:.3f} ms" if c.latency_ms is not None else "-",
                  f"{1 / c.ratio:.2f}x" if c.ratio else "-", human_bytes(c.size_bytes) if c.size_bytes else "-",
                  f"{c.metric:.4f}" if c.metric is not None else "-",
                  ("[green]kept[/] " if c.kept else "") + (c.why if c.status != "pending" else "measuring"))
    return t


def _recipe_yaml(result: AutoResult, source: str, data: str | None, evaluation: str | None, metric: str | None,
                 batch_size: int) -> str:
    import yaml

    o = result.objective
    passes = [{**({p: {}} if isinstance(p, str) else p), "keep": True} for p in result.winner.passes]
    doc: dict[str, Any] = {"model": {"source": source}}
    if data or evaluation:
        doc["data"] = {k: v for k, v in (("calibration", data), ("evaluation", evaluation)) if v}
        doc["data"]["batch_size"] = batch_size
    doc["target"] = {"device": o.device, "batch_size": o.batch_size}
    doc["objective"] = {"goal": o.goal, **({"max_drop": o.max_drop} if evaluation else {})}
    doc["passes"] = passes
    if result.tuned_device:
        doc["runtime"] = "tuned.json"
    doc["validate"] = {"providers": [o.device], **({"metric": metric} if evaluation and metric else {})}
    w, b = result.winner, result.baseline
    head = [f"# Written by `onnxpipe auto`: the winner of {len(result.candidates)} candidates "
            f"({result.objective.describe()}, {result.machine.get('cpu', '')}).",
            f"# {w.name}: " + (f"{1 / w.ratio:.2f}x the speed of {b.name}" if w.ratio else "")
            + (f", {w.size_bytes / b.size_bytes:.2f}x its size" if w.size_bytes and b.size_bytes else "")
            + (f", {result.metric_name} {w.metric:.4f} (float {b.metric:.4f})" if w.metric is not None and
               b.metric is not None else "") + ".",
            "# Every pass is `keep: true`: auto already measured them side by side; `onnxpipe run` reproduces",
            "# the model and reports the objective per stage again."]
    return "\n".join(head) + "\n" + yaml.safe_dump(doc, sort_keys=False)


def auto(model: str | os.PathLike, outdir: str | os.PathLike, *, device: str = "cpu", batch_size: int = 1,
         objective: str = "latency", data: str | None = None, evaluation: str | None = None,
         metric: str | None = None, max_drop: float = 0.01, budget_s: float = 300.0, rounds: int = 5,
         round_s: float | None = None, console: Any = None,
         candidates_filter: Callable[[list[tuple[str, str, Any]]], list[tuple[str, str, Any]]] | None = None,
         ) -> AutoResult:
    """Search candidate pipelines for ``model`` on ``device`` and write the best (see the module doc).

    Args:
        model: anything ``onnxpipe convert`` takes (an .onnx, ``file.py:build``, a SavedModel ...).
        outdir: gets ``model.onnx``, ``recipe.yaml``, ``tuned.json``, ``leaderboard.json``/``.md``
            and ``leaderboard.png``.
        device: any device spec; batch_size: samples per timed run.
        objective: ``latency``, ``throughput`` or ``size``.
        data: calibration data (static int8, prune's reconstruction); evaluation/metric: the task
            metric (``top1``, ``file.py:function``); without them, mean cosine with the float model.
        max_drop: largest metric drop from the input model a candidate may have.
        budget_s: seconds for the whole search (candidates that would not fit are skipped).
        rounds/round_s: interleaved timing rounds per candidate and seconds per model per round
            (default: from the budget).
        candidates_filter: narrows the single-pass variants tried (tests, or a user who knows).
    """
    from rich.console import Console
    from rich.live import Live

    from onnxpipe.converter import convert
    from onnxpipe.core import files, hardware
    from onnxpipe.core.data import calibration_source, evaluation_source
    from onnxpipe.core.modelio import save_model
    from onnxpipe.runtimes.providers import Device

    t_begin = time.perf_counter()
    if objective not in GOALS:
        raise InputError(f"unknown objective {objective!r}", hint=f"use one of {', '.join(GOALS)}")
    if budget_s <= 0:
        raise InputError(f"--budget-s must be positive, received {budget_s}", hint="e.g. --budget-s 120")
    if max_drop < 0:
        raise InputError(f"--max-drop must be >= 0, received {max_drop}", hint="e.g. --max-drop 0.01")
    if evaluation is None and metric is not None:
        raise InputError("--metric needs --eval (evaluation data with labels)",
                         hint="give --eval data.npz, or leave --metric out to compare with the float model")
    Device.parse(device).check_available()
    out = Path(outdir)
    console = console or Console(stderr=True)
    round_s = round_s or min(0.1, max(0.01, budget_s / 600))
    goal = Objective.parse({"goal": objective, "max_drop": max_drop, "rounds": rounds, "round_s": round_s},
                           device=device, batch_size=batch_size)
    calibration = calibration_source(data) if data else None
    ev = evaluation_source(evaluation) if evaluation else None
    source = str(model)
    t_convert = time.perf_counter()
    conversion = convert(source)
    conversion_s = time.perf_counter() - t_convert
    info = hardware.cpu()
    machine = {"cpu": info.model, "cores": info.cores, "simd": info.simd}
    search_budget = budget_s * (1 - TUNE_SHARE if objective != "size" else 0.95)
    title = f"onnxpipe auto: {goal.describe()} (budget {budget_s:g} s)"
    with Live(_live_table([], title), console=console, refresh_per_second=4, transient=False) as live:
        search = _Search(conversion.model, goal, calibration=calibration, evaluation=ev, metric=metric,
                         max_drop=max_drop, budget_s=search_budget,
                         on_update=lambda cs: live.update(_live_table(cs, title)),
                         candidates_filter=candidates_filter)
        search.prepare()
        _pyplot(warm=True)  # the chart's imports and fonts take seconds here: before the clock, like the baseline
        # the budget covers the search, tuning and writing the files; conversion and the baseline
        # (reading the data, simplify: the same for every search) are reported beside it
        started = time.perf_counter()
        prepare_s = started - t_begin
        search.start_clock()
        winner, base = search.run()
        if winner is base:
            winner.why = "no candidate beat the simplified float model beyond noise within the metric budget"
        live.update(_live_table(search.candidates, title))
    console.print()
    result = AutoResult(out, goal, search.candidates, winner, base, search.metric.name, 0.0, budget_s, machine,
                        conversion_s=conversion_s, prepare_s=prepare_s)
    out.mkdir(parents=True, exist_ok=True)
    tuned_path = out / "tuned.json"
    left = budget_s - (time.perf_counter() - started) - 1.0
    result.tuned_device = _tune(winner.model, goal, left, tuned_path, source)
    save_model(winner.model, out / "model.onnx")
    files.write_text(_recipe_yaml(result, _abs(source) or source,
                                   _abs(data), _abs(evaluation), metric or ("top1" if evaluation else None),
                                   32), out / "recipe.yaml")
    result.elapsed_s = time.perf_counter() - started
    chart(result, out / "leaderboard.png")
    result.elapsed_s = time.perf_counter() - started  # the leaderboard is written last, with the whole time
    files.write_json(result.as_dict(), out / "leaderboard.json")
    files.write_text(leaderboard_md(result), out / "leaderboard.md")
    return result


def _abs(spec: str | None) -> str | None:
    if spec is None:
        return None
    path, sep, rest = spec.partition(".py:")
    p = Path(path + (".py" if sep else ""))
    return (f"{p.resolve()}:{rest}" if sep else str(p.resolve())) if p.exists() else spec


def _tune(model: onnx.ModelProto, goal: Objective, seconds: float, path: Path, name: str) -> str:
    """The tuner's session settings for the winner within ``seconds``; the untuned device when none are left."""
    from onnxpipe.runtimes.tuned import TunedEntry, TunedFile, save_tuned

    if seconds >= MIN_TUNE_S:
        from onnxpipe.runtimes.tune import tune

        try:
            rep = tune(model, [goal.device], objective="throughput" if goal.goal == "throughput" else "latency",
                       batch_sizes=[goal.batch_size], budget_s=seconds)
            tuned = rep.to_file()
            tuned.model = name
            save_tuned(tuned, path)
            return tuned.entries[0].device
        except OnnxpipeError:
            pass
    from onnxpipe.core.hardware import cpu

    info = cpu()
    entry = TunedEntry(device=goal.device, batch_size=goal.batch_size, default_device=goal.device,
                       notes=[f"not tuned: {max(seconds, 0):.1f} s of the budget left (tuning needs {MIN_TUNE_S:g} s)"])
    save_tuned(TunedFile(model=name, objective="latency", budget_s=0.0, elapsed_s=0.0,  # type: ignore[arg-type]
                         machine={"cpu": info.model, "cores": info.cores, "simd": info.simd}, entries=[entry]), path)
    return goal.device
