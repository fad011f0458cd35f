"""An existing ``.onnx``: checked, shape-inferred, optionally moved to another opset."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxpipe.converter.base import Attempt, ExportOutcome, FrameworkModel
from onnxpipe.core import external
from onnxpipe.core.errors import ConversionError
from onnxpipe.core.graph import convert_opset, default_opset
from onnxpipe.core.inputs import example_inputs
from onnxpipe.core.modelio import check_model, load_model
from onnxpipe.core.tensors import InputSpec, graph_inputs
from onnxpipe.core.userfiles import first_line


def load(path: Path, specs: Sequence[InputSpec]) -> FrameworkModel:
    model = load_model(path, load_external_data=False)  # weights in external data stay on disk
    check_model(model, what=str(path))
    inputs = example_inputs(model, specs)

    from onnxpipe.core.session import Session

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
        converted = external.with_weights_if_needed(lambda m: convert_opset(m, opset), model)
    except Exception as exc:
        raise ConversionError(f"cannot convert the model from opset {current} to {opset} ({first_line(exc)})",
                              hint="keep its opset (omit --opset) or pick another") from exc
    return ExportOutcome(converted, f"onnx.version_converter ({current} -> {opset})",
                         [Attempt("version_converter", time.perf_counter() - start)])


def _static_batch(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, list[str]]:
    from onnxpipe.core.tensors import batched_inputs
    from onnxpipe.passes.base import PassContext
    from onnxpipe.passes.fix_shapes import FixShapes

    batched, batch = batched_inputs(inputs)
    shapes = {}
    for info in graph_inputs(model):
        if info.name in batched and info.shape and not (isinstance(info.shape[0], int) and info.shape[0] > 0):
            shapes[info.name] = [batch] + list(inputs[info.name].shape[1:])
    if not shapes:
        return model, []
    return FixShapes({"inputs": shapes}).apply(model, PassContext()).model, sorted(shapes)
