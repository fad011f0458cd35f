"""Helpers every rule module shares: labels of a node's inputs, axes, and marking a node unsafe."""

from __future__ import annotations

import onnx

from onnxpipe.passes.pruning.graphview import node_label
from onnxpipe.passes.pruning.tracer import Tracer


def all_labels(t: Tracer, node: onnx.NodeProto) -> list:
    return [t.lab(n) for n in node.input if t.lab(n) is not None]


def unsafe_all(t: Tracer, node: onnx.NodeProto, why: str) -> None:
    for lab in all_labels(t, node):
        t.unsafe(lab, f"{node.op_type} {node_label(node)}: {why}")


def used(t: Tracer, name: str) -> bool:
    v = t.view
    return bool(name) and (name in v.uses or name in v.graph_outputs or name in v.implicit_uses)


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def axes_of(t: Tracer, node: onnx.NodeProto, slot: int, attr: str = "axes") -> list[int] | None:
    """Axes from the attribute (older opsets) or a constant input; None when absent or computed."""
    value = t.view.attr(node, attr)
    if value is None and t.view.has_input(node, slot):
        c = t.view.input_const(node, slot)
        if c is None:
            raise ValueError("axes computed at run time")
        value = c.reshape(-1).tolist()
    return None if value is None else [int(a) for a in value]
