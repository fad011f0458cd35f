"""Run models on the same inputs and compare every output: the check behind every pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxpipe.runtimes.session import Session
from onnxpipe.tensors import Comparison, compare


def outputs_on(model: onnx.ModelProto | str, batches: Sequence[Mapping[str, np.ndarray]],
               *, optimization: str = "all") -> list[dict[str, np.ndarray]]:
    """Outputs of ``model`` (ORT CPU) on every batch of inputs."""
    with Session(model, optimization=optimization) as s:
        return [s.run(b) for b in batches]


def compare_runs(expected: Sequence[Mapping[str, np.ndarray]], actual: Sequence[Mapping[str, np.ndarray]],
                 *, atol: float, rtol: float) -> list[Comparison]:
    """Worst case per output over all batches; a missing or extra output is a failure.

    Example:
        >>> a = [{"y": np.ones(2)}]
        >>> [c.ok for c in compare_runs(a, a, atol=0, rtol=0)]
        [True]
    """
    worst: dict[str, Comparison] = {}
    for exp, got in zip(expected, actual):
        names = list(exp) + [n for n in got if n not in exp]
        for name in names:
            if name not in got or name not in exp:
                c = Comparison(name, float("inf"), float("inf"), False, 1.0,
                               "output missing after the change" if name not in got else "new output")
            else:
                c = compare(name, got[name], exp[name], atol=atol, rtol=rtol)
            prev = worst.get(name)
            if prev is None:
                worst[name] = c
            else:
                worst[name] = Comparison(name, max(prev.max_abs, c.max_abs), max(prev.max_rel, c.max_rel),
                                         prev.ok and c.ok, max(prev.mismatched, c.mismatched),
                                         prev.detail or c.detail)
    return list(worst.values())
