"""How channel labels flow through ops without weights; anything not listed here is unsafe.

A rule reads the labels of a node's inputs and writes those of its outputs, joins labels that
meet elementwise, records the edits pruning will need (a constant to slice, a Reshape target to
rewrite) and marks unsafe what it cannot follow. Layers with weights live in :mod:`.layers`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from onnxpipe.passes.pruning import layers
from onnxpipe.passes.pruning.edits import Slice, SplitSizes
from onnxpipe.passes.pruning.graphview import node_label
from onnxpipe.passes.pruning.reshape import flatten, reshape
from onnxpipe.passes.pruning.rules_common import (
    all_labels,
    axes_of,
    norm_axis,
    unsafe_all,
    used,
)
from onnxpipe.passes.pruning.shapeops import pad, resize, shape, slice_, tile_expand
from onnxpipe.passes.pruning.tracer import Tracer

Rule = Callable[[Tracer, int, onnx.NodeProto], None]

UNARY = set("""Relu LeakyRelu Elu Selu Celu Sigmoid HardSigmoid HardSwish Tanh Softplus Softsign Gelu
Mish Abs Neg Exp Log Sqrt Reciprocal Erf Floor Ceil Round Sign Sin Cos Tan Asin Acos Atan Sinh Cosh
Asinh Acosh Atanh ThresholdedRelu Shrink Identity Cast CastLike Clip Not IsNaN IsInf Dropout
Swish""".split())
JOIN = set("""Add Sub Mul Div Pow Max Min Sum Mean PRelu Where And Or Xor Equal Greater Less
GreaterOrEqual LessOrEqual Mod BitShift BitwiseAnd BitwiseOr BitwiseXor""".split())
POOL = set("MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split())
OPERANDS = JOIN | {"Concat", "MatMul"}  # ops whose every input is data that may carry channels
REDUCE = set("""ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceSumSquare""".split())


def unknown(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """An op with no rule: it may mix or count channels, so its channels stay as they are."""
    unsafe_all(t, node, "not known to keep channels apart")


def unary(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    x = t.lab(node.input[0]) if node.input else None
    if x is None:
        return
    if node.op_type == "Clip":  # min/max are scalars by the spec; a labeled one would be odd
        for n in node.input[1:]:
            t.unsafe(t.lab(n), f"Clip {node_label(node)} takes its bounds from channels")
    outputs = node.output if node.op_type == "Dropout" else node.output[:1]  # the mask has X's shape
    for out in outputs:
        t.set(out, x.axis, x.ids)


def join(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """Elementwise ops with broadcasting: labels at the same position must be removed together."""
    v, label, out = t.view, node_label(node), node.output[0]
    labeled = [(s, t.lab(n)) for s, n in enumerate(node.input) if t.lab(n) is not None]
    if not labeled:
        return
    if v.attr(node, "broadcast") is not None:  # opset < 7 broadcasting by attribute
        unsafe_all(t, node, "legacy broadcast attribute")
        return
    ranks = [v.rank(n) if n else None for n in node.input]
    out_rank = v.rank(out) or max((r for r in ranks if r is not None), default=None)
    if out_rank is None or any(n and r is None for n, r in zip(node.input, ranks)):
        unsafe_all(t, node, "input ranks unknown")
        return
    axes = {lab.axis + out_rank - ranks[s] for s, lab in labeled}
    if len(axes) != 1:
        unsafe_all(t, node, "inputs carry channels on different axes")
        return
    a = axes.pop()
    size = max(len(lab.ids) for _, lab in labeled)
    ids = None
    for _, lab in labeled:
        if len(lab.ids) == size:
            ids = lab.ids.copy() if ids is None else t.join(
                ids, lab.ids, f"{node.op_type} {label} joins channels with positions that cannot be removed")
        elif len(lab.ids) != 1:
            unsafe_all(t, node, "inputs broadcast channels unevenly")
            return
    for s, name in enumerate(node.input):
        if not name or t.lab(name) is not None:
            continue
        ax = a - (out_rank - ranks[s])
        if ax < 0:
            continue
        d = v.broadcast_dim(name, ax)
        if d == 1:
            continue
        if d != size:
            unsafe_all(t, node, f"cannot tell how {name} broadcasts over the channels")
            return
        if v.is_const(name):
            t.edits.append(Slice(k, s, ax, out))
        elif not _expanded_constant(t, name, ax, size, out):
            t.unsafe(ids, f"{node.op_type} {label} joins {name}, which no prunable layer produces")
    t.set(out, a, ids)


def _expanded_constant(t: Tracer, name: str, ax: int, size: int, out: str) -> bool:
    """``name`` is a constant broadcast by Expand (a ViT's class token, ``cls.expand(N, -1, -1)``):
    its channels are the constant's, sliced like any constant joined in; the Expand target must
    leave that axis to the constant (1 there, read from the probed run when computed)."""
    v = t.view
    k = v.producer.get(name)
    if k is None or v.nodes[k].op_type != "Expand" or len(v.consumers(name)) != 1:
        return False
    node = v.nodes[k]
    data_shape = v.const_shape(node.input[0]) if v.is_const(node.input[0]) else None
    rank = v.rank(name)
    if data_shape is None or rank is None:
        return False
    d_ax = ax - (rank - len(data_shape))
    if d_ax < 0 or data_shape[d_ax] != size:
        return False
    target = v.input_const(node, 1)
    values = target.reshape(-1).tolist() if target is not None else v.probe.get(f"value:{node.input[1]}")
    if values is None:
        return False
    t_ax = ax - (rank - len(values))
    if t_ax >= 0 and values[t_ax] != 1:
        return False
    t.edits.append(Slice(k, 0, d_ax, out))
    return True


def concat(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """Along the channel axis, each input keeps its own channels at an offset; otherwise a join."""
    v = t.view
    labeled = all_labels(t, node)
    if not labeled:
        return
    rank = v.rank(node.output[0]) or v.rank(node.input[0])
    if rank is None:
        unsafe_all(t, node, "rank unknown")
        return
    axis = norm_axis(int(v.attr(node, "axis", 1)), rank)
    if any(lab.axis != axis for lab in labeled):
        join(t, k, node)
        return
    parts = []
    for name in node.input:
        lab = t.lab(name)
        if lab is not None:
            parts.append(lab.ids)
            continue
        d = v.dim(name, axis)
        if d is None:
            unsafe_all(t, node, f"size of {name} along the channel axis unknown")
            return
        parts.append(np.full(d, -1, dtype=np.int64))
    t.set(node.output[0], axis, np.concatenate(parts))


def split(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """Along the channel axis each output takes its range; sizes are rewritten or split evenly."""
    v, label = t.view, node_label(node)
    x = t.lab(node.input[0])
    if x is None:
        return
    rank = v.rank(node.input[0])
    axis = norm_axis(int(v.attr(node, "axis", 0)), rank or 0)
    outs = list(node.output)
    if axis != x.axis:
        for o in outs:
            t.set(o, x.axis, x.ids)
        return
    sizes, slot = v.attr(node, "split"), None
    if sizes is None and v.has_input(node, 1):
        c = v.input_const(node, 1)
        if c is None:
            t.unsafe(x, f"Split {label}: sizes computed at run time")
            return
        sizes, slot = c.reshape(-1).tolist(), 1
    size = len(x.ids)
    if sizes is None:
        if size % len(outs):
            t.unsafe(x, f"Split {label}: uneven implicit split")
            return
        sizes = [size // len(outs)] * len(outs)
        t.constrain(x.ids, np.arange(size) // sizes[0], f"Split {label} into equal parts")
    else:
        t.edits.append(SplitSizes(k, slot, tuple(outs)))
    start = 0
    for o, n in zip(outs, sizes):
        t.set(o, axis, x.ids[start:start + int(n)])
        start += int(n)


def transpose(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    x = t.lab(node.input[0])
    if x is None:
        return
    rank = t.view.rank(node.input[0])
    perm = t.view.attr(node, "perm") or (list(range(rank))[::-1] if rank else None)
    if perm is None:
        unsafe_all(t, node, "rank unknown")
        return
    t.set(node.output[0], list(perm).index(x.axis), x.ids)


def squeeze(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    x = t.lab(node.input[0])
    if x is None:
        return
    v = t.view
    rank = v.rank(node.input[0])
    try:
        axes = axes_of(t, node, 1)
    except ValueError:
        axes, rank = None, None
    if rank is None:
        unsafe_all(t, node, "axes or rank unknown")
        return
    if node.op_type == "Squeeze":
        if axes is None:
            shape = v.shape(node.input[0]) or ()
            axes = [i for i, d in enumerate(shape) if d == 1]
        axes = [norm_axis(a, rank) for a in axes]
        if x.axis in axes:
            unsafe_all(t, node, "squeezes the channel axis")
            return
        t.set(node.output[0], x.axis - sum(a < x.axis for a in axes), x.ids)
        return
    if axes is None:
        unsafe_all(t, node, "axes unknown")
        return
    out_rank = rank + len(axes)
    inserted = {norm_axis(a, out_rank) for a in axes}
    kept = [i for i in range(out_rank) if i not in inserted]
    t.set(node.output[0], kept[x.axis], x.ids)


def pool(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    x = t.lab(node.input[0])
    if x is None:
        return
    if x.axis != 1 or any(used(t, o) for o in node.output[1:]):  # MaxPool indices count channels
        unsafe_all(t, node, "channels not on axis 1, or pooling indices used")
        return
    t.set(node.output[0], 1, x.ids)


def reduce(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    x = t.lab(node.input[0])
    if x is None:
        return
    v = t.view
    rank = v.rank(node.input[0])
    try:
        axes = axes_of(t, node, 1)
    except ValueError:
        rank = None
    if rank is None:
        unsafe_all(t, node, "axes or rank unknown")
        return
    if axes is None or not axes:
        if int(v.attr(node, "noop_with_empty_axes", 0)) and axes is not None:
            t.set(node.output[0], x.axis, x.ids)
            return
        axes = list(range(rank))
    axes = [norm_axis(a, rank) for a in axes]
    if x.axis in axes:
        unsafe_all(t, node, "reduces over the channel axis")
        return
    keep = int(v.attr(node, "keepdims", 1))
    t.set(node.output[0], x.axis if keep else x.axis - sum(a < x.axis for a in axes), x.ids)


def softmax(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """Softmax-like ops and LayerNormalization normalize over some axes: never the channel axis."""
    x = t.lab(node.input[0])
    if x is None:
        return
    v = t.view
    rank = v.rank(node.input[0])
    if rank is None:
        unsafe_all(t, node, "rank unknown")
        return
    if node.op_type == "LayerNormalization":
        first, last = norm_axis(int(v.attr(node, "axis", -1)), rank), rank - 1
        if any(used(t, o) for o in node.output[1:]):
            unsafe_all(t, node, "mean or inverse deviation used")
            return
    elif v.opset >= 13:
        first = last = norm_axis(int(v.attr(node, "axis", -1)), rank)
    else:  # before opset 13 the input is coerced to 2-D at `axis`
        first, last = norm_axis(int(v.attr(node, "axis", 1)), rank), rank - 1
    if node.op_type == "LayerNormalization" and first == last == x.axis:
        _layer_norm_stream(t, k, node)
        return
    if first <= x.axis <= last:
        unsafe_all(t, node, "normalizes over the channel axis")
        return
    t.set(node.output[0], x.axis, x.ids)


def _layer_norm_stream(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """LayerNormalization over the hidden width alone: a residual stream pruned as a whole.

    As Torch-Pruning does for ViT, the hidden channels of a transformer's residual stream are
    removed everywhere at once: the norm's scale and bias lose them and it normalizes over those
    kept. That changes its statistics (the kept channels' mean and variance), so the result is
    judged by the pipeline's agreement check, like any pruning.
    """
    v, x = t.view, t.lab(node.input[0])
    for slot in (1, 2):
        if not v.has_input(node, slot):
            continue
        shape = v.const_shape(node.input[slot]) if v.is_const(node.input[slot]) else None
        if shape is None or len(shape) != 1 or shape[0] != len(x.ids):
            unsafe_all(t, node, "normalizes over the channel axis with a scale or bias that is not a constant per channel")
            return
    for slot in (1, 2):
        if v.has_input(node, slot):
            t.edits.append(Slice(k, slot, 0, node.input[0]))
    t.set(node.output[0], x.axis, x.ids)


RULES: dict[str, Rule] = {
    **{op: unary for op in UNARY}, **{op: join for op in JOIN},
    **{op: pool for op in POOL}, **{op: reduce for op in REDUCE},
    "Concat": concat, "Split": split, "Transpose": transpose, "Squeeze": squeeze, "Unsqueeze": squeeze,
    "Softmax": softmax, "LogSoftmax": softmax, "Hardmax": softmax, "LayerNormalization": softmax,
    "Pad": pad, "Resize": resize, "Upsample": resize, "Slice": slice_, "Shape": shape,
    "Tile": tile_expand, "Expand": tile_expand, "Reshape": reshape, "Flatten": flatten,
    **layers.RULES,
}
