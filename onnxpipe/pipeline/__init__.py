"""The pipeline floor: recipes end to end (:func:`run`) and passes with a check after each one
(:func:`optimize`); a pass that breaks the model is rolled back.

It stands on every floor below (core, passes, converter, runtimes) and nothing but the CLI stands
on it: ``recipe`` reads and checks recipes, ``stages`` tries one pass and records what it did,
``report`` renders the table, Markdown and chart, ``validation`` builds precision variants with
our own passes for the one cross-provider validator (:mod:`onnxpipe.runtimes.validate`).

Example:
    >>> import onnxpipe
    >>> result = onnxpipe.optimize("model.onnx", ["simplify", {"fp16": {}}])  # doctest: +SKIP
    >>> [(s.name, s.kept) for s in result.stages]  # doctest: +SKIP
    [('input', True), ('simplify', True), ('fp16', True)]
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxpipe.core.compare import outputs_on
from onnxpipe.core.errors import InputError, OnnxpipeError
from onnxpipe.core.inputs import decoder_feeds
from onnxpipe.core.modelio import load_model, save_model
from onnxpipe.core.timing import latency_ms, time_session
from onnxpipe.passes.base import PassContext
from onnxpipe.pipeline.stages import (
    PassSpec,
    PipelineResult,
    Stage,
    fill_stats,
    fit_inputs,
    generated_inputs,
    make_pass,
    op_delta,
    reference_outputs,
    split_keep,
    try_pass,
)
from onnxpipe.pipeline.validation import validate_providers

if TYPE_CHECKING:
    from onnxpipe.pipeline.objective import Objective
    from onnxpipe.runtimes.providers import Device

__all__ = ["PipelineResult", "RunResult", "Stage", "optimize", "run", "validate_providers"]


DECODE_CONTEXT = 64  # a KV-cache decoder's tokens/s: one token at batch 1 after this many cached ones


def stage_latency_ms(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], device: Device | str | None = None, *,
                     budget_s: float = 0.5) -> float:
    """The report's latency: the median ms of :mod:`onnxpipe.core.timing`'s loop (the one ``bench``
    reports as p50), in ``device``'s session setup (default: a CPU session with ONNX Runtime's defaults)."""
    if device is None:
        return latency_ms(model, feeds, budget_s=budget_s)["median_ms"]
    from onnxpipe.runtimes.device_session import DeviceSession

    with DeviceSession(model, device) as s:
        return time_session(s, feeds, budget_s=budget_s).median_ms


def optimize(
    model: onnx.ModelProto | str | os.PathLike,
    passes: Sequence[PassSpec],
    *,
    check_inputs: Sequence[Mapping[str, np.ndarray]] | None = None,
    calibration: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None,
    evaluation: tuple[dict[str, np.ndarray], np.ndarray] | None = None,
    metric: str | Callable | None = None,
    outdir: str | os.PathLike | None = None,
    measure_latency: bool = True,
    latency_device: Device | str | None = None,
    on_event: Callable[[str, Stage | None], None] | None = None,
    objective: Objective | str | None = None,
) -> PipelineResult:
    """Run ``passes`` in order; after each, compare the model before and after on the same inputs.

    A pass whose result is not a valid graph, that ONNX Runtime refuses, or whose outputs differ
    beyond the pass's tolerance is rolled back: the pipeline goes on from the last good model
    and the stage says why. A pass raising :class:`OnnxpipeError` (bad options, missing data)
    stops the run: that is the user's to fix, not something to roll back quietly.

    Args:
        model: the input model (path or proto).
        passes: pass names, ``{name: options}`` mappings, or :class:`Pass` objects.
        check_inputs: input batches for the checks; default: two calibration batches, else
            generated inputs.
        calibration: a callable returning an iterable of input batches (quantization, pruning).
        evaluation: ``(inputs, labels)`` to score every kept stage with ``metric``.
        metric: ``top1``, ``top5``, ``file.py:function`` or a callable ``(outputs, labels) -> float``.
        outdir: where to write ``stages/NN-<pass>.onnx`` for every stage.
        measure_latency: time every kept stage (median ms on the first check batch).
        latency_device: the CPU device whose session setup those timings use (a recipe's tuned
            one, e.g. ``cpu:0[threads=2,spinning=false]``); default: ONNX Runtime's defaults.
        on_event: progress callback ``(message, stage or None)``.
        objective: what the run optimizes (:class:`onnxpipe.pipeline.objective.Objective`, or a goal
            name for ``cpu`` at batch 1). After a pass passes its check, the model before and after it
            is measured side by side on the objective's device; a stage that makes the objective worse
            beyond noise, or drops the metric by more than ``max_drop`` from the input model, is rolled
            back with both numbers, unless the pass was given ``keep: true``.
    """
    from onnxpipe.core.metrics import bind, evaluate, resolve
    from onnxpipe.pipeline.objective import Objective, judge_stage, measure_one, timing_feeds

    # a model with external data stays on disk: passes read (and sessions memory-map) only what they need
    current = load_model(model, load_external_data=False) if not isinstance(model, onnx.ModelProto) else model
    keeps = [split_keep(p)[1] for p in passes]
    pass_objs = [make_pass(p) for p in passes]
    goal = Objective.parse(objective) if objective is not None else None
    timed = goal is not None and goal.goal != "size"
    notify = on_event or (lambda msg, stage: None)
    generated = False
    if check_inputs is None:
        from onnxpipe.core.data import take

        check_inputs = take(calibration, 2) if calibration is not None else []
        if not check_inputs:
            check_inputs, generated = generated_inputs(current), True
    inputs = [dict(b) for b in check_inputs]
    metric_fn = resolve(metric) if (metric is not None and evaluation is not None) else None
    stage_dir = Path(outdir) / "stages" if outdir is not None else None

    def score(stage: Stage, m: onnx.ModelProto) -> None:
        if metric_fn is not None and stage.metric is None:
            stage.metric = evaluate(m, evaluation[0], evaluation[1], metric_fn)
        if measure_latency and not (timed and stage.latency_ms is not None):
            stage.latency_ms = stage_latency_ms(m, inputs[0], latency_device, budget_s=0.5)
            step = decoder_feeds(m, 1, DECODE_CONTEXT, 1, np.random.default_rng(0))
            if step is not None:  # a KV-cache decoder: one generated token per run, as generate decodes
                stage.tokens_per_s = 1000.0 / stage_latency_ms(m, step, latency_device, budget_s=0.5)

    def save(stage: Stage, m: onnx.ModelProto, suffix: str = "") -> None:
        if stage_dir is not None:
            path = stage_dir / f"{stage.index:02d}-{stage.name}{suffix}.onnx"
            save_model(m, path)
            stage.path = str(path)

    # the reference first: inputs the model cannot run on are the user's to fix, before any timing
    reference = reference_outputs(current, inputs) if generated else outputs_on(current, inputs)
    first = Stage(0, "input", "input model", kept=True)
    feeds = timing_feeds(current, inputs, goal.batch_size) if goal is not None else {}
    if goal is not None:
        value = measure_one(current, feeds, goal)
        first.objective = {"goal": goal.goal, "unit": goal.unit, "after": value}
        if goal.goal == "latency":
            first.latency_ms = value
    fill_stats(first, current)
    score(first, current)
    save(first, current)
    stages = [first]
    notify("input model", first)
    with tempfile.TemporaryDirectory(prefix="onnxpipe-pass-") as scratch:
        for index, p in enumerate(pass_objs, start=1):
            stage = Stage(index, p.name, repr(p), kept=False, keep=keeps[index - 1])
            stage.atol, stage.rtol = p.tolerance
            notify(f"running {p!r}", None)
            work = Path(scratch) / f"{index:02d}"
            work.mkdir()
            ctx = PassContext(check_inputs=inputs, calibration=calibration, evaluation=evaluation,
                              metric=bind(metric_fn, evaluation[0], evaluation[1]) if metric_fn else None,
                              workdir=work,
                              log=lambda line: notify(line, None), measure_latency=measure_latency,
                              reference=reference)
            trial = try_pass(p, stage, current, inputs, reference, ctx)
            candidate = trial.model
            new_feeds = feeds
            if stage.reason is None and candidate is not None:
                stage.why = "passed its check" + (f" (max diff {stage.max_abs:.2g})" if stage.max_abs is not None else "")
                if goal is not None:
                    new_feeds = fit_inputs(candidate, [feeds])[0]
                    judge_stage(stage, goal, current, candidate, feeds, new_feeds, first.metric,
                                (lambda m: evaluate(m, evaluation[0], evaluation[1], metric_fn)) if metric_fn else None)
            if stage.reason is None and candidate is not None:
                stage.kept = True
                stage.op_delta = op_delta(current, candidate)
                current, inputs, reference, feeds = candidate, trial.inputs, trial.outputs, new_feeds
                fill_stats(stage, current)
                score(stage, current)
                save(stage, current)
            else:
                stage.why = None  # rolled back: stage.reason says why
                fill_stats(stage, current)
                if candidate is not None:
                    save(stage, candidate, ".rejected")
            stages.append(stage)
            trial = candidate = None  # a rolled-back model goes before the next pass runs
            notify(f"{p.name}: {'kept' if stage.kept else 'rolled back: ' + str(stage.reason)}"
                   + (f" (warning: {stage.notes['warning']})" if stage.notes.get("warning") else ""), stage)
    return PipelineResult(current, stages, metric if isinstance(metric, str) else getattr(metric, "__name__", None),
                          goal)


@dataclass
class RunResult:
    """What ``run`` wrote and measured."""

    outdir: Path
    pipeline: PipelineResult
    conversion: Any
    validation: list[dict[str, Any]]

    @property
    def model_path(self) -> Path:
        return self.outdir / "model.onnx"


def run(recipe: Any, outdir: str | os.PathLike | None = None, *, console: Any = None) -> RunResult:
    """Convert, run the passes, validate and write the report, as a recipe says.

    Writes ``stages/NN-<pass>.onnx``, ``model.onnx``, ``report.json``, ``report.md`` and
    ``report.png`` to ``outdir`` (default: the recipe's ``output``, else ``runs/<recipe name>``).

    Example:
        >>> result = onnxpipe.run("models/digits_cnn/pipeline.yaml")  # doctest: +SKIP
    """
    import shutil

    from rich.console import Console

    from onnxpipe.pipeline.recipe import Recipe, load_recipe

    r: Recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    console = console or Console(stderr=True)
    default_out = Path("runs") / (Path(recipe).stem if isinstance(recipe, (str, os.PathLike)) else "run")
    out = Path(outdir or r.output or default_out)
    if out.exists() and not out.is_dir():
        raise InputError(f"the output {out} is a file", hint="give a folder with -o (or the recipe's output:)")
    fresh = not out.exists()  # created by this run: removed again if the run fails on its input
    try:
        return _run(r, out, console)
    except OnnxpipeError as exc:
        if fresh and exc.exit_code == 2:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run(r: Any, out: Path, console: Any) -> RunResult:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from onnxpipe.converter import convert
    from onnxpipe.converter.hf_common import copy_generation_files
    from onnxpipe.core import data as data_mod
    from onnxpipe.core.files import write_json, write_text
    from onnxpipe.pipeline import report
    from onnxpipe.pipeline.recipe import resolve_path

    calibration = (data_mod.calibration_source(resolve_path(r, r.data.calibration), batch_size=r.data.batch_size)
                   if r.data.calibration else None)
    evaluation = (data_mod.evaluation_source(resolve_path(r, r.data.evaluation), model=resolve_path(r, r.model.source))
                  if r.data.evaluation else None)
    total = len(r.passes) + 2
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("converting", total=total)
        m = r.model
        conversion = convert(resolve_path(r, m.source), framework=m.framework, inputs=m.inputs,
                             dynamic_batch=m.dynamic_batch, opset=m.opset, atol=m.atol, rtol=m.rtol, check=m.check,
                             task=m.task, trust=m.trust)
        progress.advance(task)

        def on_event(message: str, stage: Stage | None) -> None:
            progress.update(task, description=message)
            if stage is not None and stage.index > 0:
                progress.advance(task)
                console.print(f"{stage.index:02d} {stage.name}: " + ("kept" if stage.kept else f"[red]rolled back[/]: {stage.reason}"))
                if stage.notes.get("warning"):
                    console.print(f"[yellow]warning[/]: {stage.notes['warning']}")

        check_inputs = data_mod.take(calibration, r.data.check_batches) if calibration else None
        tuned_cpu = None
        if r.runtime:  # stage latencies in the tuned CPU setup: what the deployment will run
            from onnxpipe.runtimes.tuned import load_tuned

            tuned_cpu = next((d for d in load_tuned(resolve_path(r, r.runtime)).devices() if d.kind == "cpu"), None)
        result = optimize(conversion.model, r.passes, check_inputs=check_inputs, calibration=calibration,
                          evaluation=evaluation, metric=r.validate_.metric if evaluation else None,
                          outdir=out, measure_latency=r.validate_.latency, latency_device=tuned_cpu,
                          on_event=on_event, objective=r.objective_for_run())
        progress.update(task, description="validating on " + ", ".join(r.validate_.providers))
        inputs = check_inputs or generated_inputs(result.model)
        validation = validate_providers(result.model, r.validate_.providers, fit_inputs(result.model, inputs),
                                        atol=r.validate_.atol, rtol=r.validate_.rtol)
        progress.advance(task)
    save_model(result.model, out / "model.onnx")
    if hasattr(conversion, "write_side_files"):  # a Hugging Face source: tokenizer, configs, genai_config.json
        conversion.write_side_files(out)
    elif str(resolve_path(r, r.model.source)).endswith(".onnx"):  # a model of an already converted generation folder
        copy_generation_files(resolve_path(r, r.model.source), out / "model.onnx")
    doc = {"recipe": r.model_dump(mode="json", by_alias=True), "conversion": conversion.as_dict(),
           **result.as_dict(), "validation": validation}
    write_json(doc, out / "report.json")
    write_text(report.markdown(result.stages, result.metric_name, objective=result.objective), out / "report.md")
    report.chart(result.stages, out / "report.png", result.metric_name)
    console.print(report.table(result.stages, result.metric_name, title=f"onnxpipe run -> {out}"))
    for row in validation:
        console.print(f"validate on {row['provider']}: " + ("[green]ok[/]" if row["ok"] else "[red]FAILED[/]"))
    return RunResult(out, result, conversion, validation)
