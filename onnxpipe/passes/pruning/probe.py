"""Shapes read from one ONNX Runtime run, for the broadcasts and Reshapes inference leaves unsized.

Exporters compute attention masks and head-splitting targets at run time (Shape, Gather,
Concat, Expand ...), and onnx shape inference gives up on them. One run on the check inputs
tells the concrete shapes; :class:`.graphview.GraphView` consults them only where inference
left a dim unknown (``broadcast_dim``, ``probed_shape``).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxpipe.passes.pruning.graphview import inferred_shapes
from onnxpipe.passes.pruning.rules import JOIN


def probe_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of the tensors read by broadcasting ops and Reshapes whose shape inference
    left a dim unknown, from one ONNX Runtime run on ``feeds`` (empty when it cannot run); under
    ``value:<name>``, the values of Expand targets computed at run time.

    Example:
        >>> probe_shapes(model, {"input_ids": ids})["/m/Expand_output_0"]  # doctest: +SKIP
        (2, 1, 8, 8)
    """
    from onnxpipe.core.session import Session

    shapes = inferred_shapes(model)
    consts = {i.name for i in model.graph.initializer}

    def unknown(n: str) -> bool:
        return n not in consts and (n not in shapes or any(not (isinstance(d, int) and d > 0) for d in shapes[n][1:]))

    # the targets of Expand computed at run time: their values, to tell a broadcast 1 (``value:`` keys)
    targets = {node.input[1] for node in model.graph.node
               if node.op_type == "Expand" and len(node.input) > 1 and node.input[1] not in consts}
    names = sorted({n for node in model.graph.node if node.op_type in JOIN or node.op_type == "MatMul"
                    for n in node.input if n and unknown(n)}
                   | {n for node in model.graph.node if node.op_type == "Reshape"
                      for n in (node.input[0], node.output[0]) if unknown(n)} | targets)
    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output} | {i.name for i in probe.graph.input}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    try:
        with Session(probe, optimization="disable") as s:
            values = s.run(feeds, outputs=names)
    except Exception:  # best effort: without it, unknown broadcasts stay unsafe
        return {}
    out = {n: tuple(np.shape(a)) for n, a in values.items()}
    out.update((f"value:{n}", tuple(int(e) for e in np.asarray(values[n]).reshape(-1))) for n in targets
               if n in values and np.asarray(values[n]).size <= 16)
    return out
