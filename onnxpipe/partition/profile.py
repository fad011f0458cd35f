"""Per-node facts a partitioner needs: topological order, what each node reads, tensor sizes and FLOPs.

Sizes are for concrete input shapes (a symbolic first axis becomes ``batch``), found the same
way ``onnxpipe inspect`` finds them: ONNX shape inference with data propagation, then one ONNX
Runtime run on random inputs for the tensors inference could not size. A node "reads" its
inputs and every outer-scope name its subgraphs (If branches, Loop/Scan bodies) refer to, so a
cut never strands a value a branch needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxpipe.core.cost import NoShape, graph_cost, node_cost
from onnxpipe.core.errors import InputError
from onnxpipe.core.external import nbytes as tensor_nbytes
from onnxpipe.core.graph import subgraph_inputs, subgraphs, toposort
from onnxpipe.core.shapes import Shape, concrete_inputs, infer_shapes, runtime_shapes
from onnxpipe.core.tensors import graph_inputs


@dataclass
class GraphProfile:
    """A model's main graph as a sequence of nodes with their reads, writes, sizes and costs.

    Attributes:
        model: the model, nodes in topological order (a sorted copy when the input was not sorted).
        nodes: ``model.graph.node`` as a list.
        reads: per node, the non-initializer tensors it needs (subgraph outer-scope names included).
        weights: per node, the initializers it needs.
        producer: tensor name -> index of the node writing it.
        inputs: real graph inputs (initializers excluded); outputs: graph output names.
        nbytes: tensor name -> bytes at the profiled shapes (absent when unknown).
        dtypes: tensor name -> ONNX element type, where known.
        flops: per node FLOPs (If: the costlier branch; Loop/Scan: one iteration of the body).
        init_bytes: initializer name -> bytes.
        batch: the batch the sizes are for.
        shapes: tensor name -> concrete shape, where known.
        notes: what could not be sized or counted.

    Example:
        >>> p = profile_graph(onnx.load("model.onnx"), batch=8)  # doctest: +SKIP
        >>> sum(p.flops), p.nbytes["logits"]  # doctest: +SKIP
    """

    model: onnx.ModelProto
    nodes: list[onnx.NodeProto]
    reads: list[list[str]]
    weights: list[list[str]]
    producer: dict[str, int]
    inputs: list[str]
    outputs: list[str]
    nbytes: dict[str, int]
    dtypes: dict[str, int]
    flops: list[int]
    init_bytes: dict[str, int]
    batch: int
    shapes: dict[str, Shape] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def last_use(self) -> dict[str, int]:
        """Tensor -> index of the last node reading it; graph outputs live to ``len(nodes)``."""
        last: dict[str, int] = {}
        for i, names in enumerate(self.reads):
            for t in names:
                last[t] = i
        for t in self.outputs:
            last[t] = len(self.nodes)
        return last


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    types: dict[str, int] = {}
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for vi in (*g.value_info, *g.input, *g.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        for init in g.initializer:
            types[init.name] = init.data_type
        graphs.extend(s for n in g.node for s in subgraphs(n))
    return types


def _itemsize(elem_type: int) -> int:
    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, ValueError, TypeError):
        return 4


def node_flops(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    """FLOPs of one node by :mod:`onnxpipe.core.analysis`'s rules (its subgraphs included); None if unknown.

    Example:
        >>> node_flops(onnx.helper.make_node("Relu", ["x"], ["y"]), {"y": (2, 3)})
        6
    """
    subs = list(subgraphs(node))
    inner = 0
    if subs:
        costs = [sum(f for _, _, f in graph_cost(g, shapes)[0]) for g in subs]
        inner = max(costs) if node.op_type == "If" else sum(costs)
    try:
        cost = node_cost(node, shapes)
    except (NoShape, IndexError, ValueError, KeyError):
        return None
    return None if cost is None else cost[1] + inner


def profile_graph(model: onnx.ModelProto, *, batch: int = 1, dims: Mapping[str, int] | None = None,
                  input_shapes: Mapping[str, Sequence[int]] | None = None) -> GraphProfile:
    """Order, reads, sizes and FLOPs of every node of ``model``'s main graph at ``batch``.

    Args:
        model: the model (not modified; a sorted copy is made when its nodes are out of order).
        batch: size of symbolic first axes.
        dims: sizes of named symbolic dims; other symbolic dims count as 1.
        input_shapes: whole shapes for some inputs.

    Raises:
        InputError: batch < 1 or a model without nodes.

    Example:
        >>> profile_graph(model, batch=4).flops  # doctest: +SKIP
    """
    if batch < 1:
        raise InputError(f"batch must be >= 1, received {batch}", hint="give a positive batch size")
    if not model.graph.node:
        raise InputError("the model has no nodes", hint="give a model with at least one operator")
    sorted_model = onnx.ModelProto()
    sorted_model.CopyFrom(model)
    toposort(sorted_model.graph)
    g = sorted_model.graph
    notes: list[str] = []
    infos = graph_inputs(sorted_model)
    concrete, _ = concrete_inputs(sorted_model, batch=batch, dims=dims, input_shapes=input_shapes, strict=False)
    work, shapes = infer_shapes(sorted_model, concrete, notes, what="sizes read from ONNX Runtime")
    types = _elem_types(work)
    inits = {i.name: i for i in g.initializer}
    produced = [o for n in g.node for o in n.output if o]
    missing = [t for t in produced if t not in shapes]
    if missing and len(concrete) == len(infos):
        shapes.update(runtime_shapes(sorted_model, concrete, missing, notes))
    unknown = [t for t in produced if t not in shapes]
    if unknown:
        notes.append(f"{len(unknown)} tensor(s) of unknown size count as 0 bytes (e.g. {unknown[0]})")
    nbytes = {t: math.prod(s) * _itemsize(types.get(t, onnx.TensorProto.FLOAT)) for t, s in shapes.items()}
    reads, weights, flops = [], [], []
    uncounted = 0
    for node in g.node:
        names = list(dict.fromkeys([i for i in node.input if i] + sorted(subgraph_inputs(node))))
        weights.append([t for t in names if t in inits])
        reads.append([t for t in names if t not in inits])
        f = node_flops(node, shapes)
        uncounted += f is None
        flops.append(f or 0)
    if uncounted:
        notes.append(f"{uncounted} node(s) without a cost rule count as 0 FLOPs")
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    init_bytes = {name: tensor_nbytes(t) for name, t in inits.items()}
    return GraphProfile(sorted_model, list(g.node), reads, weights, producer, [i.name for i in infos],
                        [o.name for o in g.output], nbytes, types, flops, init_bytes, batch, dict(shapes), notes)
