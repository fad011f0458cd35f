"""Run models on the same inputs and compare every output: the check behind every pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxpipe.core.session import Session


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


@dataclass
class Comparison:
    """How one output compares with its reference."""

    name: str
    max_abs: float
    max_rel: float
    ok: bool
    mismatched: float = 0.0  # fraction of elements out of tolerance
    detail: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "max_abs_diff": self.max_abs, "max_rel_diff": self.max_rel,
                "mismatched_fraction": self.mismatched, "ok": self.ok, "detail": self.detail}


def compare(name: str, actual: np.ndarray, expected: np.ndarray, *, atol: float, rtol: float) -> Comparison:
    """Elementwise ``|a - e| <= atol + rtol * |e|``; NaNs must match NaNs.

    Example:
        >>> compare("y", np.ones(3), np.ones(3), atol=1e-6, rtol=0).ok
        True
    """
    a = np.asarray(actual)
    e = np.asarray(expected)
    if a.shape != e.shape:
        if a.size == e.size and a.size > 0 and a.squeeze().shape == e.squeeze().shape:
            a = a.reshape(e.shape)
        else:
            return Comparison(name, float("inf"), float("inf"), False, 1.0,
                              f"shape {tuple(a.shape)} vs expected {tuple(e.shape)}")
    if a.size == 0:
        return Comparison(name, 0.0, 0.0, True)
    if not (np.issubdtype(e.dtype, np.number) or e.dtype == np.bool_):
        ok = bool(np.array_equal(a, e))
        return Comparison(name, 0.0 if ok else float("inf"), 0.0 if ok else float("inf"), ok, 0.0 if ok else 1.0)
    a64 = a.astype(np.float64)
    e64 = e.astype(np.float64)
    nan_a, nan_e = np.isnan(a64), np.isnan(e64)
    both_nan = nan_a & nan_e
    diff = np.where(both_nan, 0.0, np.abs(a64 - e64))
    diff = np.where(nan_a ^ nan_e, np.inf, diff)
    # non-finite equal values (inf == inf) are a match
    diff = np.where(np.isinf(a64) & np.isinf(e64) & (a64 == e64), 0.0, diff)
    bad = diff > (atol + rtol * np.abs(np.nan_to_num(e64)))
    rel = diff / np.maximum(np.abs(e64), np.finfo(np.float64).tiny)
    rel = np.where(diff == 0, 0.0, rel)
    return Comparison(name, float(np.max(diff)), float(np.max(rel)), not bool(bad.any()), float(bad.mean()))
