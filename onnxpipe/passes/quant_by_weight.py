"""Weight-only quantization of a model whose weights stay on disk: one weight at a time.

ONNX Runtime's weight-only quantizer reads every weight of the model it is given from memory and
writes the quantized model beside it: on a model of several GB that is the weights twice and more.
Its quantizers treat every MatMul (and Gather) on its own, so quantizing a model weight by weight
gives the same nodes: here each weight, read from its file, goes with the nodes that read it into
a small model of those nodes alone; the quantizer runs on that; its nodes and blocks replace the
originals in the big model. Memory holds one float weight and the quantized blocks made so far
(a sixth of the float bytes at 4 bits).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import onnx
from onnx import helper

from onnxpipe.core import external
from onnxpipe.core.graph import toposort, used_names


def _tiny(model: onnx.ModelProto, nodes: list[onnx.NodeProto], weight: onnx.TensorProto) -> onnx.ModelProto:
    """A model of ``nodes`` alone, ``weight`` read into it, their other inputs as graph inputs."""
    inputs, seen = [], {weight.name}
    for node in nodes:
        for k, name in enumerate(node.input):
            if name and name not in seen:
                seen.add(name)
                # a MatMul's activations have the weight's type; a Gather's indices are integers
                elem = onnx.TensorProto.INT64 if (node.op_type == "Gather" and k == 1) else weight.data_type
                inputs.append(helper.make_tensor_value_info(name, elem, None))
    outputs = [helper.make_empty_tensor_value_info(o) for n in nodes for o in n.output if o]
    graph = helper.make_graph(list(nodes), "one_weight", inputs, outputs, [weight])
    tiny = helper.make_model(graph, opset_imports=list(model.opset_import))
    tiny.ir_version = model.ir_version
    external.load_tensor(tiny.graph.initializer[0])  # read in place: one copy of the weight
    return tiny


def _own(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def quantize_by_weight(model: onnx.ModelProto, targets: Mapping[str, str],
                       quantize: Callable[[onnx.ModelProto], onnx.ModelProto],
                       log: Callable[[str], None] = lambda line: None) -> onnx.ModelProto:
    """``model`` with the nodes of ``targets`` (``{node name: weight initializer}``) quantized by ``quantize``,
    which is given one small model per weight and returns it quantized.

    The result is a copy; ``model`` is unchanged. Initializers no node reads any more are dropped (as
    ORT's quantizer does); a weight that another node still reads (an excluded MatMul sharing it) stays.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)  # weights on disk hold no bytes: a cheap copy
    inits = {t.name: t for t in out.graph.initializer}
    by_weight: dict[str, list[str]] = {}
    for node, weight in targets.items():
        by_weight.setdefault(weight, []).append(node)
    position = {n.name: i for i, n in enumerate(out.graph.node)}
    replacement: dict[str, list[onnx.NodeProto]] = {}
    added: list[onnx.TensorProto] = []
    opsets = {o.domain: o.version for o in out.opset_import}
    # blocks made from weights on disk go to disk as they are made: memory holds one weight's work at a time
    spill = external.SpillFile() if external.lazy_bytes(model) else None
    for k, (weight, names) in enumerate(by_weight.items(), start=1):
        nodes = [out.graph.node[position[n]] for n in names]
        q = quantize(_tiny(out, nodes, inits[weight]))
        produced = [_own(n) for n in q.graph.node]  # messages of their own: holding them must not keep q alive
        for node in nodes:  # each original node: the produced nodes that compute its outputs
            mine = [p for p in produced if set(p.output) & set(node.output)]
            replacement[node.name] = mine
        claimed = {id(p) for v in (replacement[n.name] for n in nodes) for p in v}
        helpers = [p for p in produced if id(p) not in claimed]  # anything else the quantizer made
        if helpers:
            replacement[nodes[0].name] = helpers + replacement[nodes[0].name]
        for t in q.graph.initializer:
            if t.name != weight:
                if spill is not None and external.nbytes(t) >= external.INLINE_BELOW:
                    spill.put(t)
                own = onnx.TensorProto()
                own.CopyFrom(t)  # a message of its own: holding it must not keep q (and its float weight) alive
                added.append(own)
        for o in q.opset_import:
            opsets.setdefault(o.domain, o.version)
        del q, produced
        log(f"quantize: weight {k}/{len(by_weight)} ({weight})")
    if spill is not None:
        spill.close()
    nodes = []
    for node in out.graph.node:
        nodes.extend(replacement.get(node.name, [node]))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    toposort(out.graph)
    out.graph.initializer.extend(added)
    used = used_names(out.graph, set()) | {o.name for o in out.graph.output}
    for t in [t for t in out.graph.initializer if t.name not in used]:  # as ORT's quantizer cleans up
        out.graph.initializer.remove(t)
    del out.opset_import[:]
    out.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets.items())
    return out
