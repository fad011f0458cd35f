"""Small graph utilities that several passes need."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable, Iterator

import onnx


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held by a node's attributes (If branches, Loop and Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope (implicit inputs)."""
    names: set[str] = set()
    for g in subgraphs(node):
        local = {i.name for i in g.input} | {i.name for i in g.initializer}
        local |= {o for n in g.node for o in n.output}
        for n in g.node:
            names |= {i for i in n.input if i and i not in local}
            names |= subgraph_inputs(n) - local
    return names


def used_names(graph: onnx.GraphProto, acc: set[str]) -> set[str]:
    """Every name read by a node of ``graph`` or its subgraphs, added to ``acc`` (returned)."""
    for node in graph.node:
        acc.update(node.input)
        for g in subgraphs(node):
            used_names(g, acc)
    return acc


def toposort(graph: onnx.GraphProto) -> None:
    """Sort ``graph.node`` in place so every node follows its producers (stable otherwise).

    Nodes in a cycle or reading values no one produces are kept, in their order, at the end:
    the checker will then name the real problem.

    Example:
        >>> toposort(model.graph)  # doctest: +SKIP
    """
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                producer[o] = i
    deps: list[set[int]] = []
    users: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        d = {producer[x] for x in (set(n.input) | subgraph_inputs(n)) if x in producer and producer[x] != i}
        deps.append(d)
        for j in d:
            users[j].append(i)
    pending = [len(d) for d in deps]
    ready = deque(i for i, c in enumerate(pending) if c == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in sorted(users[i]):
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    seen = set(order)
    order += [i for i in range(len(nodes)) if i not in seen]
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)


_INFERENCE_LIMIT = 1 << 30  # bytes: in-memory shape inference serializes the model (2 GiB protobuf limit)


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes, outermost first."""
    yield graph
    for node in graph.node:
        for g in subgraphs(node):
            yield from all_graphs(g)


def value_names(graph: onnx.GraphProto) -> Iterator[str]:
    """Every tensor name stored in one graph (not its subgraphs), in file order, repeats included."""
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        yield v.name
    for init in graph.initializer:
        yield init.name
    for sparse in graph.sparse_initializer:
        yield sparse.values.name
    for node in graph.node:
        yield from node.input
        yield from node.output
    for ann in graph.quantization_annotation:
        yield ann.tensor_name


def rename_values(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename tensors everywhere in ``graph`` (subgraphs included), e.g. to give outputs clean names.

    Example:
        >>> rename_values(model.graph, {"Identity:0": "logits"})  # doctest: +SKIP
    """
    if not mapping:
        return
    for g in all_graphs(graph):
        for v in list(g.input) + list(g.output) + list(g.value_info):
            v.name = mapping.get(v.name, v.name)
        for init in g.initializer:
            init.name = mapping.get(init.name, init.name)
        for sparse in g.sparse_initializer:
            sparse.values.name = mapping.get(sparse.values.name, sparse.values.name)
        for node in g.node:
            node.input[:] = [mapping.get(i, i) for i in node.input]
            node.output[:] = [mapping.get(o, o) for o in node.output]
        for ann in g.quantization_annotation:
            ann.tensor_name = mapping.get(ann.tensor_name, ann.tensor_name)


def name_bytes(model: onnx.ModelProto) -> int:
    """Bytes the model's tensor and node names take in its file (each stored occurrence counts)."""
    total = 0
    for g in all_graphs(model.graph):
        total += sum(len(n.encode()) for n in value_names(g))
        total += sum(len(n.name.encode()) for n in g.node)
    return total


def _fresh(prefix: str, taken: set[str]) -> Iterator[str]:
    i = 0
    while True:
        name = f"{prefix}{i}"
        i += 1
        if name not in taken:
            yield name


def strip_names(model: onnx.ModelProto, keep: Iterable[str] = (),
                debug: bool = False) -> tuple[dict[str, str], dict[str, str]]:
    """Give internal tensors and nodes short names (``t0``, ``n0``, ...), in place, like ``strip`` on a binary.

    Graph inputs and outputs and the names in ``keep`` (tensors or nodes) stay as they are; so do
    model-level metadata and local functions, whose names are their own. Stored intermediate shapes
    (``value_info``) are renamed; see :func:`drop_derivable_shapes` for the ones worth keeping.
    Unless ``debug``, node doc strings and node metadata (exporters' stack traces) go.

    Returns:
        ``(tensors, nodes)``: new name -> old name for everything renamed.
    """
    if len(model.training_info):
        raise ValueError("models with training info keep their names (its algorithm refers to them)")
    g = model.graph
    kept = set(keep) | {v.name for v in g.input} | {v.name for v in g.output}
    graphs = list(all_graphs(g))
    old_values = dict.fromkeys(n for graph in graphs for n in value_names(graph) if n and n not in kept)
    value_map = dict(zip(old_values, _fresh("t", kept)))
    rename_values(g, value_map)
    kept_nodes = {n.name for graph in graphs for n in graph.node if n.name in kept}
    fresh_nodes, node_map = _fresh("n", kept_nodes), {}
    for graph in graphs:
        if not debug:
            graph.doc_string = ""
        for node in graph.node:
            if not debug:
                node.doc_string = ""
                del node.metadata_props[:]
            if node.name not in kept_nodes:
                new = next(fresh_nodes)
                node_map[new] = node.name
                node.name = new
    return {new: old for old, new in value_map.items()}, node_map


def drop_derivable_shapes(model: onnx.ModelProto) -> int:
    """Remove the main graph's stored intermediate shapes that ONNX shape inference derives identically.

    ONNX Runtime picks some fusions from stored shapes (without them a transformer's outputs moved
    by float rounding), so only entries that inference reproduces exactly, from the model alone,
    go; symbolic dims that came from elsewhere stay. Models too big for in-memory inference keep
    all of theirs. Returns the number of entries removed.
    """
    g = model.graph
    if not len(g.value_info) or model.ByteSize() > _INFERENCE_LIMIT:
        return 0
    trial = onnx.ModelProto()
    trial.CopyFrom(model)
    del trial.graph.value_info[:]
    try:  # no data propagation: count on what every runtime's inference derives
        inferred = onnx.shape_inference.infer_shapes(trial, strict_mode=False, data_prop=False)
    except Exception:  # noqa: BLE001 - inference failing means nothing is derivable: keep everything
        return 0
    derived = {v.name: v.type for v in inferred.graph.value_info}
    keep = [v for v in g.value_info if derived.get(v.name) != v.type]
    removed = len(g.value_info) - len(keep)
    if removed:
        del g.value_info[:]
        g.value_info.extend(keep)
    return removed


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default (``ai.onnx``) domain."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Convert the default domain to ``opset`` with onnx's version converter (for a model whose weights stay
    on disk, see :func:`onnxpipe.core.external.with_weights_if_needed`)."""
    from onnx import version_converter

    return version_converter.convert_version(model, opset)
