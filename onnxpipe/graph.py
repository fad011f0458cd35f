"""Small graph utilities that several passes need."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterator

import onnx


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held by a node's attributes (If branches, Loop and Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope (implicit inputs)."""
    names: set[str] = set()
    for g in subgraphs(node):
        local = {i.name for i in g.input} | {i.name for i in g.initializer}
        local |= {o for n in g.node for o in n.output}
        for n in g.node:
            names |= {i for i in n.input if i and i not in local}
            names |= _subgraph_inputs(n) - local
    return names


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
        d = {producer[x] for x in (set(n.input) | _subgraph_inputs(n)) if x in producer and producer[x] != i}
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


def rename_values(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename tensors everywhere in ``graph`` (subgraphs included), e.g. to give outputs clean names.

    Example:
        >>> rename_values(model.graph, {"Identity:0": "logits"})  # doctest: +SKIP
    """
    if not mapping:
        return
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        v.name = mapping.get(v.name, v.name)
    for init in graph.initializer:
        init.name = mapping.get(init.name, init.name)
    for node in graph.node:
        node.input[:] = [mapping.get(i, i) for i in node.input]
        node.output[:] = [mapping.get(o, o) for o in node.output]
        for g in subgraphs(node):
            rename_values(g, mapping)
