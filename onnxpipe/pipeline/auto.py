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

The candidates and what to try are in :mod:`onnxpipe.pipeline.auto_candidates`, the metric and the
timing in :mod:`onnxpipe.pipeline.auto_measure`, the leaderboard, chart and recipe in
:mod:`onnxpipe.pipeline.auto_report`; this module holds the search loop and :func:`auto`.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from onnxpipe.core.errors import InputError, OnnxpipeError
from onnxpipe.pipeline.auto_candidates import (
    FAMILY_ORDER,
    AutoResult,
    Candidate,
    _label,
    _pass_name,
    fallbacks,
    singles,
)
from onnxpipe.pipeline.auto_measure import _Metric, _time
from onnxpipe.pipeline.auto_report import _live_table, _pyplot, _recipe_yaml, chart, leaderboard_md
from onnxpipe.pipeline.objective import GOALS, Objective, model_bytes, ratio_noise, timing_feeds

TUNE_SHARE = 0.15
ABANDON_GRACE = 0.05  # of the budget: how long past its end the search waits for a pass still building  # of the budget kept for the tuner's session settings
MIN_TUNE_S = 3.0


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
