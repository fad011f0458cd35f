"""Find the first node whose output diverges between a model on one device and a reference.

Intermediate tensors are compared in topological order, ``chunk`` at a time: each round marks
only that chunk as extra graph outputs on both sides, runs both sessions, compares, and lets
the values go, so memory stays bounded by one chunk's tensors whatever the model's size. The
search stops at the first chunk holding a divergent tensor. Only tensors both graphs produce
under the same name are compared (a converted or fp16 model keeps most names).

Example:
    >>> d = localize(model, Device.parse("cuda"), model, Device.parse("cpu"), {"x": x}, Tolerance())  # doctest: +SKIP
    >>> d.node, d.op_type  # doctest: +SKIP
    ('/layer3/conv2/Conv', 'Conv')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxpipe.core.compare import OutputCheck, Tolerance, check_output
from onnxpipe.core.graph import toposort
from onnxpipe.runtimes.providers import Device


@dataclass
class Divergence:
    """The first tensor out of tolerance, the node that makes it, and how far off it is."""

    tensor: str
    node: str
    op_type: str
    check: OutputCheck
    compared: int
    position: int
    of: int

    def as_dict(self) -> dict[str, Any]:
        return {"found": True, "tensor": self.tensor, "node": self.node, "op_type": self.op_type,
                "max_abs": self.check.max_abs, "cosine": self.check.cosine, "mismatched": self.check.mismatched,
                "compared": self.compared, "position": self.position, "of": self.of}

    def summary(self) -> str:
        return (f"first divergence at node {self.node or '?'} ({self.op_type}), output {self.tensor}: max abs diff "
                f"{self.check.max_abs:.3g}, {self.check.mismatched:.2%} out of tolerance "
                f"(tensor {self.position + 1} of {self.of} in order)")


def _candidates(model: onnx.ModelProto, reference: onnx.ModelProto) -> tuple[list[str], dict[str, onnx.NodeProto]]:
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    toposort(graph)
    ref_names = {o for n in reference.graph.node for o in n.output if o}
    producer, names = {}, []
    for i, node in enumerate(graph.node):
        if not node.name:  # unnamed nodes are named by op type and position in the sorted graph
            node.name = f"{node.op_type} #{i}"
        for o in node.output:
            if o and o in ref_names and o not in producer:
                producer[o] = node
                names.append(o)
    return names, producer


class MarkedModel:
    """One working copy of a model whose extra graph outputs are swapped chunk by chunk.

    :meth:`run` is the only place :func:`localize` runs a model: one call per round and side, with
    that round's names marked, so its ``names`` bound how many intermediate values are alive at once.
    """

    def __init__(self, model: onnx.ModelProto, device: Device) -> None:
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.base = len(self.model.graph.output)
        self.have = {o.name for o in self.model.graph.output}
        self.device = device

    def run(self, feeds: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """The values of ``names`` (graph outputs or intermediates) on ``feeds``, in a fresh session."""
        from onnxpipe.runtimes.device_session import DeviceSession

        del self.model.graph.output[self.base:]
        self.model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in self.have)
        with DeviceSession(self.model, self.device) as s:
            return s.run(feeds, outputs=names)


def localize(model: onnx.ModelProto, device: Device | str, reference: onnx.ModelProto, reference_device: Device | str,
             feeds: Mapping[str, np.ndarray], tolerance: Tolerance, *, chunk: int = 32) -> Divergence | None:
    """The first node (in topological order) whose output is out of ``tolerance``, or None.

    Args:
        model: the model under test.
        device: where it runs.
        reference: the reference model (may be ``model`` itself).
        reference_device: where the reference runs.
        feeds: one batch of inputs.
        tolerance: the same rule as for the outputs.
        chunk: tensors marked per round (memory holds one chunk's values at a time).

    Example:
        >>> d = localize(fp16_model, "cuda", model, "cpu", {"x": x}, Tolerance(1e-2, 1e-2))  # doctest: +SKIP
        >>> d.summary()  # doctest: +SKIP
        'first divergence at node /blocks.3/attn/Softmax (Softmax), output ...'
    """
    names, producer = _candidates(model, reference)
    work, ref_work = MarkedModel(model, Device.parse(device)), MarkedModel(reference, Device.parse(reference_device))
    compared = 0
    for start in range(0, len(names), max(1, chunk)):
        part = names[start:start + chunk]
        got = work.run(feeds, part)
        want = ref_work.run(feeds, part)
        for i, name in enumerate(part):
            compared += 1
            check = check_output(name, [got[name]], [want[name]], tolerance)
            if not check.ok:
                node = producer[name]
                return Divergence(name, node.name, node.op_type, check, compared, start + i, len(names))
        del got, want
    return None
