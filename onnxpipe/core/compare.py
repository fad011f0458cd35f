"""The one comparison vocabulary: how an output is checked against its reference, everywhere.

Every check in onnxpipe (a pass's before/after check, the converter's check, cross-provider
validation, pruning's and quantization's agreement, the quantization budget, the tuner's output
check) uses the definitions here, so a number means the same thing in every report:

- **elementwise tolerance** (:func:`compare`, :class:`Tolerance`): an element passes when
  ``|actual - reference| <= atol + rtol * |reference|``; NaN matches NaN, ``inf`` matches the same
  ``inf``; ``mismatched`` is the fraction of elements that fail.
- **cosine** (:func:`cosine`): the cosine similarity of each *sample* (a row of the leading axis;
  an output of rank 0 or 1 is one sample), averaged over samples. Two all-zero samples
  (norms <= float32's smallest normal) count as 1, one all-zero sample against a non-zero one
  as 0; each value is clipped to [-1, 1]. :func:`sample_cosines` gives the per-sample values
  (worst sample, share of samples below a floor).
- **top-1 agreement** (:func:`top1_agreement`): over the rows of the last axis (every other axis
  flattened), the fraction whose arg-max is unchanged, counted only over rows where the
  reference has a unique maximum (a tie says nothing about agreement); undefined (``None``)
  for outputs of rank < 2, a last axis of 1, or every row tied.
- **top-k overlap** (:func:`topk_overlap`): the mean share of the reference's k largest entries
  per row that are among the actual's k largest (k = min(5, classes)).
- **exact agreement** (:func:`exact_agreement`): for integer and boolean outputs, the fraction of
  equal elements.

The judges that turn these measures into a pass's verdict (quantization's cosine floor, pruning's
agreement floor, the budget's score) are in :mod:`onnxpipe.core.agreement`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from onnxpipe.core.errors import InputError
from onnxpipe.core.session import Session

_TINY = float(np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------- the measures

def _samples(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(1, -1)


def sample_cosines(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """The cosine similarity of each sample (row of the leading axis), as defined above.

    Example:
        >>> sample_cosines(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]])).round(4)
        array([0.7071])
    """
    r, a = _samples(reference), _samples(actual)
    nr, na = np.linalg.norm(r, axis=1), np.linalg.norm(a, axis=1)
    dot = (r * a).sum(axis=1)
    cos = np.where((nr > _TINY) & (na > _TINY), dot / np.maximum(nr * na, _TINY), 0.0)
    return np.clip(np.where((nr <= _TINY) & (na <= _TINY), 1.0, cos), -1.0, 1.0)


def cosine(reference: np.ndarray, actual: np.ndarray) -> float:
    """The mean per-sample cosine similarity (1.0 for an empty output).

    Example:
        >>> cosine(np.array([[1., 0.], [0., 1.]]), np.array([[2., 0.], [1., 0.]]))
        0.5
    """
    return float(sample_cosines(reference, actual).mean()) if np.size(reference) else 1.0


def last_axis_rows(a: np.ndarray) -> np.ndarray:
    """``a`` as rows of its last axis (every other axis flattened): the rows top-1 and top-k count."""
    a = np.asarray(a)
    return a.reshape(-1, a.shape[-1])


def top1_agreement(reference: np.ndarray, actual: np.ndarray) -> tuple[float | None, int]:
    """(agreement, rows counted): rows where the reference's maximum is tied are not counted.

    Example:
        >>> top1_agreement(np.array([[0., 1.], [2., 1.]]), np.array([[0., 3.], [0., 1.]]))
        (0.5, 2)
    """
    if np.ndim(reference) < 2 or np.shape(reference)[-1] < 2 or not np.size(reference):
        return None, 0
    r = last_axis_rows(reference).astype(np.float64)
    a = last_axis_rows(actual).astype(np.float64)
    unique = (r == r.max(axis=1, keepdims=True)).sum(axis=1) == 1
    if not unique.any():
        return None, 0
    same = r.argmax(axis=1) == a.argmax(axis=1)
    return float(same[unique].mean()), int(unique.sum())


def topk_overlap(reference: np.ndarray, actual: np.ndarray, k: int = 5) -> float | None:
    """Mean share of each row's ``k`` largest reference entries found among the actual's ``k`` largest.

    Example:
        >>> topk_overlap(np.array([[3., 2., 1.]]), np.array([[1., 2., 3.]]), k=2)
        0.5
    """
    if np.ndim(reference) < 2 or np.shape(reference)[-1] < 2 or not np.size(reference):
        return None
    r, a = last_axis_rows(reference), last_axis_rows(actual)
    k = min(k, r.shape[-1])
    tr, ta = np.argsort(-r, -1)[:, :k], np.argsort(-a, -1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(tr, ta)]))


def exact_agreement(reference: np.ndarray, actual: np.ndarray) -> float:
    """The fraction of equal elements (integer and boolean outputs); 1.0 for an empty output.

    Example:
        >>> exact_agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4]))
        0.75
    """
    r, a = np.asarray(reference), np.asarray(actual)
    return float(np.mean(r == a)) if r.size else 1.0


# ----------------------------------------------------------------------------- elementwise

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


def outputs_on(model: onnx.ModelProto | str, batches: Sequence[Mapping[str, np.ndarray]],
               *, optimization: str = "all") -> list[dict[str, np.ndarray]]:
    """Outputs of ``model`` (ORT CPU) on every batch of inputs."""
    with Session(model, optimization=optimization) as s:
        return [s.run(b) for b in batches]


# ----------------------------------------------------------------------------- tolerances

@dataclass(frozen=True)
class Tolerance:
    """When an output passes: at most ``max_mismatch`` of its elements outside ``atol + rtol*|ref|``,
    and a (mean per-sample) cosine of at least ``min_cosine`` where given.

    Example:
        >>> Tolerance.parse("1e-3,1e-2")
        Tolerance(atol=0.001, rtol=0.01, max_mismatch=0.0, min_cosine=None)
    """

    atol: float = 1e-4
    rtol: float = 1e-3
    max_mismatch: float = 0.0
    min_cosine: float | None = None

    @classmethod
    def parse(cls, text: str, base: Tolerance | None = None) -> Tolerance:
        parts = [p.strip() for p in text.split(",")]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise InputError(f"cannot read tolerance {text!r}", hint="write ATOL or ATOL,RTOL, e.g. 1e-3,1e-2") from None
        if not 1 <= len(values) <= 2 or any(not math.isfinite(v) or v < 0 for v in values):
            raise InputError(f"cannot read tolerance {text!r}", hint="write ATOL or ATOL,RTOL (finite, non-negative)")
        base = base or cls()
        return replace(base, atol=values[0], rtol=values[1] if len(values) > 1 else base.rtol)


@dataclass
class OutputCheck:
    """One output of one target against the reference."""

    name: str
    ok: bool
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    mismatched: float
    top1: float | None = None
    topk: float | None = None
    detail: str = ""
    tolerance: Tolerance = field(default_factory=Tolerance)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tolerance"] = asdict(self.tolerance)
        return {k: (str(v) if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


def check_output(name: str, actual: Sequence[np.ndarray], expected: Sequence[np.ndarray], tol: Tolerance) -> OutputCheck:
    """Every measure above over every batch of one output; shapes must match batch by batch.

    Example:
        >>> check_output("y", [np.ones(3)], [np.ones(3)], Tolerance()).ok
        True
    """
    worst = None
    for a, e in zip(actual, expected):
        c = compare(name, a, e, atol=tol.atol, rtol=tol.rtol)
        if c.detail:
            return OutputCheck(name, False, c.max_abs, c.max_rel, float("inf"), 0.0, 1.0, detail=c.detail, tolerance=tol)
        worst = c if worst is None else replace(worst, max_abs=max(worst.max_abs, c.max_abs),
                                                max_rel=max(worst.max_rel, c.max_rel))
    a64 = np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in actual]) if actual else np.zeros(0)
    e64 = np.concatenate([np.asarray(e, np.float64).reshape(-1) for e in expected]) if expected else np.zeros(0)
    if a64.size != e64.size:
        return OutputCheck(name, False, float("inf"), float("inf"), float("inf"), 0.0, 1.0,
                           detail=f"{a64.size} elements vs {e64.size} expected", tolerance=tol)
    finite = np.isfinite(a64) & np.isfinite(e64)
    diff = np.abs(a64 - e64)
    mismatched = float(np.mean(diff[finite] > tol.atol + tol.rtol * np.abs(e64[finite]))) if finite.any() else 0.0
    mismatched += float(np.mean(~finite & ~((a64 == e64) | (np.isnan(a64) & np.isnan(e64))))) if a64.size else 0.0
    cos = _batched_cosine(actual, expected)
    top1 = topk = None
    last = [np.asarray(e).shape[-1] for e in expected if np.ndim(e) >= 2]  # scores per row: not 1-D outputs
    if last and min(last) >= 2 and all(np.issubdtype(np.asarray(e).dtype, np.floating) for e in expected):
        ra = np.concatenate([last_axis_rows(a) for a in actual])
        re_ = np.concatenate([last_axis_rows(e) for e in expected])
        top1 = top1_agreement(re_, ra)[0]
        topk = topk_overlap(re_, ra)
    ok = mismatched <= tol.max_mismatch and (tol.min_cosine is None or cos >= tol.min_cosine)
    return OutputCheck(name, ok, worst.max_abs if worst else 0.0, worst.max_rel if worst else 0.0,
                       float(diff[finite].mean()) if finite.any() else 0.0, cos, mismatched, top1, topk, tolerance=tol)


def _batched_cosine(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> float:
    """:func:`cosine` over the samples of every batch, non-finite values left out (set to 0)."""
    cos = []
    for a, e in zip(actual, expected):
        a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if not e64.size:
            continue
        keep = np.isfinite(a64) & np.isfinite(e64)
        cos.append(sample_cosines(np.where(keep, e64, 0.0), np.where(keep, a64, 0.0)))
    return float(np.concatenate(cos).mean()) if cos else 1.0
