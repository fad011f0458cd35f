"""What weight-only quantization takes: MatMuls with constant weights, the LM head, nodes by name.

Split out of ``quant_weight_only`` (the pass); the by-weight path and the budget use them too.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from onnxpipe.core.graph import all_graphs, subgraphs

SHAPE_OPS = {"Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Add", "Mul", "Div",
             "Tanh", "Softcap", "Slice", "Gather", "Concat", "Split"}


def weight_matmuls(model: onnx.ModelProto) -> dict[str, str]:
    """``{node name: weight initializer}`` of the top graph's MatMuls with a constant 2-D (or [1.., K, N]) weight."""
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits:
            dims = list(inits[n.input[1]].dims)
            if len(dims) >= 2 and all(d == 1 for d in dims[:-2]) and inits[n.input[1]].data_type in (
                    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
                out[n.name] = n.input[1]
    return out


def lm_head(model: onnx.ModelProto) -> str | None:
    """The MatMul that computes the logits: walking back from the ``logits`` output (or the first
    output) through reshapes, casts and scalings to the first MatMul with a constant weight."""
    graph = model.graph
    if not graph.output:
        return None
    out = next((o.name for o in graph.output if "logits" in o.name.lower()), graph.output[0].name)
    producer = {o: n for n in graph.node for o in n.output if o}
    weights = weight_matmuls(model)
    frontier, seen = [out], set()
    while frontier:
        tensor = frontier.pop(0)
        node = producer.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.name in weights:
            return node.name
        if node.op_type in SHAPE_OPS or node.op_type == "MatMul":
            frontier.extend(i for i in node.input if i)
    return None


def nested_nodes(model: onnx.ModelProto, op_types: Iterable[str] = ("MatMul", "Gather")) -> int:
    """Nodes of ``op_types`` inside subgraphs (If/Loop bodies): ORT's quantizers take them, quantizing by
    weight (:mod:`onnxpipe.passes.quant_by_weight`) does not, so such a model goes to the whole-model run."""
    wanted = set(op_types)
    return sum(n.op_type in wanted for depth, g in enumerate(all_graphs(model.graph)) if depth for n in g.node)


def name_nodes(model: onnx.ModelProto) -> None:
    """Every node gets a unique name: exclusions, the quantizer's ``<name>_Q4`` and the budget work by name."""
    graphs = [model.graph]
    seen: set[str] = set()
    while graphs:
        g = graphs.pop()
        for i, node in enumerate(g.node):
            if not node.name or node.name in seen:
                base = node.name or f"{node.op_type}_{i}"
                name, k = base, 0
                while name in seen:
                    k += 1
                    name = f"{base}_{k}"
                node.name = name
            seen.add(node.name)
            graphs.extend(subgraphs(node))
