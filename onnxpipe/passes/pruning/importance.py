"""How much each class of channels matters: weight norms over the whole group, or activations.

- ``l1`` / ``l2``: the norm of every weight slice that belongs to the class, summed over the
  group (the sources' output rows, the consumers' input columns, depthwise filters), as
  Torch-Pruning's group norm does: a channel is weak only if it is weak everywhere it is used.
- ``activation``: the mean magnitude of the class's channels where the consumers read them, on
  calibration data streamed batch by batch (only per-channel sums are kept).

Scores are returned per element root (class id); higher means more important.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx

from onnxpipe.core.errors import InputError
from onnxpipe.passes.pruning.groups import Analysis
from onnxpipe.passes.pruning.tracer import WeightUse


def _position_values(w: np.ndarray, use: WeightUse, positions: int, squared: bool) -> np.ndarray:
    """Per position of the labeled tensor: sum of |w| (or w^2) over the weight slice it owns."""
    if not np.issubdtype(w.dtype, np.floating) or w.dtype.itemsize < 4:
        w = w.astype(np.float32)  # squares of int8 or float16 weights would overflow
    mag = np.square(w) if squared else np.abs(w)  # float32 is enough here; the sums run in float64
    if use.groups == 1 or use.block_axis is None:
        moved = np.moveaxis(mag, use.axis, 0)
        return moved.reshape(moved.shape[0], -1).sum(axis=1, dtype=np.float64)
    # grouped: position p = block b * local size + l owns W[rows of block b, l]
    rows = mag.shape[use.block_axis] // use.groups
    local = positions // use.groups
    out = np.zeros(positions)
    for b in range(use.groups):
        part = np.take(mag, np.arange(b * rows, (b + 1) * rows), axis=use.block_axis)
        moved = np.moveaxis(part, use.axis, 0)
        out[b * local:(b + 1) * local] = moved.reshape(moved.shape[0], -1).sum(axis=1, dtype=np.float64)
    return out


def weight_scores(analysis: Analysis, norm: str = "l1") -> dict[int, float]:
    """Group-norm importance of every class (``norm``: ``l1`` or ``l2``).

    Example:
        >>> scores = weight_scores(analyze(model), "l2")  # doctest: +SKIP
    """
    squared = norm == "l2"
    total = np.zeros(len(analysis.class_of))
    for use in analysis.weights:
        ids = analysis.labels[use.tensor].ids
        w = analysis.view.const(analysis.view.nodes[use.node].input[use.slot])
        values = _position_values(w, use, len(ids), squared)
        if len(values) != len(ids):
            continue  # a layout this scorer does not know: it adds nothing rather than noise
        labeled = ids >= 0
        np.add.at(total, analysis.class_of[ids[labeled]], values[labeled])
    if squared:
        total = np.sqrt(total)
    return {int(c): float(total[c]) for g in analysis.groups for c in g.classes}


def activation_scores(analysis: Analysis, model: onnx.ModelProto,
                      calibration: Callable[[], Iterable[dict[str, np.ndarray]]] | None,
                      *, max_batches: int | None = None, tensors: Iterable[str] | None = None) -> dict[int, float]:
    """Mean |activation| of every class where consumers read it, over calibration batches.

    Raises:
        InputError: no calibration data, or none of it could be read.

    Example:
        >>> scores = activation_scores(analysis, model, lambda: batches)  # doctest: +SKIP
    """
    from onnxpipe.core.session import Session

    if calibration is None:
        raise InputError("prune: importance 'activation' needs calibration data",
                         hint="give calibration data (--data / data.calibration) or use importance: l1")
    names = sorted(set(tensors) if tensors is not None else
                   {u.tensor for u in analysis.weights if u.role == "in"})
    if not names:
        return {int(c): 0.0 for g in analysis.groups for c in g.classes}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    sums = {n: np.zeros(len(analysis.labels[n].ids)) for n in names}
    count = {n: 0 for n in names}
    batches = 0
    with Session(probe, optimization="basic") as session:
        for batch in calibration():
            values = session.run(batch, outputs=names)
            for n, arr in values.items():
                moved = np.moveaxis(np.abs(np.asarray(arr, dtype=np.float64)), analysis.labels[n].axis, 0)
                flat = moved.reshape(moved.shape[0], -1)
                sums[n] += flat.sum(axis=1)
                count[n] += flat.shape[1]
            batches += 1
            if max_batches is not None and batches >= max_batches:
                break
    if not batches:
        raise InputError("prune: the calibration data yielded no batches", hint="check the calibration source")
    total = np.zeros(len(analysis.class_of))
    hits = np.zeros(len(analysis.class_of))
    for n in names:
        ids = analysis.labels[n].ids
        labeled = ids >= 0
        mean = sums[n] / max(count[n], 1)
        np.add.at(total, analysis.class_of[ids[labeled]], mean[labeled])
        np.add.at(hits, analysis.class_of[ids[labeled]], 1)
    avg = np.divide(total, hits, out=np.zeros_like(total), where=hits > 0)
    return {int(c): float(avg[c]) for g in analysis.groups for c in g.classes}
