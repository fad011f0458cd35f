"""How much memory a model needs: weight bytes, and peak activation bytes from a liveness analysis.

Nodes run in topological order; a tensor is live from the step that produces it (graph inputs:
from the start) to the step of its last reader (graph outputs: to the end). The activation
memory at a step is the sum of the tensors live then, and the peak is the largest such sum:
what a runtime that frees every tensor after its last use needs at least, on top of the
weights. Nodes with subgraphs add the peak of their costliest subgraph to their own step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import onnx
from rich.markup import escape
from rich.table import Table

from onnxpipe.core.graph import subgraphs
from onnxpipe.core.units import human_bytes
from onnxpipe.partition.profile import GraphProfile, profile_graph

if TYPE_CHECKING:
    from rich.console import Console


def live_bytes(profile: GraphProfile) -> list[int]:
    """Activation bytes live at each step (node) of ``profile``'s order.

    Example:
        >>> max(live_bytes(profile_graph(model)))  # doctest: +SKIP
        1605632
    """
    n = len(profile.nodes)
    last = profile.last_use()
    delta = [0] * (n + 2)  # difference array: +size at birth, -size after the last use
    born: dict[str, int] = {t: 0 for t in profile.inputs}
    for i, node in enumerate(profile.nodes):
        for o in node.output:
            if o:
                born.setdefault(o, i)
    for t, start in born.items():
        size = profile.nbytes.get(t, 0)
        end = min(last.get(t, start), n - 1)
        delta[start] += size
        delta[max(end, start) + 1] -= size
    out, running = [], 0
    for i in range(n):
        running += delta[i]
        out.append(running + _subgraph_peak(profile.nodes[i], profile.nbytes))
    return out


def _subgraph_peak(node: onnx.NodeProto, nbytes: Mapping[str, int]) -> int:
    """The largest sum of tensors produced inside one of ``node``'s subgraphs (all kept: an upper bound)."""
    peaks = [sum(nbytes.get(o, 0) for n in g.node for o in n.output) + sum(_subgraph_peak(n, nbytes) for n in g.node)
             for g in subgraphs(node)]
    return max(peaks, default=0)


@dataclass
class MemoryReport:
    """Weights and peak activations of a model at one batch size.

    Example:
        >>> r = memory_report(onnx.load("resnet50.onnx"), batch=8)  # doctest: +SKIP
        >>> r.weight_bytes, r.peak_bytes, r.peak_node  # doctest: +SKIP
        (102228128, 51380224, 'conv1')
    """

    batch: int
    weight_bytes: int
    peak_bytes: int
    peak_node: str
    peak_op: str
    peak_step: int
    steps: int
    input_bytes: int
    output_bytes: int
    at_peak: list[tuple[str, int]] = field(default_factory=list)  # biggest tensors live at the peak
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Weights plus peak activations: the least a device must hold to run the model."""
        return self.weight_bytes + self.peak_bytes

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "weight_bytes": self.weight_bytes, "peak_activation_bytes": self.peak_bytes,
                "peak_node": self.peak_node, "peak_op": self.peak_op, "peak_step": self.peak_step,
                "steps": self.steps, "input_bytes": self.input_bytes, "output_bytes": self.output_bytes,
                "total_bytes": self.total_bytes, "live_at_peak": [{"tensor": t, "bytes": b} for t, b in self.at_peak],
                "notes": list(self.notes)}

    def render(self, console: Console) -> None:
        """A table of the totals and of the biggest tensors live at the peak."""
        t = Table(title=f"memory at batch {self.batch}")
        t.add_column("")
        t.add_column("bytes", justify="right")
        t.add_column("where")
        t.add_row("weights", human_bytes(self.weight_bytes), "initializers and Constant tensors")
        t.add_row("peak activations", human_bytes(self.peak_bytes),
                  f"at node {escape(self.peak_node)} ({escape(self.peak_op)}), step {self.peak_step + 1} of {self.steps}")
        t.add_row("inputs / outputs", f"{human_bytes(self.input_bytes)} / {human_bytes(self.output_bytes)}", "")
        t.add_row("[bold]weights + peak[/]", f"[bold]{human_bytes(self.total_bytes)}[/]", "the least a device must hold")
        console.print(t)
        if self.at_peak:
            live = Table(title="largest tensors live at the peak")
            live.add_column("tensor")
            live.add_column("bytes", justify="right")
            for name, size in self.at_peak:
                live.add_row(escape(name), human_bytes(size))
            console.print(live)
        for note in self.notes:
            console.print(f"[dim]note: {escape(note)}[/]")


def report_from_profile(profile: GraphProfile, weight_bytes: int | None = None) -> MemoryReport:
    """A :class:`MemoryReport` for an already profiled graph.

    Example:
        >>> report_from_profile(profile_graph(model)).peak_bytes  # doctest: +SKIP
    """
    from onnxpipe.core.analysis import parameter_bytes
    from onnxpipe.core.modelio import tensor_bytes

    live = live_bytes(profile)
    step = max(range(len(live)), key=live.__getitem__)
    node = profile.nodes[step]
    last = profile.last_use()
    born = {t: -1 for t in profile.inputs} | profile.producer
    at_peak = sorted(((t, profile.nbytes.get(t, 0)) for t, b in born.items()
                      if b <= step <= max(last.get(t, b), b) and profile.nbytes.get(t, 0)), key=lambda tb: -tb[1])
    if weight_bytes is None:
        weight_bytes = tensor_bytes(profile.model) + parameter_bytes(profile.model)
    return MemoryReport(
        batch=profile.batch, weight_bytes=weight_bytes, peak_bytes=live[step],
        peak_node=node.name or (node.output[0] if node.output else f"#{step}"), peak_op=node.op_type,
        peak_step=step, steps=len(live), input_bytes=sum(profile.nbytes.get(t, 0) for t in profile.inputs),
        output_bytes=sum(profile.nbytes.get(t, 0) for t in profile.outputs), at_peak=at_peak[:5],
        notes=list(profile.notes))


def memory_report(model: onnx.ModelProto, *, batch: int = 1, dims: Mapping[str, int] | None = None,
                  input_shapes: Mapping[str, Sequence[int]] | None = None) -> MemoryReport:
    """Weight bytes and peak activation bytes of ``model`` at ``batch``, with the node of the peak.

    Args:
        model: the model (not modified).
        batch: size of symbolic first axes.
        dims: sizes of named symbolic dims.
        input_shapes: whole shapes for some inputs.

    Example:
        >>> memory_report(onnx.load("model.onnx"), batch=32).peak_bytes  # doctest: +SKIP
    """
    return report_from_profile(profile_graph(model, batch=batch, dims=dims, input_shapes=input_shapes))
