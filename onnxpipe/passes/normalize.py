"""Constants as exporters write them, made plain: the first step of every structural pass.

``torch.onnx.export`` deduplicates equal tensors and hands the copies to their consumers through
``Identity`` nodes; older exporters and tf2onnx write weights as ``Constant`` nodes. A pass that
looks for constant initializers (the pruner's weights, biases, Reshape targets) would call all
of those "computed at run time". :func:`normalize` rewrites them, without changing any value:

- a ``Constant`` node in the main graph becomes an initializer of the same name;
- an ``Identity`` of an initializer is bypassed: its readers read the initializer itself
  (kept when its output is a graph output or read inside a subgraph);
- small shape arithmetic on constants only (the pads TorchScript computes for a
  TensorFlow-style ``Pad``: ConstantOfShape, Concat, Slice, Transpose, Cast ...) is evaluated
  into an initializer, as a simplifier would; weights are never folded (no tensor grows).

Tensors shared by several readers stay shared here; the pass that changes one reader's copy
decides whether the others can follow (the pruner couples them, or gives that reader its own).

Example:
    >>> model, notes = normalize(model)  # doctest: +SKIP
    >>> notes  # doctest: +SKIP
    {'constant_nodes': 3, 'identities': 41, 'folded': 8, 'shared_initializers': 12}
"""

from __future__ import annotations

from collections import Counter

import onnx
from onnx import numpy_helper

_VALUE_ATTRS = {"value", "value_float", "value_floats", "value_int", "value_ints"}


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if len(node.attribute) != 1 or node.attribute[0].name not in _VALUE_ATTRS or not node.output:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        t = onnx.TensorProto()
        t.CopyFrom(attr.t)
    else:
        t = numpy_helper.from_array(_numpy(onnx.helper.get_attribute_value(attr), attr.name))
    t.name = node.output[0]
    return t


def _numpy(value: object, kind: str):
    import numpy as np

    dtype = np.float32 if kind.startswith("value_float") else np.int64
    return np.asarray(value, dtype=dtype)


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read inside any subgraph (If / Loop / Scan bodies), at any depth."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                for n in sub.node:
                    names.update(n.input)
                names |= _subgraph_reads(sub)
    return names


# deterministic ops cheap to evaluate on small constants
_FOLDABLE = set(["Cast", "Reshape", "Transpose", "Slice", "Concat", "ConstantOfShape", "Gather", "Unsqueeze", "Squeeze", "Add", "Sub", "Mul", "Div", "Range", "Equal", "Where", "Expand", "Identity", "Neg", "Floor", "Ceil", "Max", "Min", "Tile", "Abs", "Less", "Greater", "Not", "And", "Or", "Mod", "Sqrt"])
_FOLD_LIMIT = 4096  # elements, per input and output: shapes, pads, axes, never weights


def _fold_constants(model: onnx.ModelProto, inits: set[str], outputs: set[str]) -> int:
    """Evaluate small all-constant nodes into initializers (in graph order, so chains fold)."""
    import numpy as np
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    values = {i.name: i for i in graph.initializer if i.name in inits}
    folded: list[int] = []
    for k, node in enumerate(graph.node):
        if (node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDABLE or not node.input
                or any(n and n not in values for n in node.input) or any(o in outputs for o in node.output)
                or any(math_prod(values[n].dims) > _FOLD_LIMIT for n in node.input if n)):
            continue
        try:
            feeds = {n: numpy_helper.to_array(values[n]) for n in node.input if n}
            tiny = onnx.helper.make_model(
                onnx.helper.make_graph([node], "fold", [onnx.helper.make_tensor_value_info(n, 0, None) for n in feeds],
                                       [onnx.helper.make_tensor_value_info(o, 0, None) for o in node.output]),
                opset_imports=model.opset_import)
            results = ReferenceEvaluator(tiny).run(None, feeds)
        except Exception:  # an op the reference cannot run: leave it to the runtime
            continue
        if any(np.asarray(r).size > _FOLD_LIMIT for r in results):
            continue
        for o, r in zip(node.output, results):
            t = numpy_helper.from_array(np.asarray(r), o)
            graph.initializer.append(t)
            values[o] = t
            inits.add(o)
        folded.append(k)
    for k in reversed(folded):
        del graph.node[k]
    return len(folded)


def math_prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def normalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of ``model`` whose constants are all initializers that readers read directly.

    Returns the copy and counts for the report: Constant nodes turned into initializers,
    Identity nodes bypassed, constant nodes folded, and initializers that more than one node
    input still reads.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    outputs = {o.name for o in graph.output}
    in_subgraphs = _subgraph_reads(graph)
    inits = {i.name for i in graph.initializer}
    n_const = n_ident = 0
    drop: list[int] = []
    rename: dict[str, str] = {}
    for k, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Constant":
            t = _constant_tensor(node)
            if t is not None and t.name not in inits:
                graph.initializer.append(t)
                inits.add(t.name)
                drop.append(k)
                n_const += 1
        elif node.op_type == "Identity" and len(node.input) == 1 and node.output:
            src = rename.get(node.input[0], node.input[0])
            dst = node.output[0]
            if src in inits and dst not in outputs and dst not in in_subgraphs:
                rename[dst] = src
                drop.append(k)
                n_ident += 1
    if rename:
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
    if drop:
        dead = set(rename)
        for k in reversed(drop):
            del graph.node[k]
        keep = [v for v in graph.value_info if v.name not in dead]
        if len(keep) != len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(keep)
    n_fold = _fold_constants(out, inits, outputs)
    _drop_unread(out)
    reads = Counter(name for node in graph.node for name in node.input if name in inits)
    shared = sum(1 for c in reads.values() if c > 1)
    return out, {"constant_nodes": n_const, "identities": n_ident, "folded": n_fold, "shared_initializers": shared}


def _drop_unread(model: onnx.ModelProto) -> None:
    """Initializers nothing reads any more (the inputs of folded nodes)."""
    graph = model.graph
    read = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    read |= _subgraph_reads(graph) | {i.name for i in graph.input}
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name not in read]):
        del graph.initializer[i]
