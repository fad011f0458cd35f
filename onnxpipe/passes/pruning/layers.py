"""Rules for layers with weights: where channels are born (sources) and absorbed (consumers).

- Conv / ConvTranspose: output channels are a source; input channels are consumed by slicing
  the weight. A depthwise conv (group == input channels) carries its input's channels through;
  a grouped conv asks that every group loses the same number of channels.
- Gemm / MatMul with a constant 2-D weight: output features are a source, input features are
  consumed (MLP hidden units, transformer FFN layers).
- Gather from a constant 2-D table (an embedding): the table's columns are a source.
- BatchNormalization / InstanceNormalization: per-channel parameters are sliced.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxpipe.passes.pruning.edits import GroupedSlice, SetAttr, Slice
from onnxpipe.passes.pruning.graphview import node_label
from onnxpipe.passes.pruning.tracer import Tracer, WeightUse


def _used(t: Tracer, name: str) -> bool:
    return bool(name) and (name in t.view.uses or name in t.view.graph_outputs or name in t.view.implicit_uses)


def _consumed_input(t: Tracer, node: onnx.NodeProto, axis: int, size: int) -> np.ndarray | None:
    """Labels of input 0 if they sit on ``axis`` with ``size`` positions; otherwise mark them unsafe."""
    x = t.lab(node.input[0])
    if x is None:
        return None
    if x.axis != axis or len(x.ids) != size:
        t.unsafe(x, f"{node.op_type} {node_label(node)} reads channels on an axis it does not reduce over")
        return None
    return x.ids


def conv(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """Conv (output channels: rows of W) and ConvTranspose (output channels: W's axis 1 per group)."""
    v, label, out = t.view, node_label(node), node.output[0]
    transpose = node.op_type == "ConvTranspose"
    wshape = v.const_shape(node.input[1]) if v.is_const(node.input[1]) else None
    has_bias = v.has_input(node, 2)
    if wshape is None or (has_bias and not v.is_const(node.input[2])):
        t.unsafe(t.lab(node.input[0]), f"{node.op_type} {label} has weights computed at run time")
        return
    group = int(v.attr(node, "group", 1))
    if transpose:
        cin, cout = wshape[0], wshape[1] * group
        in_axis, out_axis = 0, 1
    else:
        cout, cin = wshape[0], wshape[1] * group
        in_axis, out_axis = 1, 0
    x = _consumed_input(t, node, 1, cin)
    what = f"grouped {node.op_type} {label}"
    if group > 1 and group == cin and cout % cin == 0:  # depthwise: channels pass through
        if x is None:
            return
        m = cout // cin
        t.set(out, 1, np.repeat(x, m))
        if transpose:  # W is [Cin, m, k...]: rows are the input channels
            t.edits.append(Slice(k, 1, 0, node.input[0]))
            t.weights.append(WeightUse(k, 1, node.input[0], 0, "carry"))
        else:
            t.edits.append(Slice(k, 1, 0, out))
            t.weights.append(WeightUse(k, 1, out, 0, "carry"))
        t.edits.append(SetAttr(k, "group", node.input[0]))
        if has_bias:
            t.edits.append(Slice(k, 2, 0, out))
        return
    if (group > 1 and not transpose and x is not None and cin == cout and not np.any(x < 0)
            and group_width_fixed(t, k, node)):
        _whole_groups(t, k, node, x, group, cout, has_bias)
        return
    if x is not None:
        if group == 1 or transpose:  # ConvTranspose rows are global input channels
            t.edits.append(Slice(k, 1, in_axis, node.input[0]))
        else:
            t.edits.append(GroupedSlice(k, 1, 0, 1, node.input[0], group, cin // group))
        if group > 1:
            t.constrain(x, np.arange(cin) // (cin // group), what)
        local = group > 1 and not transpose  # a grouped Conv's W indexes inputs within each group
        t.weights.append(WeightUse(k, 1, node.input[0], in_axis, "in", group if local else 1, 0 if local else None))
    ids = t.fresh(k, out, cout)
    t.set(out, 1, ids)
    if group == 1 or not transpose:
        t.edits.append(Slice(k, 1, out_axis, out))
    else:
        t.edits.append(GroupedSlice(k, 1, 0, 1, out, group, cout // group))
    if group > 1:
        t.constrain(ids, np.arange(cout) // (cout // group), what)
    if has_bias:
        t.edits.append(Slice(k, 2, 0, out))
    local = group > 1 and transpose  # a grouped ConvTranspose's W indexes outputs within each group
    t.weights.append(WeightUse(k, 1, out, out_axis, "out", group if local else 1, 0 if local else None))


def group_width_fixed(t: Tracer, k: int, node: onnx.NodeProto) -> bool:
    """Whether a grouped conv is pruned by whole groups (RegNet, ResNeXt: groups of a fixed width).

    Those are spatial (3x3) convs of at least 4 groups; a grouped pointwise conv (ShuffleNet's,
    a fixed number of groups with a channel shuffle between) narrows every group instead.
    """
    kernel = t.view.attr(node, "kernel_shape") or list(t.view.const_shape(node.input[1]) or ())[2:]
    return int(t.view.attr(node, "group", 1)) >= 4 and any(int(d) > 1 for d in kernel)


def _whole_groups(t: Tracer, k: int, node: onnx.NodeProto, x: np.ndarray, group: int, cout: int,
                  has_bias: bool) -> None:
    """A grouped conv with as many outputs as inputs loses whole groups, keeping their width.

    Group ``b`` reads input block ``b`` and writes output block ``b``; both blocks are joined into
    one class per group, so a removed group takes its inputs (the channels of the layer before)
    and its outputs away together, and ``group`` becomes the number of groups kept. The group
    width, what the kernels are tuned for, stays.
    """
    out = node.output[0]
    width = cout // group
    ids = t.fresh(k, out, cout)
    for b in range(group):
        block = np.concatenate([x[b * width:(b + 1) * width], ids[b * width:(b + 1) * width]])
        for e in block[1:]:
            t.uf.union(int(block[0]), int(e))
    t.set(out, 1, ids)
    t.edits.append(Slice(k, 1, 0, out))  # whole blocks of rows: the local input axis stays
    t.edits.append(SetAttr(k, "group", out, divisor=width))
    if has_bias:
        t.edits.append(Slice(k, 2, 0, out))
    t.weights.append(WeightUse(k, 1, out, 0, "out"))


def gemm(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """Y = alpha * A' @ B' + beta * C with B constant: B's output features are a source."""
    v, label, out = t.view, node_label(node), node.output[0]
    trans_a, trans_b = int(v.attr(node, "transA", 0)), int(v.attr(node, "transB", 0))
    bshape = v.const_shape(node.input[1]) if v.is_const(node.input[1]) else None
    has_c = v.has_input(node, 2)
    c_label = t.lab(node.input[2]) if has_c else None
    if bshape is None or len(bshape) != 2 or trans_a or (has_c and not v.is_const(node.input[2])):
        t.unsafe(t.lab(node.input[0]), f"Gemm {label}: transposed input or weights computed at run time")
        t.unsafe(c_label, f"Gemm {label} adds a tensor that is not a constant")
        return
    k_dim, n_dim = (bshape[1], bshape[0]) if trans_b else (bshape[0], bshape[1])
    x = _consumed_input(t, node, 1, k_dim)
    if x is not None:
        t.edits.append(Slice(k, 1, 1 if trans_b else 0, node.input[0]))
        t.weights.append(WeightUse(k, 1, node.input[0], 1 if trans_b else 0, "in"))
    ids = t.fresh(k, out, n_dim)
    t.set(out, 1, ids)
    t.edits.append(Slice(k, 1, 0 if trans_b else 1, out))
    t.weights.append(WeightUse(k, 1, out, 0 if trans_b else 1, "out"))
    cshape = v.const_shape(node.input[2]) if has_c else None
    if cshape and cshape[-1] == n_dim and n_dim > 1:
        t.edits.append(Slice(k, 2, len(cshape) - 1, out))


def matmul(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """A @ W with W a constant matrix: W's columns are a source, its rows consume A's features."""
    v, label, out = t.view, node_label(node), node.output[0]
    a, b = t.lab(node.input[0]), t.lab(node.input[1])
    wshape = v.const_shape(node.input[1]) if v.is_const(node.input[1]) else None
    rank_a = v.rank(node.input[0])
    if wshape is None and rank_a is not None and v.rank(node.input[1]) is not None and rank_a >= 2 \
            and v.rank(node.input[1]) >= 2:
        _batched_matmul(t, node, a, b)
        return
    if wshape is None or len(wshape) != 2 or rank_a is None:
        t.unsafe(a, f"MatMul {label} multiplies two tensors computed at run time")
        t.unsafe(b, f"MatMul {label} multiplies two tensors computed at run time")
        return
    x = _consumed_input(t, node, rank_a - 1, wshape[0])
    if x is not None:
        t.edits.append(Slice(k, 1, 0, node.input[0]))
        t.weights.append(WeightUse(k, 1, node.input[0], 0, "in"))
    out_rank = max(rank_a, 2) if rank_a >= 2 else 1
    ids = t.fresh(k, out, wshape[1])
    t.set(out, out_rank - 1, ids)
    t.edits.append(Slice(k, 1, 1, out))
    t.weights.append(WeightUse(k, 1, out, 1, "out"))


def _batched_matmul(t: Tracer, node: onnx.NodeProto, a, b) -> None:
    """A @ B of two run-time tensors (attention: Q @ K^T, P @ V), channels on a batch-like axis.

    Axes before the last two broadcast like an elementwise op: labels there are joined (heads
    of Q with heads of K) and carried to the output. A's rows and B's columns carry to the
    output's last two axes; channels on the contracted axis must be the same on both sides and
    vanish from the output.
    """
    v, label, out = t.view, node_label(node), node.output[0]
    ra, rb = v.rank(node.input[0]), v.rank(node.input[1])
    ro = max(ra, rb)
    placed: list[tuple[int, np.ndarray]] = []
    contracted: list[np.ndarray | None] = [None, None]
    for side, (lab, r) in enumerate(((a, ra), (b, rb))):
        if lab is None:
            continue
        if lab.axis < r - 2:
            placed.append((lab.axis + ro - r, lab.ids))
        elif (side == 0 and lab.axis == r - 2) or (side == 1 and lab.axis == r - 1):
            placed.append((ro - 2 if side == 0 else ro - 1, lab.ids))
        else:
            contracted[side] = lab.ids
    why = f"MatMul {label} multiplies two tensors computed at run time"
    if (contracted[0] is None) != (contracted[1] is None):
        t.unsafe(a, why + " and contracts channels of one side only")
        t.unsafe(b, why + " and contracts channels of one side only")
        return
    if contracted[0] is not None:
        if len(contracted[0]) != len(contracted[1]):
            t.unsafe(a, why)
            t.unsafe(b, why)
            return
        t.join(contracted[0], contracted[1], f"MatMul {label} contracts channels with positions that cannot be removed")
    axes = {ax for ax, _ in placed}
    if len(axes) > 1:
        t.unsafe(a, why + " and keeps channels on two axes")
        t.unsafe(b, why + " and keeps channels on two axes")
        return
    if not placed:
        return
    ax = axes.pop()
    ids = placed[0][1]
    for _, other in placed[1:]:
        if len(other) != len(ids):
            t.unsafe(a, why + " and broadcasts channels unevenly")
            t.unsafe(b, why + " and broadcasts channels unevenly")
            return
        ids = t.join(ids, other, f"MatMul {label} joins channels with positions that cannot be removed")
    if len(placed) == 1 and ax < ro - 2:  # the unlabeled side broadcasts over this axis only if it is 1 there
        side_unlabeled = 1 if a is not None and a.axis < ra - 2 else 0
        name, r = node.input[side_unlabeled], (rb if side_unlabeled else ra)
        local = ax - (ro - r)
        if local >= 0 and v.broadcast_dim(name, local) != 1:
            t.unsafe(ids, f"MatMul {label}: cannot tell how {name} broadcasts over the channels")
            return
    t.set(out, ax, ids)


def gather(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """Gather from a constant table (embedding): columns are a source; on data, other axes pass."""
    v, label, out = t.view, node_label(node), node.output[0]
    axis = int(v.attr(node, "axis", 0))
    data, idx = node.input[0], node.input[1]
    x = t.lab(data)
    r_idx = v.rank(idx)
    if x is not None:
        rank = v.rank(data)
        axis = axis + rank if rank is not None and axis < 0 else axis
        if rank is None or r_idx is None or axis == x.axis:
            t.unsafe(x, f"Gather {label} selects along the channel axis")
            return
        t.set(out, x.axis if x.axis < axis else x.axis + r_idx - 1, x.ids)
        return
    t.unsafe(t.lab(idx), f"Gather {label} uses channels as indices")
    shape = v.const_shape(data) if v.is_const(data) else None
    if shape is None or len(shape) != 2 or axis != 0 or r_idx is None:
        return
    ids = t.fresh(k, out, shape[1])
    t.set(out, r_idx, ids)
    t.edits.append(Slice(k, 0, 1, out))
    t.weights.append(WeightUse(k, 0, out, 1, "out"))


def normalization(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """BatchNormalization / InstanceNormalization: per-channel parameters follow the channels."""
    v, label = t.view, node_label(node)
    x = t.lab(node.input[0])
    if x is None:
        return
    slots = range(1, 5) if node.op_type == "BatchNormalization" else range(1, 3)
    bad = (x.axis != 1 or any(not v.is_const(node.input[s]) for s in slots if v.has_input(node, s))
           or int(v.attr(node, "spatial", 1)) == 0 or any(_used(t, o) for o in node.output[1:]))
    if bad:
        t.unsafe(x, f"{node.op_type} {label}: statistics not per channel on axis 1, computed, or trained")
        return
    for s in slots:
        if v.has_input(node, s):
            t.edits.append(Slice(k, s, 0, node.input[0]))
    t.set(node.output[0], 1, x.ids)


RULES = {"Conv": conv, "ConvTranspose": conv, "Gemm": gemm, "MatMul": matmul, "Gather": gather,
         "BatchNormalization": normalization, "InstanceNormalization": normalization}
