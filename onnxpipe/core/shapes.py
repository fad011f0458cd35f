"""Shape resolution: concrete input shapes, ONNX shape inference on a light copy, and ONNX Runtime
for what inference cannot size. Cost analysis (:mod:`.analysis`) and graph profiling
(:mod:`onnxpipe.partition.profile`) both stand on it.

Example:
    >>> concrete, notes = concrete_inputs(model, batch=4, dims={"seq": 128})  # doctest: +SKIP
    >>> work, shapes = infer_shapes(model, concrete, notes)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxpipe.core.errors import InputError
from onnxpipe.core.graph import all_graphs
from onnxpipe.core.inputs import input_hints, random_input
from onnxpipe.core.tensors import concrete_shape, graph_inputs

Shape = tuple[int, ...]


def concrete_inputs(model: onnx.ModelProto, *, batch: int = 1, dims: Mapping[str, int] | None = None,
                    input_shapes: Mapping[str, Sequence[int]] | None = None, strict: bool = True
                    ) -> tuple[dict[str, Shape], list[str]]:
    """Concrete shapes of the graph inputs: ``input_shapes`` where given, else symbolic dims resolved
    (first axis ``batch``, named ones from ``dims``, others 1); notes for inputs left unsized.

    Raises:
        InputError: (``strict``) ``input_shapes`` names an unknown input or has a dim <= 0.
    """
    inputs, given = graph_inputs(model), dict(input_shapes or {})
    unknown = sorted(set(given) - {i.name for i in inputs})
    if unknown and strict:
        raise InputError(f"unknown input(s) {', '.join(unknown)}",
                         hint=f"the model's inputs are {', '.join(i.name for i in inputs)}")
    notes: list[str] = []
    concrete: dict[str, Shape] = {}
    for info in inputs:
        if info.name in given:
            concrete[info.name] = tuple(int(d) for d in given[info.name])
            if strict and any(d <= 0 for d in concrete[info.name]):
                raise InputError(f"shape {list(given[info.name])} for input {info.name!r} has a dim <= 0",
                                 hint="dims are positive integers")
        elif info.shape is not None:
            concrete[info.name] = concrete_shape(info, batch, dims)
        else:  # an unshaped tensor, a sequence or a map: its ops stay uncounted unless ORT sizes them
            notes.append(f"input {info.name!r} has no tensor shape; give it with input_shapes to count its ops")
    return concrete, notes


def infer_shapes(model: onnx.ModelProto, concrete: Mapping[str, Shape], notes: list[str], *,
                 what: str = "using ONNX Runtime shapes") -> tuple[onnx.ModelProto, dict[str, Shape]]:
    """ONNX shape inference (with data propagation) on a weight-light copy with concrete inputs:
    the inferred copy and every fully known shape. A failure is noted, never raised."""
    work = concrete_copy(model, concrete, weights=False)
    try:
        work = onnx.shape_inference.infer_shapes(work, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is best effort: the ORT fallback covers what it misses
        notes.append(f"shape inference failed ({type(exc).__name__}); {what}")
    return work, collect_shapes(work)


def concrete_copy(model: onnx.ModelProto, concrete: Mapping[str, Shape], *, weights: bool) -> onnx.ModelProto:
    """A copy with concrete input shapes; without ``weights``, big or external initializers
    become typed inputs so shape inference stays fast and under protobuf's 2 GiB limit."""
    src = model.graph
    out = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions)
    g = out.graph
    g.name = src.name
    for f in ("node", "output", "value_info", "sparse_initializer"):
        getattr(g, f).extend(getattr(src, f))
    typed: dict[str, onnx.ValueInfoProto] = {}
    for init in src.initializer:
        external = init.data_location == onnx.TensorProto.EXTERNAL
        if weights or (not external and init.ByteSize() < 1 << 16):  # small ones may feed shape math
            g.initializer.append(init)
        else:
            typed[init.name] = onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
    for vi in src.input:  # an initializer listed as input (IR < 4) keeps its single declaration
        g.input.append(typed.pop(vi.name, vi))
        if vi.name in concrete:
            g.input[-1].type.tensor_type.shape.ClearField("dim")
            g.input[-1].type.tensor_type.shape.dim.extend(
                onnx.TensorShapeProto.Dimension(dim_value=d) for d in concrete[vi.name])
    g.input.extend(typed.values())
    try:
        return onnx.inliner.inline_local_functions(out) if out.functions else out
    except Exception:  # a broken function: keep the calls, they are reported as uncounted
        return out


def collect_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Fully known shapes of every tensor declared in the model (value_info, inputs, outputs,
    initializers), subgraphs included; a tensor with a symbolic dim is left out."""
    shapes: dict[str, Shape] = {}
    for g in all_graphs(model.graph):
        for vi in (*g.value_info, *g.input, *g.output):
            tt = vi.type.tensor_type
            known = vi.type.HasField("tensor_type") and tt.HasField("shape")
            if known and all(d.HasField("dim_value") for d in tt.shape.dim):  # symbolic dims: not sized
                shapes[vi.name] = tuple(d.dim_value for d in tt.shape.dim)
        shapes.update((init.name, tuple(init.dims)) for init in g.initializer)
    return shapes


def runtime_shapes(model: onnx.ModelProto, concrete: Mapping[str, Shape], names: list[str],
                    notes: list[str]) -> dict[str, Shape]:
    """Shapes of ``names`` read from one ONNX Runtime run on random inputs (empty on failure)."""
    from onnxpipe.core.external import has_external_refs
    from onnxpipe.core.session import Session  # imports onnxruntime: only when needed

    if has_external_refs(model):  # loaded without its weights: running it would read them all
        notes.append(f"{len(names)} tensor(s) left unsized: shape inference could not size them and the model's "
                     "weights (external data) are not read to run it")
        return {}
    full = concrete_copy(model, concrete, weights=True)
    outputs = {o.name for o in full.graph.output}
    full.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in outputs)
    rng = np.random.default_rng(0)
    try:
        hints = input_hints(model)
        feeds = {i.name: random_input(i, concrete[i.name], rng, hints.get(i.name)) for i in graph_inputs(model)}
        with Session(full, optimization="disable") as s:
            values = s.run(feeds, outputs=names)
    except Exception as exc:  # best effort (ORT raises its own types): those ops stay uncounted
        text = str(exc).strip()
        reason = getattr(exc, "message", None) or (text.splitlines()[0] if text else type(exc).__name__)
        notes.append(f"ONNX Runtime could not run the model to size {len(names)} tensor(s): {reason}")
        return {}
    notes.append(f"{len(names)} tensor shape(s) read from an ONNX Runtime run on random inputs")
    return {n: tuple(v.shape) for n, v in values.items() if isinstance(v, np.ndarray)}
