"""Mixed precision for weight-only quantization: how much each MatMul loses, one model assembled from
per-node bit widths, and the report of what was stored how.

The budget quantizes the whole model once per bit width and picks each MatMul's nodes from the
variant it chose; these helpers assemble that model, hide weights from a quantizer, and compare or
rename what the quantizers produced. Split out of ``quant_weight_only`` (the pass).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxpipe.core.external import tensor_array
from onnxpipe.core.graph import subgraphs
from onnxpipe.passes.quant_layout import column_chunks, node_attr, read_blocks
from onnxpipe.passes.quant_targets import weight_matmuls


def quantized_nodes(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """``{original node name: nodes that replace it}`` in a weight-only quantized model (``<name>_Q<bits>...``)."""
    out: dict[str, list[onnx.NodeProto]] = {}
    heads = [n for n in model.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    for head in heads:
        base, _, bits = head.name.rpartition("_Q")
        if not base or not bits.isdigit():
            continue
        prefix = head.name + "_"
        out[base] = [n for n in model.graph.node if n is head or n.name.startswith(prefix)]
    return out


def assemble(float_model: onnx.ModelProto, variants: Mapping[int, onnx.ModelProto], levels: Mapping[str, int | None],
             default: int) -> onnx.ModelProto:
    """A model whose node ``n`` comes from ``variants[levels[n]]`` (None: float), others from ``variants[default]``.

    Each variant is a whole-model quantization of ``float_model`` at one bit width; the quantizers
    treat every MatMul on its own, so picking nodes across variants gives the same nodes as
    quantizing with those bit widths directly.
    """
    base = variants[default]
    replaced = {bits: quantized_nodes(m) for bits, m in variants.items()}
    inits: dict[str, onnx.TensorProto] = {i.name: i for i in float_model.graph.initializer}
    for m in variants.values():
        for i in m.graph.initializer:
            inits.setdefault(i.name, i)
    base_nodes = {n.name: n for n in base.graph.node}
    nodes: list[onnx.NodeProto] = []
    for node in float_model.graph.node:
        level = levels.get(node.name, default)
        if level is None:
            nodes.append(node)
        elif node.name in replaced.get(level, {}):
            nodes.extend(replaced[level][node.name])
        elif node.name in replaced[default]:
            nodes.extend(replaced[default][node.name])
        else:  # untouched by the quantizer, or a subgraph holder the quantizer rewrote inside
            nodes.append(base_nodes.get(node.name, node))
    used: set[str] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        used.update(n.input)
        for g in subgraphs(n):
            stack.extend(g.node)
    out = onnx.ModelProto()
    out.CopyFrom(base)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits[name] for name in sorted(used) if name in inits)
    return out


HIDE = "__onnxpipe_hidden"


def hide_weights(model: onnx.ModelProto, nodes: set[str]) -> None:
    """Feed the weights of ``nodes`` through an Identity, so a quantizer that looks for initializer weights skips them."""
    inits = {i.name for i in model.graph.initializer}
    hiders = []
    for node in model.graph.node:
        if node.name in nodes and node.op_type == "MatMul" and node.input[1] in inits:
            hidden = f"{node.input[1]}{HIDE}_{len(hiders)}"
            hiders.append(helper.make_node("Identity", [node.input[1]], [hidden], name=hidden))
            node.input[1] = hidden
    for k, h in enumerate(hiders):
        model.graph.node.insert(k, h)


def unhide_weights(model: onnx.ModelProto) -> None:
    """Undo :func:`hide_weights`: the Identity nodes go, their consumers read the weights again."""
    back = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and HIDE in n.name}
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in back)]
    for n in keep:
        for k, name in enumerate(n.input):
            if name in back:
                n.input[k] = back[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def same_weights(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Whether two weight-only quantizations dequantize to the same weights, node for node."""
    def weights(m: onnx.ModelProto) -> dict[str, np.ndarray]:
        inits = {i.name: i for i in m.graph.initializer}
        return {n.name: read_blocks(n, {i: tensor_array(inits[i]) for i in n.input[1:] if i in inits}).dequantize()
                for n in m.graph.node if n.op_type == "MatMulNBits"}
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(np.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)


def suffix_new_tensors(float_model: onnx.ModelProto, quantized: onnx.ModelProto, suffix: str) -> onnx.ModelProto:
    """Rename the initializers a quantizer added (``<weight>_scales`` ...) so that two variants never share a name."""
    old = {i.name for i in float_model.graph.initializer}
    new = {i.name: i.name + suffix for i in quantized.graph.initializer if i.name not in old}
    for i in quantized.graph.initializer:
        i.name = new.get(i.name, i.name)
    for n in quantized.graph.node:
        for k, name in enumerate(n.input):
            if name in new:
                n.input[k] = new[name]
    return quantized


# -- how much each MatMul loses ----------------------------------------------------------------

def _activations(model: onnx.ModelProto, nodes: Sequence[str], batches: Sequence[Mapping[str, np.ndarray]]
                 ) -> dict[str, list[np.ndarray]]:
    """The float inputs (A) of each named MatMul on a few batches."""
    from onnxpipe.core.session import Session

    wanted = {n.name: n.input[0] for n in model.graph.node if n.name in set(nodes)}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for tensor in sorted(set(wanted.values()) - have):
        probe.graph.output.append(helper.make_empty_tensor_value_info(tensor))
    out: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
    with Session(probe, optimization="disable") as s:
        names = sorted(set(wanted.values()))
        for batch in batches:
            got = s.run(batch, names)
            for node, tensor in wanted.items():
                a = got[tensor]
                out[node].append(a.reshape(-1, a.shape[-1]))
    return out


def sensitivity(float_model: onnx.ModelProto, quantized: onnx.ModelProto, nodes: Sequence[str],
                batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Each MatMul's relative output error ``|A (W - Wq)| / |A W|`` with its quantized weights, on real activations."""
    weights = weight_matmuls(float_model)
    f_inits = {i.name: i for i in float_model.graph.initializer}
    q_nodes = {n.name.rsplit("_Q", 1)[0]: n for n in quantized.graph.node if n.op_type == "MatMulNBits"}
    q_inits = {i.name: i for i in quantized.graph.initializer}
    acts = _activations(float_model, [n for n in nodes if n in q_nodes], batches)
    out = {}
    for name, a_list in acts.items():
        node = q_nodes[name]
        blocks = read_blocks(node, {i: tensor_array(q_inits[i]) for i in node.input[1:] if i in q_inits})
        w32 = tensor_array(f_inits[weights[name]])  # memory-mapped when on disk
        w32 = w32.reshape(w32.shape[-2], w32.shape[-1])
        a = np.concatenate(a_list).astype(np.float64)
        if len(a) > 4096:
            a = a[np.linspace(0, len(a) - 1, 4096).astype(int)]
        err_sq = ref_sq = 0.0
        for cols in column_chunks(blocks.k, blocks.n):  # float64 a slice of columns at a time
            w = np.asarray(w32[:, cols], dtype=np.float64)
            ref_sq += float(np.square(a @ w).sum())
            err_sq += float(np.square(a @ (w - blocks.dequantize(cols))).sum())
        out[name] = float(np.sqrt(err_sq) / max(np.sqrt(ref_sq), 1e-30))
    return out


# -- the report -----------------------------------------------------------------------------------

def summary(notes: Mapping[str, Any], quantized: onnx.ModelProto, weighted: set[str]) -> list[str]:
    """The report's lines: what was stored how, which MatMuls stayed at higher precision, the checks, the budget."""
    mm = notes["matmuls"]
    size = notes["size_bytes"]
    lines = [f"int{notes['weight_bits']} {notes['algorithm']}, block {notes['block_size']}, "
             f"{'symmetric' if notes['symmetric'] else 'asymmetric'}, accuracy_level {notes['accuracy_level']} "
             f"({notes['hardware']})",
             f"MatMuls: {mm['int4']} int4, {mm['int8']} int8, {mm['float']} float; embeddings quantized: "
             f"{notes['embeddings_quantized']}; size {size['before'] / 1e6:.3g} MB -> {size['after'] / 1e6:.3g} MB "
             f"({size['after'] / max(size['before'], 1):.2f}x)"]
    int8 = sorted(n.name.rsplit("_Q", 1)[0] for n in quantized.graph.node
                  if n.op_type == "MatMulNBits" and node_attr(n, "bits") == 8 and notes["weight_bits"] == 4)
    floats = sorted(n.name for n in quantized.graph.node if n.op_type == "MatMul" and n.name in weighted)
    for label, names in (("in int8", int8), ("in float", floats)):
        if names:
            lines.append(f"kept {label}: " + ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else ""))
    lay = notes.get("layout_check", {})
    lines.append(f"layout check: {'ok' if lay.get('ok') else 'FAILED'} ({lay.get('nodes')} weights block by block, "
                 f"worst {lay.get('worst_block_error_steps')} steps)")
    if notes.get("max_drop") is not None and "metric_float" in notes:
        bits = notes["weight_bits"]
        first = notes.get(f"metric_int{bits}", float("nan"))
        lines.append(f"budget on {notes['metric']}: float {notes['metric_float']:.5g}, all int{bits} {first:.5g}; "
                     + (f"met at {notes['drop']:.4g} <= max_drop {notes['max_drop']:g}" if notes.get("budget_met")
                        else "not met"))
    lines.extend(f"warning: {w}" for w in notes.get("warnings", []))
    return lines
