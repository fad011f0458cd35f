"""Channel dependency groups: label every channel, follow it through the graph, merge what is coupled.

Each prunable layer (Conv, ConvTranspose, Gemm, MatMul or Gather with constant weights) is a
*source*: its output channels get fresh element ids. The ids are carried through the ops that
keep channels apart (activations, BatchNormalization, pooling, Concat at an offset, Flatten into
a Gemm, ...) by the rules of :mod:`.rules` and :mod:`.layers`. Where two tensors meet
elementwise (a residual Add, a gating Mul) the elements at the same position are joined in a
union-find: they can only be removed together. A *class* is one set of joined elements, the
unit that is removed; a *group* is the set of sources connected by classes.

Anything a rule cannot prove safe (an unknown op, a Reshape it cannot follow, a graph output, a
shape-dependent op, a join with a tensor that cannot shrink) marks its elements unsafe with a
reason, and their whole group is left alone.

Example:
    >>> analysis = analyze(model)  # doctest: +SKIP
    >>> [(g.name, g.size, g.reasons) for g in analysis.groups]  # doctest: +SKIP
    [('conv1', 16, []), ('fc', 10, ['reaches graph output y'])]
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxpipe.passes.pruning.edits import Edit
from onnxpipe.passes.pruning.graphview import GraphView, node_label
from onnxpipe.passes.pruning.rules import OPERANDS, RULES, unknown
from onnxpipe.passes.pruning.tracer import Labels, Source, Tracer, WeightUse


@dataclass
class Group:
    """Coupled sources and the classes of channels they remove together."""

    index: int
    name: str
    sources: list[int]
    classes: np.ndarray  # class root ids, in the order of the first source's channels
    reasons: list[str] = field(default_factory=list)
    cells: list[np.ndarray] = field(default_factory=list)  # class indices that must lose equally

    @property
    def size(self) -> int:
        return len(self.classes)


@dataclass
class Analysis:
    """Everything the later steps need: groups, labels, edits and weight uses."""

    view: GraphView
    labels: dict[str, Labels]
    groups: list[Group]
    sources: list[Source]
    edits: list[Edit]
    weights: list[WeightUse]
    class_of: np.ndarray  # element id -> class root id


def trace(view: GraphView) -> Tracer:
    """Walk the graph once and apply the rule of every node."""
    t = Tracer(view)
    for k, node in enumerate(view.nodes):
        if k in t.handled:
            continue
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is not None and node.op_type not in OPERANDS:
            # only the data input carries channels through; one used as a parameter (a shape,
            # scales, pads, bounds) would make the op depend on the channel count or values
            for name in node.input[1:]:
                t.unsafe(t.lab(name), f"{node.op_type} {node_label(node)} takes channels as a parameter")
        (rule or unknown)(t, k, node)
        for name in view.implicit_inputs.get(k, ()):  # subgraphs (If, Loop, Scan) read labeled tensors
            t.unsafe(t.lab(name), f"{node.op_type} {node_label(node)} reads {name} inside a subgraph")
    for name in view.graph_outputs:
        t.unsafe(t.lab(name), f"reaches graph output {name}")
    return t


def shared_weights(t: Tracer) -> list[list[WeightUse]]:
    """Readers of the same constant along the same axis, where more than one layer reads it."""
    by_const: dict[tuple[str, int], list[WeightUse]] = defaultdict(list)
    for use in t.weights:
        by_const[(t.view.nodes[use.node].input[use.slot], use.axis)].append(use)
    return [uses for uses in by_const.values() if len({u.node for u in uses}) > 1]


def couple(t: Tracer, uses: list[WeightUse]) -> None:
    """Join the positions of every reader of one shared weight: all lose the same slices."""
    name = t.view.nodes[uses[0].node].input[uses[0].slot]
    first = t.labels[uses[0].tensor].ids
    for use in uses[1:]:
        ids = t.labels[use.tensor].ids
        what = f"weight {name} is shared by layers"
        if len(ids) != len(first) or use.groups != uses[0].groups or use.block_axis != uses[0].block_axis:
            t.unsafe(first, what + " that read it differently")
            t.unsafe(ids, what + " that read it differently")
            continue
        t.join(first, ids, what + ", one of which cannot be pruned")


def analyze(model: onnx.ModelProto, *, couple_shared: bool = False,
            probe: dict[str, tuple[int, ...]] | None = None) -> Analysis:
    """Trace ``model`` (in topological order) and build its channel groups.

    With ``couple_shared``, a weight several layers read (an exporter's deduplicated copies of
    equal tensors, tied layers) is pruned the same way for all of them, or not at all where one
    of them cannot be pruned: one pruned tensor instead of a copy per reader, which could
    outgrow the original. Without it, each reader is pruned on its own and gets its own copy.
    ``probe``: shapes from one run (:func:`.graphview.probe_shapes`) for broadcasts inference
    cannot tell.

    Example:
        >>> groups = analyze(model).groups  # doctest: +SKIP
    """
    view = GraphView(model, probe)
    t = trace(view)
    first = _build(view, t)
    if not couple_shared:
        return first
    chosen = shared_weights(t)
    if not chosen:
        return first
    t = trace(view)
    for uses in chosen:
        couple(t, uses)
    return _build(view, t)


def _build(view: GraphView, t: Tracer) -> Analysis:
    """Groups from a finished trace: sources connected by shared classes, with their reasons."""
    roots = t.uf.roots()
    n_src = len(t.sources)
    # sources are connected when their elements share a class
    parent = list(range(n_src))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_source_of_root: dict[int, int] = {}
    for e, r in enumerate(roots.tolist()):
        s = t.element_source[e]
        if r in first_source_of_root:
            a, b = find(first_source_of_root[r]), find(s)
            if a != b:
                parent[max(a, b)] = min(a, b)
        else:
            first_source_of_root[r] = s
    members: dict[int, list[int]] = defaultdict(list)
    for s in range(n_src):
        members[find(s)].append(s)
    groups: list[Group] = []
    group_of_source: dict[int, int] = {}
    for gi, (_, srcs) in enumerate(sorted(members.items())):
        first = t.sources[srcs[0]]
        classes: list[int] = []
        seen: set[int] = set()
        for s in srcs:  # classes in the order of the sources' channels
            src = t.sources[s]
            for r in roots[src.first:src.first + src.size].tolist():
                if r not in seen:
                    seen.add(r)
                    classes.append(r)
        groups.append(Group(gi, node_label(view.nodes[first.node]), list(srcs), np.array(classes, dtype=np.int64)))
        for s in srcs:
            group_of_source[s] = gi
    elem_group = np.array([group_of_source[s] for s in t.element_source], dtype=np.int64)
    for ids, reason in t.unsafe_marks:
        for gi in sorted(set(elem_group[ids].tolist())):
            if reason not in groups[gi].reasons:
                groups[gi].reasons.append(reason)
    _apply_constraints(t, groups, roots, elem_group)
    return Analysis(view, t.labels, groups, t.sources, t.edits, t.weights, roots)


def _apply_constraints(t: Tracer, groups: list[Group], roots: np.ndarray, elem_group: np.ndarray) -> None:
    """Turn block constraints into cells of classes that must lose the same number of channels."""
    per_group: dict[int, list[tuple[np.ndarray, np.ndarray, str]]] = defaultdict(list)
    for ids, blocks, what in t.constraints:
        labeled = ids >= 0
        for gi in sorted(set(elem_group[ids[labeled]].tolist())):
            mask = labeled.copy()
            mask[labeled] = elem_group[ids[labeled]] == gi
            per_group[gi].append((roots[ids[mask]], blocks[mask], what))
    for gi, items in per_group.items():
        g = groups[gi]
        index = {int(c): i for i, c in enumerate(g.classes)}
        key = [[] for _ in range(g.size)]
        for cls_ids, blocks, what in items:
            n_blocks = int(blocks.max()) + 1 if blocks.size else 1
            counts = np.zeros((g.size, n_blocks), dtype=np.int64)
            np.add.at(counts, (np.array([index[int(c)] for c in cls_ids]), blocks), 1)
            touched = counts.sum(axis=1) > 0
            uniform = touched & (counts.min(axis=1) == counts.max(axis=1))
            single = touched & ((counts > 0).sum(axis=1) == 1)
            if np.any(touched & ~uniform & ~single):
                g.reasons.append(f"channels straddle the blocks of {what}")
                continue
            sizes = counts[single].max(axis=1) if np.any(single) else np.array([])
            if sizes.size and sizes.min() != sizes.max():
                g.reasons.append(f"uneven channel multiplicity across the blocks of {what}")
                continue
            bins = np.where(single, counts.argmax(axis=1), -1)
            per_bin = np.bincount(bins[single], minlength=n_blocks) if np.any(single) else np.zeros(0)
            if per_bin.size and per_bin.min() != per_bin.max():
                g.reasons.append(f"blocks of {what} hold different numbers of channels of this group")
                continue
            for i in range(g.size):
                key[i].append(int(bins[i]))
        if g.reasons:
            continue
        cells: dict[tuple, list[int]] = defaultdict(list)
        for i, k in enumerate(key):
            cells[tuple(k)].append(i)
        g.cells = [np.array(v, dtype=np.int64) for _, v in sorted(cells.items())]
        # every block of every constraint must gather the same number of cells, else equal
        # removal per cell would not mean equal removal per block
        for c in range(len(items)):
            per_block = defaultdict(int)
            for k in cells:
                if k[c] >= 0:
                    per_block[k[c]] += 1
            if per_block and len(set(per_block.values())) > 1:
                g.reasons.append(f"cannot remove channels evenly across the blocks of {items[c][2]}")
                g.cells = []
                break
