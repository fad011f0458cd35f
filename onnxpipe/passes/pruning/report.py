"""Parameters and MACs a pruning removes, per group and in total, and the table that shows them.

Per-group numbers are *marginal*: what pruning that group alone removes. Layers between two
pruned groups shrink on both sides, so the per-group numbers can add up to more than the
total; the totals are measured on the models themselves.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from rich.markup import escape
from rich.table import Table

from onnxpipe.core.units import human_count
from onnxpipe.passes.pruning.edits import GroupedSlice, Slice
from onnxpipe.passes.pruning.groups import Analysis


def _dims(shape: Sequence[Any] | None) -> list[int] | None:
    if shape is None:
        return None
    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]  # symbolic (batch) dims count as 1


def node_macs(analysis: Analysis, k: int) -> int:
    """MACs of one Conv / ConvTranspose / Gemm / MatMul node at batch 1 (0 when shapes are unknown)."""
    v = analysis.view
    node = v.nodes[k]
    w = v.const_shape(node.input[1]) if len(node.input) > 1 and v.is_const(node.input[1]) else None
    out = _dims(v.shape(node.output[0]))
    if w is None or out is None:
        return 0
    if node.op_type == "Conv":
        return int(math.prod(out) * math.prod(w[1:]))
    if node.op_type == "ConvTranspose":
        x = _dims(v.shape(node.input[0]))
        return 0 if x is None else int(math.prod(x) * math.prod(w[1:]))
    if node.op_type in ("Gemm", "MatMul") and len(w) == 2:
        trans_b = node.op_type == "Gemm" and int(v.attr(node, "transB", 0))
        return int(math.prod(out) * (w[1] if trans_b else w[0]))
    return 0


def costs(analysis: Analysis, removed_elements: np.ndarray) -> tuple[int, int]:
    """(parameters, MACs) removed from the pruned layers when ``removed_elements`` go.

    Every node input's constant is counted on its own (a weight shared by two layers counts
    twice), as each use becomes its own tensor once pruned.

    Example:
        >>> params, macs = costs(analysis, removed)  # doctest: +SKIP
    """
    fraction: dict[str, float] = {}

    def kept_fraction(tensor: str) -> float:
        if tensor not in fraction:
            ids = analysis.labels[tensor].ids
            labeled = ids >= 0
            gone = int(removed_elements[ids[labeled]].sum())
            fraction[tensor] = 1.0 - gone / len(ids) if len(ids) else 1.0
        return fraction[tensor]

    factors: dict[tuple[int, int], float] = defaultdict(lambda: 1.0)
    for edit in analysis.edits:
        if isinstance(edit, (Slice, GroupedSlice)):
            factors[(edit.node, edit.slot)] *= edit.fraction(kept_fraction)
    v = analysis.view
    params = 0.0
    for (k, slot), f in factors.items():
        shape = v.const_shape(v.nodes[k].input[slot]) or ()
        params += math.prod(shape) * (1.0 - f)
    per_node: dict[int, set[str]] = defaultdict(set)
    for use in analysis.weights:
        per_node[use.node].add(use.tensor)
    macs = 0.0
    for k, tensors in per_node.items():
        f = math.prod(kept_fraction(t) for t in tensors)
        macs += node_macs(analysis, k) * (1.0 - f)
    return int(round(params)), int(round(macs))


def group_rows(analysis: Analysis, removed: Mapping[int, np.ndarray],
               status: Mapping[int, str]) -> list[dict[str, Any]]:
    """One row per group: channels of its first source before/after, marginal params/MACs removed."""
    rows = []
    for g in analysis.groups:
        gone = removed.get(g.index, np.zeros(0, dtype=np.int64))
        mask = np.zeros(len(analysis.class_of), dtype=bool)
        if len(gone):
            mask[np.isin(analysis.class_of, g.classes[gone])] = True
        first = analysis.sources[g.sources[0]]
        before = first.size
        after = before - int(mask[first.first:first.first + first.size].sum())
        params, macs = costs(analysis, mask) if len(gone) else (0, 0)
        srcs = [analysis.sources[s] for s in g.sources]
        rows.append({"group": g.name, "sources": [analysis.view.nodes[s.node].name or s.tensor for s in srcs],
                     "channels_before": before, "channels_after": after, "classes": g.size,
                     "params_removed": params, "macs_removed": macs, "status": status.get(g.index, ""),
                     # removed output channels of every source layer, by its output tensor
                     "removed": {s.tensor: np.flatnonzero(mask[s.first:s.first + s.size]).tolist()
                                 for s in srcs} if len(gone) else {}})
    return rows


def table(notes: Mapping[str, Any], title: str = "prune") -> Table:
    """The pass's report as a rich table: one row per group, then the totals.

    Example:
        >>> rich.print(table(result.notes))  # doctest: +SKIP
    """
    t = Table(title=title)
    for col, justify in (("group", "left"), ("sources", "right"), ("channels", "right"),
                         ("params removed", "right"), ("MACs removed", "right"), ("status", "left")):
        t.add_column(col, justify=justify, overflow="fold", max_width=60 if col == "status" else None)
    for row in notes.get("groups", []):
        status = row["status"]
        style = "green" if status == "pruned" else ("yellow" if status.startswith("unsafe") else "dim")
        t.add_row(escape(row["group"]), str(len(row["sources"])),
                  f"{row['channels_before']} -> {row['channels_after']}",
                  human_count(row["params_removed"]), human_count(row["macs_removed"]), f"[{style}]{escape(status)}[/]")
    tot = notes.get("totals")
    if tot:
        def pct(a: float, b: float) -> str:
            return f"{100 * (b / a - 1):+.1f}%" if a else "-"

        t.add_section()
        t.add_row("[bold]total[/]", "", f"{tot['channels_before']} -> {tot['channels_after']}",
                  f"{human_count(tot['params_before'])} -> {human_count(tot['params_after'])} "
                  f"({pct(tot['params_before'], tot['params_after'])})",
                  f"{human_count(tot['macs_before'])} -> {human_count(tot['macs_after'])} "
                  f"({pct(tot['macs_before'], tot['macs_after'])})", "")
    return t
