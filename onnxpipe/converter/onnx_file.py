"""An existing ``.onnx``: checked, shape-inferred, optionally moved to another opset."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxpipe.converter.base import Attempt, ExportOutcome, FrameworkModel, first_line
from onnxpipe.converter.source import examples_from_specs
from onnxpipe.errors import ConversionError, InputError
from onnxpipe.modelio import check_model, load_model
from onnxpipe.tensors import InputSpec, concrete_shape, graph_inputs, random_input


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default (``ai.onnx``) domain."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def example_inputs(model: onnx.ModelProto, specs: Sequence[InputSpec] = (), *, batch: int = 1,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for every graph input: from ``--input`` specs where given, generated elsewhere."""
    rng = np.random.default_rng(seed)
    given = examples_from_specs(specs, rng)
    infos = graph_inputs(model)
    unknown = sorted(set(given) - {i.name for i in infos})
    if unknown:
        raise InputError(f"--input names {', '.join(unknown)} are not inputs of the model",
                         hint=f"its inputs are {', '.join(i.name for i in infos)}")
    out = {}
    for info in infos:
        if info.name in given:
            out[info.name] = given[info.name]
        else:
            out[info.name] = random_input(info, concrete_shape(info, batch), rng)
    return out


def load(path: Path, specs: Sequence[InputSpec]) -> FrameworkModel:
    model = load_model(path)
    check_model(model, what=str(path))
    inputs = example_inputs(model, specs)

    from onnxpipe.runtimes.session import Session

    session = Session(model)

    def reference(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(session.run(feeds).values())

    return FrameworkModel("onnx", "onnx", model, inputs, reference, list(session.output_names))


def export(fm: FrameworkModel, *, opset: int | None, dynamic_batch: bool) -> ExportOutcome:
    """Opset conversion if asked; ``dynamic_batch=False`` fixes symbolic batch axes to the example's."""
    model: onnx.ModelProto = fm.obj
    steps = []
    if not dynamic_batch:
        model, fixed = _static_batch(model, fm.inputs)
        if fixed:
            steps.append(f"batch fixed for {', '.join(fixed)}")
    current = default_opset(model)
    if opset is None or opset == current:
        return ExportOutcome(model, "onnx (" + ("; ".join(steps) or "unchanged") + ")", [])
    start = time.perf_counter()
    try:
        converted = convert_opset(model, opset)
    except Exception as exc:
        raise ConversionError(f"cannot convert the model from opset {current} to {opset} ({first_line(exc)})",
                              hint="keep its opset (omit --opset) or pick another") from exc
    return ExportOutcome(converted, f"onnx.version_converter ({current} -> {opset})",
                         [Attempt("version_converter", time.perf_counter() - start)])


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Convert the default domain to ``opset`` with onnx's version converter."""
    from onnx import version_converter

    return version_converter.convert_version(model, opset)


def _static_batch(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, list[str]]:
    from onnxpipe.passes.fix_shapes import FixShapes
    from onnxpipe.passes.base import PassContext
    from onnxpipe.tensors import batched_inputs

    batched, batch = batched_inputs(inputs)
    shapes = {}
    for info in graph_inputs(model):
        if info.name in batched and info.shape and not (isinstance(info.shape[0], int) and info.shape[0] > 0):
            shapes[info.name] = [batch] + list(inputs[info.name].shape[1:])
    if not shapes:
        return model, []
    return FixShapes({"inputs": shapes}).apply(model, PassContext()).model, sorted(shapes)
