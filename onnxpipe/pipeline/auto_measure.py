"""``onnxpipe auto``'s measurements: the metric a candidate is scored on, and its side-by-side timing."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from onnxpipe.pipeline.objective import Objective, ratio_noise

CLEARLY_SLOWER = 1.5  # a candidate this much slower than the baseline after two rounds is not timed further


# -- measuring -----------------------------------------------------------------------------------

class _Metric:
    """The task metric on evaluation data, or mean cosine agreement with the float model's outputs."""

    def __init__(self, reference: onnx.ModelProto, inputs: list[dict[str, np.ndarray]],
                 evaluation: tuple[dict[str, np.ndarray], np.ndarray] | None, metric: Any) -> None:
        from onnxpipe.core.metrics import resolve

        self.evaluation = evaluation
        if evaluation is not None:
            self.fn = resolve(metric or "top1")
            self.name = metric if isinstance(metric, str) else getattr(self.fn, "__name__", "metric")
            return
        from onnxpipe.core.compare import outputs_on

        self.name = "cosine vs float"
        self.inputs = inputs
        self.reference = outputs_on(reference, inputs)

    def __call__(self, model: onnx.ModelProto) -> float:
        if self.evaluation is not None:
            from onnxpipe.core.metrics import evaluate

            return evaluate(model, self.evaluation[0], self.evaluation[1], self.fn)
        from onnxpipe.core.compare import outputs_on, sample_cosines
        from onnxpipe.pipeline import fit_inputs

        got = outputs_on(model, fit_inputs(model, self.inputs))
        scores = []
        for ref, out in zip(self.reference, got):
            for name, r in ref.items():
                if name in out and np.issubdtype(r.dtype, np.floating):
                    a = np.asarray(out[name], dtype=np.float64)
                    if a.shape != r.shape:
                        a = a[: len(r)]
                    scores.append(sample_cosines(r.astype(np.float64), a))
        return float(np.mean(np.concatenate(scores))) if scores else 1.0


def _time(models: Sequence[onnx.ModelProto], feeds: Mapping[str, np.ndarray], objective: Objective,
          deadline: float | None) -> list[list[float]]:
    """Per-round medians (ms) of every model, timed in interleaved rounds on the objective's device."""
    import contextlib

    from onnxpipe.core.timing import interleaved_ms
    from onnxpipe.pipeline import fit_inputs
    from onnxpipe.runtimes.device_session import DeviceSession

    with contextlib.ExitStack() as stack:
        runs, slowest = [], 0.0
        for m in models:
            s = stack.enter_context(DeviceSession(m, objective.device))
            f = s.check_feeds(fit_inputs(m, [feeds])[0])
            runs.append(lambda s=s, f=f: s.run(f))
            t0 = time.perf_counter()
            runs[-1]()  # a probe: slow models get fewer runs per round, not a blown budget
            slowest = max(slowest, time.perf_counter() - t0)
        repeat = 3 if slowest < objective.round_s / 3 else 1
        return interleaved_ms(runs, rounds=objective.rounds, budget_s=objective.round_s, deadline=deadline,
                              min_runs=repeat, stop=_clearly_slower)


def _clearly_slower(rounds: list[list[float]]) -> bool:
    """After two rounds, the last model (the candidate) at 1.5x the first (the baseline) or worse: stop timing."""
    return len(rounds[0]) >= 2 and ratio_noise(rounds[0], rounds[-1])[0] > CLEARLY_SLOWER
