"""Task metrics on evaluation data: built-in ones by name, or any Python function."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx

from onnxpipe.core.errors import InputError
from onnxpipe.core.session import Session

MetricFn = Callable[[list[np.ndarray], np.ndarray], float]


def top1(outputs: list[np.ndarray], labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max over the first output's last axis equals the label.

    Example:
        >>> top1([np.array([[0.1, 0.9], [0.8, 0.2]])], np.array([1, 1]))
        0.5
    """
    pred = np.asarray(outputs[0]).argmax(axis=-1)
    return float((pred.reshape(-1) == np.asarray(labels).reshape(-1)).mean())


def top5(outputs: list[np.ndarray], labels: np.ndarray) -> float:
    """Fraction of samples whose label is among the first output's five largest scores."""
    scores = np.asarray(outputs[0])
    k = min(5, scores.shape[-1])
    best = np.argsort(-scores, axis=-1)[..., :k]
    return float((best == np.asarray(labels).reshape(-1, 1)).any(axis=-1).mean())


BUILTIN: dict[str, MetricFn] = {"top1": top1, "top5": top5}


def resolve(metric: str | MetricFn) -> MetricFn:
    """A metric by name (``top1``, ``top5``), by ``file.py:function``, or a callable as is."""
    if callable(metric):
        return metric
    if metric in BUILTIN:
        return BUILTIN[metric]
    if ":" in metric:
        from onnxpipe.core.userfiles import load_callable

        return load_callable(metric, what="metric")
    raise InputError(f"unknown metric {metric!r}", hint=f"use {', '.join(BUILTIN)} or path/to/file.py:function")


def evaluate(model: onnx.ModelProto | str, inputs: Mapping[str, np.ndarray], labels: np.ndarray,
             metric: MetricFn, *, batch_size: int = 256) -> float:
    """Run ``model`` over the evaluation inputs in batches and score the outputs."""
    n = len(labels)
    with Session(model) as s:
        static = [i.shape[0] for i in s.inputs if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0]
        step = static[0] if static else batch_size
        chunks: list[list[np.ndarray]] = []
        for start in range(0, n, step):
            feeds = {k: v[start:start + step] for k, v in inputs.items()}
            short = step - len(next(iter(feeds.values())))
            if static and short:  # a fixed batch: pad the last chunk, then drop the padding
                feeds = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in feeds.items()}
            outs = list(s.run(feeds).values())
            chunks.append([o[: step - short] if static and short else o for o in outs])
    outputs = [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]
    return float(metric(outputs, labels))
