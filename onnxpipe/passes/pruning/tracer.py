"""The tracer's state: channel labels, the union-find that couples them, and what the rules record.

The base the rule modules (:mod:`.rules`, :mod:`.rules_common`, :mod:`.layers`, :mod:`.reshape`,
:mod:`.shapeops`) and :mod:`.groups` stand on: it imports none of them, so the rules can be
looked up by :func:`.groups.trace` without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from onnxpipe.passes.pruning.edits import Edit
from onnxpipe.passes.pruning.graphview import GraphView


@dataclass
class Labels:
    """Element ids along a tensor's channel axis; -1 marks a position no source can remove."""

    axis: int
    ids: np.ndarray


@dataclass(frozen=True)
class WeightUse:
    """A weight whose slices along ``axis`` belong to the positions of a labeled tensor.

    ``role`` is ``out`` for a source's own channels, ``in`` for a consumer's input channels and
    ``carry`` for a depthwise conv that carries channels through. Grouped convs index positions
    within ``groups`` blocks along ``block_axis``.
    """

    node: int
    slot: int
    tensor: str
    axis: int
    role: Literal["out", "in", "carry"]
    groups: int = 1
    block_axis: int | None = None


@dataclass
class Source:
    node: int
    tensor: str
    first: int  # first element id
    size: int


class UnionFind:
    """Union-find over element ids that grows as sources are added."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        first = len(self.parent)
        self.parent.extend(range(first, first + n))
        return first

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller id stays root: deterministic

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


class Tracer:
    """The state rules read and write while walking the graph once, in topological order."""

    def __init__(self, view: GraphView) -> None:
        self.view = view
        self.labels: dict[str, Labels] = {}
        self.uf = UnionFind()
        self.sources: list[Source] = []
        self.element_source: list[int] = []
        self.unsafe_marks: list[tuple[np.ndarray, str]] = []
        self.constraints: list[tuple[np.ndarray, np.ndarray, str]] = []
        self.edits: list[Edit] = []
        self.weights: list[WeightUse] = []
        self.handled: set[int] = set()  # nodes a rule already took care of (channel shuffle)

    def lab(self, name: str) -> Labels | None:
        return self.labels.get(name) if name else None

    def set(self, name: str, axis: int, ids: np.ndarray) -> None:
        if name:
            self.labels[name] = Labels(axis, np.asarray(ids, dtype=np.int64))

    def fresh(self, node: int, tensor: str, n: int) -> np.ndarray:
        """New element ids for the ``n`` output channels of a source."""
        first = self.uf.add(n)
        self.sources.append(Source(node, tensor, first, n))
        self.element_source.extend([len(self.sources) - 1] * n)
        return np.arange(first, first + n, dtype=np.int64)

    def join(self, a: np.ndarray, b: np.ndarray, reason: str) -> np.ndarray:
        """Couple two id arrays position by position; a labeled position meeting -1 is unsafe."""
        both = (a >= 0) & (b >= 0)
        for x, y in zip(a[both], b[both]):
            self.uf.union(int(x), int(y))
        lone = np.concatenate([a[(a >= 0) & (b < 0)], b[(b >= 0) & (a < 0)]])
        if lone.size:
            self.unsafe(lone, reason)
        return np.where(a >= 0, a, b)

    def unsafe(self, ids: np.ndarray | Labels | None, reason: str) -> None:
        if ids is None:
            return
        arr = ids.ids if isinstance(ids, Labels) else np.asarray(ids)
        arr = arr[arr >= 0]
        if arr.size:
            self.unsafe_marks.append((arr, reason))

    def constrain(self, ids: np.ndarray, blocks: np.ndarray, what: str) -> None:
        """Positions in each block (grouped conv, equal Split) must lose the same count."""
        self.constraints.append((np.asarray(ids), np.asarray(blocks), what))
