"""Quantization of a model whose weights stay on disk: one weight (and the nodes that read it) at a time.

ONNX Runtime's quantizers read every weight of the model they are given into memory and write the
quantized model beside it: on a model of several GB that is the weights two or three times over.
Their weight-only and dynamic quantizers treat every node that reads a weight on its own, so
quantizing a model group by group gives the same nodes: the nodes that read a weight (and every
node sharing one of their weights) go, with those weights read from their files, into a small
model of those nodes alone; the quantizer runs on that; its nodes and tensors replace the
originals in the big model. A node the quantizer adds for an activation several groups read
(dynamic quantization's ``DynamicQuantizeLinear``) comes out of each group the same, under the
same names: it is kept once. Memory holds one group's weights and work at a time; what the
quantizer made goes to disk as it is made when the model's weights are on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import onnx
from onnx import helper

from onnxpipe.core import external
from onnxpipe.core.graph import toposort, used_names


def _types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Declared types of the top graph's values (inputs, outputs, shape inference's value_info)."""
    g = model.graph
    return {v.name: v.type for v in [*g.input, *g.value_info, *g.output] if v.type.HasField("tensor_type")}


def _tiny(model: onnx.ModelProto, nodes: list[onnx.NodeProto], weights: list[onnx.TensorProto],
          types: dict[str, onnx.TypeProto]) -> onnx.ModelProto:
    """A model of ``nodes`` alone, ``weights`` read into it, their other inputs as graph inputs."""
    known = {w.name for w in weights}
    first = weights[0].data_type
    inputs, seen = [], set(known)
    for node in nodes:
        for k, name in enumerate(node.input):
            if name and name not in seen:
                seen.add(name)
                if name in types:
                    inputs.append(helper.make_value_info(name, types[name]))
                else:  # undeclared: a MatMul's activations have its weight's type, a Gather's indices are integers
                    elem = onnx.TensorProto.INT64 if (node.op_type == "Gather" and k == 1) else first
                    inputs.append(helper.make_tensor_value_info(name, elem, None))
    outputs = [helper.make_value_info(o, types[o]) if o in types else helper.make_empty_tensor_value_info(o)
               for n in nodes for o in n.output if o]
    graph = helper.make_graph(list(nodes), "one_weight", inputs, outputs, weights)
    tiny = helper.make_model(graph, opset_imports=list(model.opset_import))
    tiny.ir_version = model.ir_version
    for t in tiny.graph.initializer:
        external.load_tensor(t)  # read in place: one copy of each weight
    return tiny


def _own(message: onnx.NodeProto | onnx.TensorProto) -> onnx.NodeProto | onnx.TensorProto:
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def groups(model: onnx.ModelProto, targets: Iterable[str]) -> list[list[str]]:
    """The named top-graph nodes in groups that share no initializer: nodes reading a common weight
    (a tied weight, a Gemm's bias) are quantized together, and so are two that read one another's output
    directly (a quantized Gather's int8 output goes straight into the MatMul after it)."""
    inits = {t.name for t in model.graph.initializer}
    reads = {n.name: [i for i in n.input if i in inits] for n in model.graph.node if n.name}
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    wanted = [t for t in dict.fromkeys(targets) if reads.get(t)]
    for node in wanted:
        for w in reads[node]:
            parent[find("n:" + node)] = find("w:" + w)
    chosen = set(wanted)
    producer = {o: n.name for n in model.graph.node if n.name in chosen for o in n.output if o}
    for n in model.graph.node:
        if n.name in chosen:
            for i in n.input:
                if i in producer:
                    parent[find("n:" + n.name)] = find("n:" + producer[i])
    out: dict[str, list[str]] = {}
    for node in wanted:
        out.setdefault(find("n:" + node), []).append(node)
    return list(out.values())


def quantize_by_weight(model: onnx.ModelProto, targets: Iterable[str],
                       quantize: Callable[[onnx.ModelProto], onnx.ModelProto],
                       log: Callable[[str], None] = lambda line: None) -> onnx.ModelProto:
    """``model`` with the nodes named in ``targets`` quantized by ``quantize``, which is given one small
    model per group of nodes sharing weights (:func:`groups`) and returns it quantized.

    The result is a copy; ``model`` is unchanged. Initializers no node reads any more are dropped (as
    ORT's quantizers do); a weight that another node still reads (an excluded MatMul sharing it) stays.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)  # weights on disk hold no bytes: a cheap copy
    inits = {t.name: t for t in out.graph.initializer}
    nodes_by_name = {n.name: n for n in out.graph.node if n.name}
    types = _types(out)
    replacement: dict[str, list[onnx.NodeProto]] = {}
    made: set[str] = set()  # outputs of nodes already taken from a group (shared activations' quantizers)
    added: dict[str, onnx.TensorProto] = {}
    opsets = {o.domain: o.version for o in out.opset_import}
    # blocks made from weights on disk go to disk as they are made: memory holds one group's work at a time
    spill = external.SpillFile() if external.lazy_bytes(model) else None
    todo = groups(out, targets)
    for k, names in enumerate(todo, start=1):
        nodes = [nodes_by_name[n] for n in names]
        weights = list(dict.fromkeys(i for n in nodes for i in n.input if i in inits))
        q = quantize(_tiny(out, nodes, [inits[w] for w in weights], types))
        produced = []
        for p in q.graph.node:  # a node another group made already (same outputs) is kept once
            if p.output and all(o in made for o in p.output if o):
                continue
            produced.append(_own(p))  # messages of their own: holding them must not keep q alive
        mine_all: set[int] = set()
        for node in nodes:  # each original node: the produced nodes that compute its outputs
            mine = [p for p in produced if set(p.output) & set(node.output)]
            replacement[node.name] = mine
            mine_all.update(id(p) for p in mine)
        helpers = [p for p in produced if id(p) not in mine_all]  # what else the quantizer made
        if helpers:
            replacement[nodes[0].name] = helpers + replacement[nodes[0].name]
        made.update(o for p in produced for o in p.output if o)
        for t in q.graph.initializer:
            if t.name in weights or t.name in added:
                continue
            if spill is not None and external.nbytes(t) >= external.INLINE_BELOW:
                spill.put(t)
            added[t.name] = _own(t)  # a message of its own: holding it must not keep q (and its weights) alive
        for o in q.opset_import:
            opsets.setdefault(o.domain, o.version)
        del q, produced
        log(f"quantize: group {k}/{len(todo)} ({', '.join(weights[:2])}{' ...' if len(weights) > 2 else ''})")
    if spill is not None:
        spill.close()
    nodes_out = []
    for node in out.graph.node:
        nodes_out.extend(replacement.get(node.name, [node]))
    del out.graph.node[:]
    out.graph.node.extend(nodes_out)
    toposort(out.graph)
    out.graph.initializer.extend(added.values())
    used = used_names(out.graph, set()) | {o.name for o in out.graph.output}
    for t in [t for t in out.graph.initializer if t.name not in used]:  # as ORT's quantizers clean up
        out.graph.initializer.remove(t)
    del out.opset_import[:]
    out.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets.items())
    return out
