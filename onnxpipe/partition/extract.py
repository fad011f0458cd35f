"""Turn a cut plan into stage models: each a valid ONNX model with its own inputs, outputs and weights.

A stage's inputs are the tensors its nodes (and their subgraphs) read that an earlier stage or
the caller provides; its outputs are the tensors it computes that a later stage reads or the
whole model returns. Initializers are copied into every stage that reads them (a weight shared
across a cut is duplicated), and so are input-less ``Constant`` nodes. Types and shapes of the
new inputs and outputs come from shape inference on the whole model (symbolic dims kept), or
from one ONNX Runtime run where inference says nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxpipe.core.errors import OnnxpipeError
from onnxpipe.partition.cut import CutPlan, free_tensors
from onnxpipe.partition.profile import GraphProfile


@dataclass
class Stage:
    """One stage model and its interface.

    Attributes:
        model: the stage as a standalone ONNX model.
        inputs: names it needs (graph inputs of the whole model, or earlier stages' outputs).
        outputs: names it computes for later stages or as the whole model's outputs.
        nodes: positions of its nodes in the profile.
    """

    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    nodes: list[int]


def _declared_types(profile: GraphProfile) -> dict[str, onnx.ValueInfoProto]:
    """Value infos of the whole (symbolic) model, after shape inference where it works."""
    model = profile.model
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # best effort: ORT provides types below
        inferred = model
    g = inferred.graph
    found = {vi.name: vi for vi in (*g.value_info, *g.input, *g.output)
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type or not vi.type.HasField("tensor_type")}
    return found


def _runtime_types(profile: GraphProfile, names: Sequence[str]) -> dict[str, onnx.ValueInfoProto]:
    """Element types and ranks of ``names`` from one ORT run on random inputs (dims left unnamed)."""
    from onnxpipe.core.inputs import generated_feeds
    from onnxpipe.core.session import Session

    model = onnx.ModelProto()
    model.CopyFrom(profile.model)
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    rng = np.random.default_rng(0)
    try:
        feeds = generated_feeds(model, 1, rng)
        with Session(model, optimization="disable") as s:
            values = s.run(feeds, outputs=list(names))
    except Exception as exc:  # ORT raises its own types
        raise OnnxpipeError(f"cannot find the types of the tensors crossing the cuts ({str(exc).splitlines()[0]})",
                            hint="run `onnxpipe optimize` with simplify first, so shapes can be inferred") from exc
    out = {}
    for name, v in values.items():
        arr = np.asarray(v)
        elem = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        out[name] = onnx.helper.make_tensor_value_info(name, elem, [None] * arr.ndim)
    return out


def build_stages(profile: GraphProfile, plan: CutPlan) -> list[Stage]:
    """The stage models of ``plan``, in order.

    Example:
        >>> [s.inputs for s in build_stages(profile, find_cuts(profile, 2))]  # doctest: +SKIP
        [['x'], ['r']]
    """
    model, g = profile.model, profile.model.graph
    inits = {i.name: i for i in g.initializer}
    free = free_tensors(profile)
    const_node = {o: i for i, n in enumerate(profile.nodes) if any(x in free for x in n.output) for o in n.output}
    final = set(profile.outputs)
    sparse = {s.values.name for s in g.sparse_initializer}
    k_stages = len(plan.bounds) - 1
    members = [plan.stage_nodes(k) for k in range(k_stages)]
    reads_after: list[set[str]] = [set() for _ in range(k_stages)]
    acc: set[str] = set(final)
    for k in range(k_stages - 1, -1, -1):
        reads_after[k] = set(acc)
        acc |= {t for i in members[k] for t in profile.reads[i]}
    interfaces: list[tuple[list[int], list[str], list[str]]] = []
    for k, nodes in enumerate(members):
        own = set(nodes)
        produced = {o for i in nodes for o in profile.nodes[i].output if o}
        copies = sorted({const_node[t] for i in nodes for t in profile.reads[i]
                         if t in const_node and const_node[t] not in own})
        body = sorted(copies) + list(nodes) if copies else list(nodes)
        produced |= {o for i in copies for o in profile.nodes[i].output if o}
        needed = list(dict.fromkeys(t for i in nodes for t in profile.reads[i] if t not in produced and t not in sparse))
        outs = [t for i in nodes for t in profile.nodes[i].output if t and t in reads_after[k] and t not in free]
        # the whole model's outputs in its own order when this stage computes them
        outs = list(dict.fromkeys([t for t in profile.outputs if t in outs] + outs))
        interfaces.append((body, needed, outs))
    declared = _declared_types(profile)
    io_names = {t for _, ins, outs in interfaces for t in (*ins, *outs)}
    unknown = sorted(t for t in io_names if t not in declared)
    if unknown:
        declared.update(_runtime_types(profile, unknown))
    stages = []
    for k, (body, ins, outs) in enumerate(interfaces):
        weights = list(dict.fromkeys(w for i in body for w in profile.weights[i]))
        graph = onnx.helper.make_graph(
            [profile.nodes[i] for i in body], f"{g.name or 'model'}_part{k}",
            [_value_info(declared, t) for t in ins], [_value_info(declared, t) for t in outs],
            [_raw(inits[w]) for w in weights])
        part = onnx.helper.make_model(graph, opset_imports=model.opset_import, producer_name="onnxpipe split")
        part.ir_version = max(model.ir_version, 4)  # initializers that are not inputs need IR >= 4
        part.functions.extend(model.functions)
        part.graph.sparse_initializer.extend(s for s in g.sparse_initializer
                                             if s.values.name in {t for i in body for t in profile.reads[i]} & sparse)
        stages.append(Stage(part, ins, outs, [i for i in body if i in set(members[k])]))
    return stages


def _raw(t: onnx.TensorProto) -> onnx.TensorProto:
    """``t`` with its values in ``raw_data``: only those move to the part's external data file."""
    if t.HasField("raw_data") or t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING:
        return t
    return onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name)


def _value_info(declared: dict[str, onnx.ValueInfoProto], name: str) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto()
    vi.CopyFrom(declared[name])
    return vi
