"""What pruning changes in the graph, recorded while tracing and applied once channels are chosen.

Every edit names the labeled tensor whose kept channels decide it; ``kept(tensor)`` returns the
kept positions of that tensor's channel axis (ascending indices into the original axis).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Kept = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class Slice:
    """The constant at ``node``'s input ``slot`` loses the removed positions of ``tensor`` along ``axis``."""

    node: int
    slot: int
    axis: int
    tensor: str

    def transform(self, value: np.ndarray, kept: Kept) -> np.ndarray:
        return np.take(value, kept(self.tensor), axis=self.axis)

    def fraction(self, kept_fraction: Callable[[str], float]) -> float:
        return kept_fraction(self.tensor)


@dataclass(frozen=True)
class GroupedSlice:
    """A grouped conv weight: along ``local_axis`` each of ``groups`` blocks keeps its own positions.

    The blocks run along ``block_axis`` (Conv: output channels, axis 0; ConvTranspose: input
    channels, axis 0); ``tensor`` has ``groups`` equal blocks of local positions.
    """

    node: int
    slot: int
    block_axis: int
    local_axis: int
    tensor: str
    groups: int
    block: int  # original positions per block of ``tensor``

    def transform(self, value: np.ndarray, kept: Kept) -> np.ndarray:
        keep = kept(self.tensor)
        rows = value.shape[self.block_axis] // self.groups
        parts = []
        for b in range(self.groups):
            local = keep[(keep >= b * self.block) & (keep < (b + 1) * self.block)] - b * self.block
            part = np.take(value, np.arange(b * rows, (b + 1) * rows), axis=self.block_axis)
            parts.append(np.take(part, local, axis=self.local_axis))
        return np.concatenate(parts, axis=self.block_axis)

    def fraction(self, kept_fraction: Callable[[str], float]) -> float:
        return kept_fraction(self.tensor)


@dataclass(frozen=True)
class ShapeEntry:
    """Entry ``index`` of a shape-like constant (Reshape target, Resize sizes) becomes kept/``divisor``.

    Only a positive entry is rewritten: -1 (inferred) and 0 (copied) stay valid by construction.
    """

    node: int
    slot: int
    index: int
    tensor: str
    divisor: int = 1

    def transform(self, value: np.ndarray, kept: Kept) -> np.ndarray:
        out = np.array(value, copy=True)
        if out.reshape(-1)[self.index] > 0:
            out.reshape(-1)[self.index] = len(kept(self.tensor)) // self.divisor
        return out


@dataclass(frozen=True)
class SplitSizes:
    """Split sizes (input ``slot``, or the ``split`` attribute when slot is None) = kept per output."""

    node: int
    slot: int | None
    outputs: tuple[str, ...]

    def sizes(self, kept: Kept) -> np.ndarray:
        return np.array([len(kept(t)) for t in self.outputs], dtype=np.int64)

    def transform(self, value: np.ndarray, kept: Kept) -> np.ndarray:
        return self.sizes(kept).astype(value.dtype)


@dataclass(frozen=True)
class SetAttr:
    """An integer attribute (a depthwise conv's ``group``) becomes kept/``divisor`` of ``tensor``."""

    node: int
    name: str
    tensor: str
    divisor: int = 1

    def value(self, kept: Kept) -> int:
        return len(kept(self.tensor)) // self.divisor


ConstEdit = Slice | GroupedSlice | ShapeEntry | SplitSizes
Edit = ConstEdit | SetAttr


def tensors_of(edit: Edit) -> tuple[str, ...]:
    """The labeled tensors an edit depends on."""
    if isinstance(edit, SplitSizes):
        return edit.outputs
    return (edit.tensor,)
