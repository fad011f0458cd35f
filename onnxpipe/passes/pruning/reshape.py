"""Following channels through Flatten and Reshape: merges into a feature axis, and channel shuffles.

A Reshape that merges the channel axis with its neighbours (``N,C,H,W -> N,C*H*W`` before a
Gemm) repeats each channel's label over its block of features; its target entry is rewritten.
A Reshape that only adds or drops unit dims passes channels through. The channel shuffle of
ShuffleNet (``Reshape N,g,C/g,H,W -> Transpose(swap) -> Reshape N,C,H,W``) is a permutation:
it stays rectangular only if every one of the g blocks keeps the same local channels, so those
are joined. Any other Reshape of the channel axis (attention heads, space-to-depth) is unsafe.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxpipe.passes.pruning.edits import ShapeEntry
from onnxpipe.passes.pruning.graphview import Dim, node_label
from onnxpipe.passes.pruning.tracer import Tracer

Block = tuple[list[int], list[int]]


def _static(d: Dim) -> bool:
    return isinstance(d, int) and d > 0


def _blocks(src: tuple[Dim, ...], dst: tuple[Dim, ...], axis: int) -> Block | None:
    """The smallest run of ``src`` dims (holding ``axis``) and ``dst`` dims with equal products.

    Walks from the left; when a symbolic dim blocks the way before ``axis``, walks from the
    right instead. None when neither side can align the dims around ``axis``.
    """
    for reverse in (False, True):
        s, d = (src[::-1], dst[::-1]) if reverse else (src, dst)
        a = len(src) - 1 - axis if reverse else axis
        found = _walk(s, d, a)
        if found is not None:
            ins, outs = found
            if reverse:
                ins = sorted(len(src) - 1 - i for i in ins)
                outs = sorted(len(dst) - 1 - j for j in outs)
            return ins, outs
    return None


def _walk(src: tuple[Dim, ...], dst: tuple[Dim, ...], axis: int) -> Block | None:
    i = j = 0
    while i < len(src) and j < len(dst):
        if not (_static(src[i]) and _static(dst[j])):
            if src[i] is None or src[i] != dst[j] or i == axis:
                return None
            i, j = i + 1, j + 1
            continue
        ins, outs, pi, pj = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i >= len(src) or not _static(src[i]):
                    return None
                pi, i = pi * src[i], i + 1
                ins.append(i - 1)
            else:
                if j >= len(dst) or not _static(dst[j]):
                    return None
                pj, j = pj * dst[j], j + 1
                outs.append(j - 1)
        if axis in ins:
            return ins, outs
    return None


def _mapping(src: tuple[Dim, ...], dst: tuple[Dim, ...], axis: int) -> tuple[str, int, int, int] | tuple[str, int, int] | None:
    """('merge', out axis, prefix, suffix) or ('split', first out axis, second out axis)."""
    block = _blocks(src, dst, axis)
    if block is None:
        return None
    ins = [i for i in block[0] if src[i] != 1 or i == axis]
    outs = [j for j in block[1] if dst[j] != 1]
    if len(outs) == 1:
        before = [src[i] for i in ins if i < axis]
        after = [src[i] for i in ins if i > axis]
        return "merge", outs[0], math.prod(before), math.prod(after)
    if ins == [axis] and len(outs) == 2 and outs[1] == outs[0] + 1:
        return "split", outs[0], outs[1]
    return None


def _resolve(src: tuple[Dim, ...], dst: tuple[Dim, ...], entries: list[int | None], allow_zero: int) -> tuple[Dim, ...]:
    """Fill output dims shape inference left unknown from the target (a -1, a copied 0)."""
    out = list(dst)
    for j, e in enumerate(entries):
        if e is not None and e > 0:
            out[j] = e
        elif e == 0 and not allow_zero and j < len(src):
            out[j] = src[j]
    holes = [j for j, e in enumerate(entries) if e == -1]
    if len(holes) == 1 and not _static(out[holes[0]]):
        # the inferred dim: static products must match once the same symbolic dims cancel out
        sym_src = sorted(str(d) for d in src if not _static(d))
        sym_dst = sorted(str(d) for j, d in enumerate(out) if j != holes[0] and not _static(d))
        if sym_src == sym_dst and None not in src:
            rest = math.prod(d for j, d in enumerate(out) if j != holes[0] and _static(d))
            total = math.prod(d for d in src if _static(d))
            if rest and total % rest == 0:
                out[holes[0]] = total // rest
    return tuple(out)


def flatten(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """Flatten at ``axis``: the channel axis, at or after it, becomes part of output axis 1."""
    x = t.lab(node.input[0])
    if x is None:
        return
    shape = t.view.shape(node.input[0])
    start = int(t.view.attr(node, "axis", 1))
    start = start + len(shape) if shape is not None and start < 0 else start
    dims = [] if shape is None else list(shape[start:])
    if shape is None or x.axis < start or not all(_static(d) for i, d in enumerate(dims) if i + start != x.axis):
        t.unsafe(x, f"Flatten {node_label(node)} merges channels with dims that are not static")
        return
    prefix = math.prod(shape[start:x.axis])
    suffix = math.prod(shape[x.axis + 1:])
    t.set(node.output[0], 1, np.tile(np.repeat(x.ids, suffix), prefix))


def reshape(t: Tracer, k: int, node: onnx.NodeProto) -> None:
    """Reshape with a constant target: merges, unit dims, and the channel shuffle."""
    x = t.lab(node.input[0])
    if x is None:
        return
    v, label = t.view, node_label(node)
    target = v.input_const(node, 1) if v.opset >= 5 else np.asarray(v.attr(node, "shape"))
    computed = target is None
    found = [(int(e), (k, 1, i)) for i, e in enumerate(target.reshape(-1).tolist())] if not computed \
        else _vector(t, node.input[1], (k, 1))
    src, dst = v.probed_shape(node.input[0]), v.probed_shape(node.output[0])
    if found is None or src is None or dst is None or len(found) != len(dst):
        t.unsafe(x, f"Reshape {label}: target shape computed at run time")
        return
    entries = [e for e, _ in found]
    allow_zero = int(v.attr(node, "allowzero", 0))
    src = tuple(len(x.ids) if i == x.axis else d for i, d in enumerate(src))  # the labels know that dim
    dst = _resolve(src, dst, entries, allow_zero)
    m = _mapping(src, dst, x.axis)
    if m is None:
        t.unsafe(x, f"Reshape {label}: cannot follow how it moves the channel axis")
        return
    if m[0] == "split":
        _split(t, k, node, m[1], m[2], found, dst)
        return
    _, j, prefix, suffix = m
    entry, origin = found[j]
    if _is_dim_copy(origin):
        if origin[1] == node.input[0] and origin[2] == x.axis and prefix == suffix == 1:
            t.set(node.output[0], j, x.ids)  # the target copies the (pruned) count itself
        else:
            t.unsafe(x, f"Reshape {label}: target copies a dim that pruning changes")
        return
    if entry is None or (entry > 0 and origin is None):
        t.unsafe(x, f"Reshape {label}: target entry for the channels computed at run time")
        return
    if entry == 0 and (allow_zero or not (j == x.axis and prefix == suffix == 1)):
        t.unsafe(x, f"Reshape {label}: target copies a dim that pruning changes")
        return
    if entry > 0:  # in the target, or in the constant a computed target copies it from
        t.edits.append(ShapeEntry(origin[0], origin[1], origin[2], node.output[0]))
    t.set(node.output[0], j, np.tile(np.repeat(x.ids, suffix), prefix))


Origin = tuple[int, int, int] | tuple[str, str, int] | None
# (node, input slot, element) of a constant that can be rewritten, or ("dim", tensor, axis): a
# dim copied from the tensor's own Shape, which follows pruning by itself


def _is_dim_copy(origin: Origin) -> bool:
    return origin is not None and isinstance(origin[0], str)
Entry = tuple[int | None, Origin]


def _vector(t: Tracer, name: str, reader: tuple[int, int], depth: int = 0) -> list[Entry] | None:
    """Entries of a computed 1-D shape tensor: (value or None when known only at run time, origin).

    Follows the ops exporters build targets with (``x.view(x.size(0), -1)``, tf2onnx's
    Shape/Gather/Slice/Concat): Shape, Gather, Slice, Unsqueeze/Squeeze, Cast, Concat. An
    entry's origin names the constant it was copied from, when only this chain reads it, so a
    pruned size can be written there. None when even the length is unknown.
    """
    v = t.view
    c = v.const(name)
    if c is not None:
        return [(int(e), (reader[0], reader[1], i)) for i, e in enumerate(c.reshape(-1).tolist())]
    k = v.producer.get(name)
    if k is None or depth > 16:
        return None
    node = v.nodes[k]
    op = node.op_type
    out = None
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        out = _vector(t, node.input[0], (k, 0), depth + 1)
    elif op == "Concat":
        parts = [_vector(t, i, (k, slot), depth + 1) for slot, i in enumerate(node.input)]
        out = None if any(p is None for p in parts) else [e for p in parts for e in p]
    elif op == "Shape":
        shape = v.shape(node.input[0])
        if shape is not None:
            start, end = int(v.attr(node, "start", 0)), v.attr(node, "end")
            dims = list(shape)[start:None if end is None else int(end)]
            first = start + len(shape) if start < 0 else start
            # a copy of a dim of the tensor itself: ("dim", tensor, axis), followed, never rewritten
            out = [(d if isinstance(d, int) and d > 0 else None, ("dim", node.input[0], first + i))
                   for i, d in enumerate(dims)]
    elif op == "Gather" and int(v.attr(node, "axis", 0)) == 0 and v.input_const(node, 1) is not None:
        vec = _vector(t, node.input[0], (k, 0), depth + 1)
        out = None if vec is None else [vec[i] for i in v.input_const(node, 1).reshape(-1).tolist()]
    elif op == "Slice" and v.opset >= 10 and all(v.input_const(node, s) is not None for s in range(1, len(node.input))):
        vec = _vector(t, node.input[0], (k, 0), depth + 1)
        starts, ends = v.input_const(node, 1).reshape(-1), v.input_const(node, 2).reshape(-1)
        steps = v.input_const(node, 4).reshape(-1) if len(node.input) > 4 else [1]
        if vec is not None and len(starts) == 1:
            out = vec[slice(int(starts[0]), int(min(ends[0], len(vec))), int(steps[0]))]
    if out is None:
        n = v.dim(name, 0)
        return None if n is None else [(None, None)] * n
    if len(v.consumers(name)) > 1 or name in v.graph_outputs:  # others read it too: not ours to rewrite
        out = [(value, origin if _is_dim_copy(origin) else None) for value, origin in out]
    return out


def _single_reader(t: Tracer, name: str) -> tuple[int, onnx.NodeProto] | None:
    readers = t.view.consumers(name)
    if len(readers) != 1 or name in t.view.graph_outputs:
        return None
    return readers[0], t.view.nodes[readers[0]]


def _split(t: Tracer, k: int, node: onnx.NodeProto, j0: int, j1: int, found: list[Entry],
           dst: tuple[Dim, ...]) -> None:
    """The channel axis becomes two axes ``j0`` (outer) x ``j1`` (inner): one of three cases.

    - The labels repeat ``dst[j0]`` times (the undoing of a merge with a leading axis, such as
      batch x heads folded into one axis and split back): the inner axis carries them.
    - A channel shuffle (the split, a Transpose swapping the two, a merge): see :func:`_shuffle`.
    - Attention heads (``N,S,C -> N,S,heads,head size``): each head's channels are joined into one
      class removed whole, the heads axis carries one label per head, and the target's heads
      entry is rewritten (a -1 there stays valid by itself).
    """
    v, label = t.view, node_label(node)
    x = t.lab(node.input[0])
    outer, inner = v.dim(node.output[0], j0) or dst[j0], v.dim(node.output[0], j1) or dst[j1]
    if not (isinstance(outer, int) and isinstance(inner, int) and outer * inner == len(x.ids)):
        t.unsafe(x, f"Reshape {label}: cannot tell how it splits the channel axis")
        return
    grid = x.ids.reshape(outer, inner)
    e_outer, o_outer = found[j0]
    e_inner, o_inner = found[j1]
    o_outer = None if _is_dim_copy(o_outer) else o_outer
    o_inner = None if _is_dim_copy(o_inner) else o_inner
    if outer > 1 and np.all(grid == grid[0]):
        if e_inner is None or (e_inner > 0 and o_inner is None) or e_inner == 0:
            t.unsafe(x, f"Reshape {label}: target entry for the channels computed at run time")
            return
        if e_inner > 0:
            t.edits.append(ShapeEntry(o_inner[0], o_inner[1], o_inner[2], node.output[0]))
        t.set(node.output[0], j1, grid[0])
        return
    step = _single_reader(t, node.output[0])
    if step is not None and step[1].op_type == "Transpose" and v.input_const(node, 1) is not None:
        perm = list(v.attr(step[1], "perm") or [])
        swapped = list(range(len(perm)))
        if len(perm) > max(j0, j1):
            swapped[j0], swapped[j1] = j1, j0
        if perm == swapped:
            _shuffle(t, k, node, j0, j1)
            return
    # attention heads: the inner size (head size) must stay, the heads entry follows the kept count
    if e_inner is None or e_inner <= 0 or e_outer is None or e_outer == 0 or (e_outer > 0 and o_outer is None) \
            or np.any(x.ids < 0):
        t.unsafe(x, f"Reshape {label} splits the channel axis (heads) with a target it cannot rewrite")
        return
    for row in grid:
        for e in row[1:]:
            t.uf.union(int(row[0]), int(e))
    if e_outer > 0:
        t.edits.append(ShapeEntry(o_outer[0], o_outer[1], o_outer[2], node.input[0], divisor=inner))
    t.set(node.output[0], j0, grid[:, 0].copy())


def _shuffle(t: Tracer, k: int, node: onnx.NodeProto, j0: int, j1: int) -> None:
    """Reshape (split C into g x C/g) -> Transpose (swap them) -> Reshape (merge): a shuffle."""
    v, label = t.view, node_label(node)
    x = t.lab(node.input[0])
    why = f"Reshape {label} splits the channel axis (not a channel shuffle it can follow)"
    step = _single_reader(t, node.output[0])
    if step is None or step[1].op_type != "Transpose":
        t.unsafe(x, why)
        return
    kt, tr = step
    rank = v.rank(node.output[0])
    perm = list(v.attr(tr, "perm") or range(rank or 0)[::-1])
    swapped = list(range(len(perm)))
    swapped[j0], swapped[j1] = j1, j0
    last = _single_reader(t, tr.output[0])
    if perm != swapped or last is None or last[1].op_type != "Reshape":
        t.unsafe(x, why)
        return
    k2, back = last
    target2 = v.input_const(back, 1)
    src2, dst2 = v.shape(tr.output[0]), v.shape(back.output[0])
    m2 = None if target2 is None or src2 is None or dst2 is None else _mapping(src2, dst2, j0)
    block = None if m2 is None else _blocks(src2, dst2, j0)
    ids = x.ids
    g, cg = v.dim(node.output[0], j0), v.dim(node.output[0], j1)
    if (m2 is None or m2[0] != "merge" or block is None or not {j0, j1} <= set(block[0]) or g is None
            or cg is None or g * cg != len(ids) or np.any(ids < 0)):
        t.unsafe(x, why)
        return
    target1 = v.input_const(node, 1).reshape(-1)
    jf = m2[1]
    if int(target1[j1]) == 0 or int(target2.reshape(-1)[jf]) == 0:
        t.unsafe(x, f"Reshape {label}: target copies a dim that pruning changes")
        return
    grid = ids.reshape(g, cg)
    for row in grid[1:]:
        for a, b in zip(grid[0], row):
            t.uf.union(int(a), int(b))
    final = back.output[0]
    t.edits.append(ShapeEntry(k, 1, j1, final, divisor=g))
    t.edits.append(ShapeEntry(k2, 1, jf, final))
    t.set(final, jf, grid.T.reshape(-1))
    t.handled.update({kt, k2})
