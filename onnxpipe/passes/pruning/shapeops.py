"""Rules for ops that take sizes as parameters: Pad, Resize, Slice, Tile, Expand, and Shape itself.

Each passes channels through when its parameters leave the channel axis alone (no padding,
scale 1, a full slice, a repeat of 1), rewrites a size entry that names the channel count
(Resize sizes, Expand), and otherwise marks the channels unsafe. Shape is safe only when the
channel count it reads never reaches an op that could depend on it.
"""

from __future__ import annotations

import onnx

from onnxpipe.passes.pruning.edits import ShapeEntry
from onnxpipe.passes.pruning.rules_common import axes_of, norm_axis, unsafe_all
from onnxpipe.passes.pruning.tracer import Tracer


def pad(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    x = t.lab(node.input[0])
    if x is None:
        return
    v = t.view
    rank = v.rank(node.input[0])
    pads = v.attr(node, "pads")
    if pads is None:
        c = v.input_const(node, 1)
        pads = None if c is None else c.reshape(-1).tolist()
    try:
        axes = axes_of(t, node, 3) if v.opset >= 18 else None
    except ValueError:
        pads = None
    if pads is None or rank is None:
        unsafe_all(t, node, "pads computed at run time")
        return
    axes = [norm_axis(a, rank) for a in (axes if axes is not None else range(rank))]
    n = len(axes)
    if x.axis in axes and (pads[axes.index(x.axis)] or pads[n + axes.index(x.axis)]):
        unsafe_all(t, node, "pads the channel axis")
        return
    t.set(node.output[0], x.axis, x.ids)


def resize(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """Resize/Upsample: a scale of 1 on the channel axis, or a sizes entry that is rewritten."""
    x = t.lab(node.input[0])
    if x is None:
        return
    v = t.view
    scales = v.attr(node, "scales")
    if scales is None:
        slot = 1 if node.op_type == "Upsample" or v.opset < 11 else 2
        c = v.input_const(node, slot)
        scales = None if c is None or c.size == 0 else c.reshape(-1).tolist()
    axes = v.attr(node, "axes")
    pos = list(axes).index(x.axis) if axes is not None and x.axis in axes else (None if axes else x.axis)
    if scales is not None:
        if pos is not None and scales[pos] != 1:
            unsafe_all(t, node, "scales the channel axis")
            return
    elif node.op_type == "Resize" and v.input_const(node, 3) is not None and pos is not None:
        t.edits.append(ShapeEntry(k, 3, pos, node.output[0]))
    elif pos is not None:
        unsafe_all(t, node, "scales or sizes computed at run time")
        return
    t.set(node.output[0], x.axis, x.ids)


def slice_(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """Slice along other axes passes channels through; slicing the channel axis is unsafe."""
    x = t.lab(node.input[0])
    if x is None:
        return
    v = t.view
    rank = v.rank(node.input[0])
    if v.opset < 10:
        axes, starts, ends = v.attr(node, "axes"), v.attr(node, "starts"), v.attr(node, "ends")
    else:
        axes = v.input_const(node, 3).reshape(-1).tolist() if v.input_const(node, 3) is not None else None
        starts = v.input_const(node, 1)
        ends = v.input_const(node, 2)
        if axes is None and not v.has_input(node, 3):
            n = v.dim(node.input[1], 0)
            axes = list(range(n)) if n else None
        starts = None if starts is None else starts.reshape(-1).tolist()
        ends = None if ends is None else ends.reshape(-1).tolist()
    if axes is None or rank is None:
        unsafe_all(t, node, "axes computed at run time")
        return
    axes = [norm_axis(int(a), rank) for a in axes]
    if x.axis in axes:
        i = axes.index(x.axis)
        steps = v.input_const(node, 4) if v.opset >= 10 else None
        whole = (starts is not None and ends is not None and starts[i] == 0 and ends[i] >= len(x.ids)
                 and (steps is None or int(steps.reshape(-1)[i]) == 1))
        if not whole:
            unsafe_all(t, node, "slices the channel axis")
            return
    t.set(node.output[0], x.axis, x.ids)


def shape(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """Shape is safe when what reads it drops the channel count (e.g. keeps only the batch)."""
    x = t.lab(node.input[0])
    if x is None:
        return
    v = t.view
    rank = v.rank(node.input[0])
    if rank is None:
        unsafe_all(t, node, "reads the shape of a tensor of unknown rank")
        return
    start = norm_axis(int(v.attr(node, "start", 0)), rank)
    end = v.attr(node, "end")
    end = rank if end is None else min(norm_axis(int(end), rank), rank)
    mask = [start + i == x.axis for i in range(max(end - start, 0))]
    if _leaks(t, node.output[0], mask, 0, node.input[0]):
        unsafe_all(t, node, "reads the channel count")


def _leaks(t: Tracer, name: str, mask: list[bool], depth: int, source: str = "") -> bool:
    """Whether the elements of a shape vector flagged in ``mask`` reach anything but vector ops.

    Gather, Slice, Cast, Identity, Squeeze/Unsqueeze and Concat only move elements around; a
    flagged element that survives them into any other op (arithmetic, a graph output, another
    tensor's Reshape target) makes the graph depend on the channel count. The target of a Reshape
    of ``source`` itself (``x.flatten(2)`` as TorchScript writes it) copies the count it reshapes:
    the Reshape rule follows that copy or marks the channels unsafe.
    """
    if not any(mask):
        return False
    v = t.view
    if name in v.graph_outputs or name in v.implicit_uses or depth > 16:
        return True
    for k, slot in v.uses.get(name, []):
        node = v.nodes[k]
        op, out = node.op_type, node.output[0]
        if op == "Reshape" and slot == 1 and source and node.input[0] == source:
            continue
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze") and slot == 0:
            new = mask
        elif op == "Gather" and slot == 0 and int(v.attr(node, "axis", 0)) == 0 and v.input_const(node, 1) is not None:
            new = [mask[i] for i in v.input_const(node, 1).reshape(-1).tolist()]
        elif (op == "Slice" and slot == 0 and v.opset >= 10 and len(node.input) >= 3
              and all(v.input_const(node, s) is not None for s in range(1, len(node.input)))
              and v.input_const(node, 1).size == 1):
            steps = v.input_const(node, 4).reshape(-1) if len(node.input) > 4 else [1]
            new = mask[slice(int(v.input_const(node, 1).reshape(-1)[0]),
                             int(min(v.input_const(node, 2).reshape(-1)[0], len(mask))), int(steps[0]))]
        elif op == "Concat" and int(v.attr(node, "axis", 0)) == 0:
            sizes = [len(mask) if i == slot else v.dim(n, 0) for i, n in enumerate(node.input)]
            if any(d is None for d in sizes):
                return True
            new = [m for i, d in enumerate(sizes) for m in (mask if i == slot else [False] * d)]
        else:
            return True
        if _leaks(t, out, new, depth + 1, source):
            return True
    return False


def tile_expand(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """Tile with a repeat of 1 on the channel axis; Expand to 1 or to the channel count (rewritten)."""
    x = t.lab(node.input[0])
    if x is None:
        return
    v = t.view
    c = v.input_const(node, 1)
    rank = v.rank(node.input[0])
    if c is None or rank is None:
        unsafe_all(t, node, "repeats or shape computed at run time")
        return
    values = c.reshape(-1).tolist()
    if node.op_type == "Tile":
        ok, out_axis = values[x.axis] == 1, x.axis
    else:
        out_axis = x.axis + max(len(values) - rank, 0)
        i = out_axis - (max(len(values), rank) - len(values))
        ok = i < 0 or values[i] in (1, len(x.ids))
        if ok and i >= 0 and values[i] == len(x.ids) and len(x.ids) > 1:
            t.edits.append(ShapeEntry(k, 1, i, node.output[0]))
    if not ok:
        unsafe_all(t, node, "repeats the channel axis")
        return
    t.set(node.output[0], out_axis, x.ids)
