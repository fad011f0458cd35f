"""Which channels each group loses: a count per group (its ratio, or a global ranking), made legal.

Legal means: every cell of the group (the blocks of a grouped conv or an even Split) loses the
same number of classes and keeps at least one; the kept count is a multiple of ``round_to``
(the multiple nearest to what the ratio asks, ties keeping more, so over many layers the ratio
holds on average); and every source keeps at least ``min_channels`` channels (or all of them
when it has fewer). Within those limits the lowest
scores go first; ties go to the highest channel index, so equal weights prune deterministically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from onnxpipe.passes.pruning.groups import Analysis, Group


def half_up(x: float) -> int:
    """Round half up (Python's round() rounds half to even: 2.5 -> 2)."""
    return int(math.floor(x + 0.5))


def _order(scores: np.ndarray, members: np.ndarray) -> np.ndarray:
    """``members`` (class indices) from least to most important, ties by index, highest first."""
    return members[np.lexsort((-members, scores[members]))]


def source_multiplicity(analysis: Analysis, group: Group) -> list[np.ndarray]:
    """For each source of the group: how many of its channels each class holds."""
    index = {int(c): i for i, c in enumerate(group.classes)}
    out = []
    for s in group.sources:
        src = analysis.sources[s]
        counts = np.zeros(group.size, dtype=np.int64)
        for r in analysis.class_of[src.first:src.first + src.size].tolist():
            counts[index[r]] += 1
        out.append(counts)
    return out


def choose(analysis: Analysis, group: Group, scores: np.ndarray, request: int, *,
           round_to: int = 1, min_channels: int = 1) -> np.ndarray:
    """Class indices (into ``group.classes``) to remove: about ``request``, legal, least important.

    The kept count is the legal one nearest to ``size - request`` (ties keep more); keeping
    everything is always legal, so a request far below one ``round_to`` step removes nothing.

    Example:
        >>> choose(analysis, group, scores, 5, round_to=8)  # doctest: +SKIP
        array([3, 9, 12, 14, 15, 20, 21, 30])
    """
    n = group.size
    if request <= 0:
        return np.zeros(0, dtype=np.int64)
    cells = group.cells or [np.arange(n)]
    smallest = min(len(c) for c in cells)
    target = n - request
    # per-cell removal r keeps n - r * cells channels; every cell keeps at least one
    options = [n - r * len(cells) for r in range(smallest)]
    mults = source_multiplicity(analysis, group)
    # round_to counts channels: a class holding a whole attention head holds head-size channels
    per_class = int(mults[0].max()) if mults and mults[0].size and mults[0].min() == mults[0].max() else 1
    options = [k for k in options if k == n or (k * per_class) % round_to == 0]
    for kept in sorted(options, key=lambda k: (abs(k - target), -k)):
        if kept == n:
            break
        per_cell = (n - kept) // len(cells)
        removed = np.concatenate([_order(scores, c)[:per_cell] for c in cells])
        keep = np.ones(n, dtype=bool)
        keep[removed] = False
        if all(int(m[keep].sum()) >= min(min_channels, int(m.sum())) for m in mults):
            return np.sort(removed)
    return np.zeros(0, dtype=np.int64)


def global_requests(groups: list[Group], scores: Mapping[int, np.ndarray], ratio: float) -> dict[int, int]:
    """How many classes each group should lose when ``ratio`` of all channels go, ranked globally.

    Scores are divided by their group's mean first, so layers of different scales compete fairly.

    Example:
        >>> global_requests(groups, scores, 0.3)  # doctest: +SKIP
        {0: 3, 2: 12}
    """
    pool = []
    for g in groups:
        s = np.asarray(scores[g.index], dtype=np.float64)
        mean = s.mean() if s.size else 0.0
        norm = s / mean if mean > 0 else np.ones_like(s)
        pool.extend((float(v), g.index, -i) for i, v in enumerate(norm))
    total = half_up(ratio * len(pool))
    pool.sort()
    counts = {g.index: 0 for g in groups}
    for _, gi, _ in pool[:total]:
        counts[gi] += 1
    return counts
