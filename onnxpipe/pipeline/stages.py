"""One stage of a pipeline run: what a pass did, the model's figures after it, and the helpers that
build and feed the passes."""

from __future__ import annotations

import contextlib
import io
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxpipe.core import external
from onnxpipe.core.analysis import parameter_count
from onnxpipe.core.compare import Comparison, outputs_on
from onnxpipe.core.errors import InputError, OnnxpipeError, RunFailedError
from onnxpipe.core.inputs import decoder_feeds, example_inputs, input_hints
from onnxpipe.core.modelio import EXTERNAL_DATA_THRESHOLD, run_checker, tensor_bytes
from onnxpipe.core.tensors import graph_inputs, random_like
from onnxpipe.core.units import human_bytes
from onnxpipe.core.userfiles import first_line
from onnxpipe.passes import get_pass
from onnxpipe.passes.base import Pass, PassContext, apply_pass
from onnxpipe.passes.simplify import count_nodes

PassSpec = str | Pass | Mapping[str, Any] | tuple[str, Mapping[str, Any]]


@dataclass
class Stage:
    """One row of the report: a pass (or the input model) and what it did."""

    index: int
    name: str
    description: str
    kept: bool
    reason: str | None = None
    seconds: float = 0.0
    nodes: int = 0
    params: int = 0
    size_bytes: int = 0
    op_delta: dict[str, int] = field(default_factory=dict)
    max_abs: float | None = None
    max_rel: float | None = None
    atol: float | None = None
    rtol: float | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    metric: float | None = None
    latency_ms: float | None = None
    tokens_per_s: float | None = None  # KV-cache decoders: one-token steps at batch 1 after a 64-token cache
    notes: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    objective: dict[str, Any] | None = None
    """The objective before and after this stage (:class:`onnxpipe.pipeline.objective.Measurement`), or its value."""
    why: str | None = None
    """Why a kept stage was kept (its check, the objective, or ``keep: true``)."""
    keep: bool = False

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "comparisons"}
        d["comparisons"] = [c.as_dict() for c in self.comparisons]
        return _jsonable(d)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


@dataclass
class PipelineResult:
    """The final model and a stage per pass (stage 0 is the input model)."""

    model: onnx.ModelProto
    stages: list[Stage]
    metric_name: str | None = None
    objective: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric_name, "objective": self.objective.as_dict() if self.objective else None,
                "stages": [s.as_dict() for s in self.stages]}


def split_keep(spec: PassSpec) -> tuple[PassSpec, bool]:
    """``{quantize: {...}, keep: true}`` -> ``({quantize: {...}}, True)``; other specs keep ``False``.

    ``keep`` sits beside the pass name, not among its options: the pipeline keeps such a stage
    whatever the objective says (never when its correctness check fails).

    Example:
        >>> split_keep({"strip": {}, "keep": True})
        ({'strip': {}}, True)
    """
    if isinstance(spec, Pass):
        return spec, bool(getattr(spec, "keep", False))
    if isinstance(spec, Mapping) and "keep" in spec and len(spec) == 2:
        keep = spec["keep"]
        rest = {k: v for k, v in spec.items() if k != "keep"}
        if not isinstance(keep, bool):
            raise InputError(f"keep: must be true or false, received {keep!r} beside pass {next(iter(rest))!r}",
                             hint="write - {quantize: {mode: static}, keep: true}")
        return rest, keep
    return spec, False


def make_pass(spec: PassSpec) -> Pass:
    """``"simplify"``, ``{"fp16": {...}}``, ``("opset", {"version": 17})`` or a Pass -> a Pass."""
    spec, _ = split_keep(spec)
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, str):
        return get_pass(spec)({})
    if isinstance(spec, tuple):
        name, cfg = spec
        return get_pass(name)(cfg or {})
    if isinstance(spec, Mapping) and len(spec) == 1:
        (name, cfg), = spec.items()
        return get_pass(name)(cfg or {})
    raise OnnxpipeError(f"cannot read pass {spec!r}", hint="write a pass as a name, or {name: {options}}")


def generated_inputs(model: onnx.ModelProto, batches: int = 2, batch: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random inputs of the right shapes and dtypes, for models with no data to check on.

    A KV-cache decoder gets consistent steps instead (:func:`decoder_feeds`): prompts with an empty
    cache and single tokens after a filled one, in turn.
    """
    rng = np.random.default_rng(seed)
    steps = [decoder_feeds(model, batch, *((0, 8) if k % 2 == 0 else (8, 1)), rng) for k in range(batches)]
    if all(s is not None for s in steps):
        return steps  # type: ignore[return-value]
    return [example_inputs(model, batch=batch, seed=seed + k) for k in range(batches)]


def reference_outputs(model: onnx.ModelProto, inputs: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs on generated inputs; a model that cannot run on them is the user's to feed.

    Raises:
        InputError: one line naming the inputs generated values could not satisfy (integer ones
            first: an index, a size) and asking for real data.
    """
    try:
        return outputs_on(model, inputs)
    except RunFailedError as exc:
        infos = graph_inputs(model)
        hints = input_hints(model)
        suspects = ([i.name for i in infos if not np.issubdtype(i.dtype, np.floating) and i.name not in hints]
                    or [i.name for i in infos if not np.issubdtype(i.dtype, np.floating)]
                    or [i.name for i in infos])
        raise InputError(f"the model does not run on generated inputs ({first_line(exc.__cause__ or exc)[:160]}); "
                         f"input(s) {', '.join(suspects)} need real values",
                         hint="give data: data.calibration in the recipe, or --data") from exc


def fit_inputs(model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Adapt check inputs to a model whose input shapes were fixed by a pass.

    Inputs that fit stay as they are; a batch axis that became smaller is sliced; anything else
    is redrawn at the new shape from the old values' range, so both models can run it.
    """
    infos = {i.name: i for i in graph_inputs(model)}
    rng = np.random.default_rng(0)
    out = []
    for b in batches:
        fitted = {}
        for name, arr in b.items():
            info = infos.get(name)
            if info is None or info.shape is None or len(info.shape) != arr.ndim:
                fitted[name] = arr
                continue
            want = [d if isinstance(d, int) and d > 0 else a for d, a in zip(info.shape, arr.shape)]
            if list(arr.shape) == want:
                fitted[name] = arr
            elif list(arr.shape[1:]) == want[1:] and want[0] <= arr.shape[0]:
                fitted[name] = arr[: want[0]]
            else:
                fitted[name] = random_like(arr, want, rng)
        out.append(fitted)
    return out


def fill_stats(stage: Stage, model: onnx.ModelProto) -> None:
    """Nodes, parameters and bytes of ``model`` into ``stage``."""
    stage.nodes = count_nodes(model)
    stage.params = parameter_count(model)
    on_disk = external.lazy_bytes(model)
    stage.size_bytes = (model.ByteSize() + on_disk if on_disk or tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD
                        else tensor_bytes(model))


def same_inputs(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> bool:
    """Whether two lists of input batches hold the same arrays (the reference outputs still apply)."""
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k] is y[k] or np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@dataclass
class Trial:
    """What one pass produced: the candidate model (None when the pass raised), the check inputs
    fitted to it, and the candidate's outputs on them."""

    model: onnx.ModelProto | None = None
    inputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)


def try_pass(p: Pass, stage: Stage, current: onnx.ModelProto, inputs: list[dict[str, np.ndarray]],
             reference: list[dict[str, np.ndarray]], ctx: PassContext) -> Trial:
    """Apply ``p`` to ``current`` and check the result: a valid graph that ONNX Runtime loads and
    whose outputs the pass's ``compare`` accepts. Fills ``stage`` (notes, comparisons, time, and
    ``reason`` when it must be rolled back). A pass raising :class:`OnnxpipeError` (other than
    ORT refusing the result) propagates: bad options are the user's to fix."""
    start = time.perf_counter()
    trial = Trial()
    on_disk = external.lazy_bytes(current)
    try:
        if on_disk and not p.lazy:  # apply_pass gives it a copy with the weights read in
            ctx.log(f"{p.name}: reading {human_bytes(on_disk)} of weights into memory (the pass needs their bytes)")
        with contextlib.redirect_stdout(io.StringIO()):
            result = apply_pass(p, current, ctx)
        stage.notes = dict(result.notes)
        rejected = result.rejected
        # a pass that changed nothing leaves the model on disk as it is (not a copy with the weights read in)
        trial.model = current if (on_disk and not result.modified) else result.model
        del result
        if on_disk:  # weights the pass made stay on disk too: one copy of a weight in memory at a time
            trial.model = external.spill(trial.model)
        run_checker(trial.model)
        trial.inputs = fit_inputs(trial.model, inputs)
        before = reference if same_inputs(trial.inputs, inputs) else outputs_on(current, trial.inputs)
        trial.outputs = outputs_on(trial.model, trial.inputs)
        stage.comparisons = p.compare(before, trial.outputs)
        if rejected:
            stage.reason = rejected
        elif p.structural and parameter_count(trial.model) > parameter_count(current):
            stage.reason = (f"{p.name} would add parameters ({parameter_count(current):,} -> "
                            f"{parameter_count(trial.model):,}); a structural pass never grows the model")
    except RunFailedError as exc:  # the result (or the pass's own probe) does not run: roll back
        stage.reason = f"pass failed: {exc.message}"
    except OnnxpipeError as exc:
        if "ONNX Runtime cannot load" not in exc.message:
            raise
        stage.reason = f"ONNX Runtime refuses the result: {exc.message}"
    except onnx.checker.ValidationError as exc:
        stage.reason = f"invalid graph: {first_line(exc)}"
    except Exception as exc:  # a broken pass is rolled back, never fatal
        stage.reason = f"pass failed: {first_line(exc)}"
    stage.seconds = time.perf_counter() - start
    if stage.comparisons:
        stage.max_abs = max(c.max_abs for c in stage.comparisons)
        stage.max_rel = max(c.max_rel for c in stage.comparisons)
        bad = [c for c in stage.comparisons if not c.ok]
        if bad and stage.reason is None:
            worst = max(bad, key=lambda c: c.max_abs)
            stage.reason = (f"output {worst.name} differs by {worst.max_abs:.3g} "
                            f"(atol={stage.atol:g}, rtol={stage.rtol:g}, "
                            f"{worst.mismatched:.1%} of elements out of tolerance)"
                            + (f"; {worst.detail}" if worst.detail else ""))
    return trial


def op_delta(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, int]:
    """How the count of each op type changed (main graph), changed ones only."""
    old = Counter(n.op_type for n in before.graph.node)
    new = Counter(n.op_type for n in after.graph.node)
    return {op: new[op] - old[op] for op in set(new) | set(old) if new[op] != old[op]}
