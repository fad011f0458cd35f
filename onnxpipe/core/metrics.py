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


def _perplexity() -> MetricFn:
    from onnxpipe.core.perplexity import perplexity

    return perplexity


BUILTIN: dict[str, MetricFn] = {"top1": top1, "top5": top5}
LAZY: dict[str, Callable[[], MetricFn]] = {"perplexity": _perplexity}  # lower is better


def higher_is_better(metric: MetricFn) -> bool:
    """Whether larger values of ``metric`` are better (a function says otherwise with ``higher_is_better = False``)."""
    return bool(getattr(metric, "higher_is_better", True))


def resolve(metric: str | MetricFn) -> MetricFn:
    """A metric by name (``top1``, ``top5``, ``perplexity``), by ``file.py:function``, or a callable as is."""
    if callable(metric):
        return metric
    if metric in BUILTIN:
        return BUILTIN[metric]
    if metric in LAZY:
        return LAZY[metric]()
    if ":" in metric:
        from onnxpipe.core.userfiles import load_callable

        return load_callable(metric, what="metric")
    raise InputError(f"unknown metric {metric!r}", hint=f"use {', '.join([*BUILTIN, *LAZY])} or path/to/file.py:function")


def evaluate(model: onnx.ModelProto | str, inputs: Mapping[str, np.ndarray], labels: np.ndarray,
             metric: MetricFn, *, batch_size: int = 256) -> float:
    """Run ``model`` over the evaluation inputs in batches and score the outputs.

    A metric with an ``evaluate_model(model, inputs, labels)`` attribute (perplexity) runs the
    model itself, reducing each batch as it comes instead of keeping every output.
    """
    if hasattr(metric, "evaluate_model"):
        return float(metric.evaluate_model(model, inputs, labels))
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


def bind(metric: MetricFn, inputs: Mapping[str, np.ndarray], labels: np.ndarray) -> Callable[[onnx.ModelProto], float]:
    """``score(model) -> float`` on fixed evaluation data; carries the metric's ``higher_is_better``."""

    def score(model: onnx.ModelProto) -> float:
        return evaluate(model, inputs, labels, metric)

    score.higher_is_better = higher_is_better(metric)  # type: ignore[attr-defined]
    score.__name__ = getattr(metric, "__name__", "metric")
    return score
