"""Agreement of a changed model with its reference, judged: the verdicts of the passes that change
values by design (int8 quantization, pruning), built on the measures of :mod:`onnxpipe.core.compare`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxpipe.core.compare import Comparison, cosine, exact_agreement, last_axis_rows, sample_cosines, top1_agreement


@dataclass
class Agreement:
    """How one output of a quantized model agrees with the float model, over every sample.

    ``cosine_mean`` is :func:`cosine` and ``cosine_min`` the worst sample's; ``top1`` is
    :func:`top1_agreement` (outputs with a class axis only); ``exact`` is :func:`exact_agreement`
    (integer and boolean outputs).
    """

    name: str
    cosine_mean: float = 1.0
    cosine_min: float = 1.0
    top1: float | None = None
    exact: float | None = None
    max_abs: float = 0.0
    max_rel: float = 0.0
    samples: int = 0
    cosines: np.ndarray | None = field(default=None, repr=False)

    def describe(self) -> str:
        parts = [f"cosine mean {self.cosine_mean:.4f} (min {self.cosine_min:.4f})"] if self.exact is None else []
        if self.top1 is not None:
            parts.append(f"top-1 agreement {self.top1:.1%}")
        if self.exact is not None:
            parts.append(f"{self.exact:.1%} of elements equal")
        return ", ".join(parts)


def agreement(reference: Sequence[Mapping[str, np.ndarray]],
              actual: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Agreement]:
    """Per-output agreement of ``actual`` with ``reference`` over all batches.

    Example:
        >>> ref = [{"y": np.array([[2.0, 1.0], [0.0, 3.0]])}]
        >>> agreement(ref, ref)["y"].top1
        1.0
    """
    cos: dict[str, list[np.ndarray]] = {}
    top: dict[str, list[np.ndarray]] = {}
    exact: dict[str, list[np.ndarray]] = {}
    out: dict[str, Agreement] = {}
    for ref_batch, got_batch in zip(reference, actual):
        for name in [n for n in got_batch if n not in ref_batch]:  # an output the float model lacks
            out[name] = Agreement(name, 0.0, 0.0, max_abs=math.inf, max_rel=math.inf)
        for name, ref in ref_batch.items():
            got = np.asarray(got_batch.get(name)) if name in got_batch else None
            ag = out.setdefault(name, Agreement(name))
            ref = np.asarray(ref)
            if got is None or got.shape != ref.shape:
                ag.cosine_mean = ag.cosine_min = 0.0
                ag.max_abs = ag.max_rel = math.inf
                continue
            ag.samples += ref.shape[0] if ref.ndim else 1
            if not np.issubdtype(ref.dtype, np.floating):
                exact.setdefault(name, []).append((ref == got).reshape(-1))
                continue
            diff = np.abs(got.astype(np.float64) - ref)
            ag.max_abs = max(ag.max_abs, float(diff.max(initial=0.0)))
            ag.max_rel = max(ag.max_rel, float((diff / np.maximum(np.abs(ref), 1e-12)).max(initial=0.0)))
            cos.setdefault(name, []).append(sample_cosines(ref, got))
            if ref.ndim >= 2 and ref.shape[-1] >= 2:
                r, g = last_axis_rows(ref), last_axis_rows(got)
                unique = (r == r.max(axis=1, keepdims=True)).sum(axis=1) == 1
                top.setdefault(name, []).append((r.argmax(-1) == g.argmax(-1))[unique])
    for name, ag in out.items():
        if name in cos and math.isfinite(ag.max_abs):
            c = np.concatenate(cos[name])
            ag.cosine_mean, ag.cosine_min, ag.cosines = float(c.mean()), float(c.min()), c
        if name in top and math.isfinite(ag.max_abs) and sum(t.size for t in top[name]):
            ag.top1 = float(np.concatenate(top[name]).mean())  # rows with a unique reference maximum
        if name in exact and math.isfinite(ag.max_abs):
            ag.exact = float(np.concatenate(exact[name]).mean())
    return out


def judge_cosine(reference: Sequence[Mapping[str, np.ndarray]], actual: Sequence[Mapping[str, np.ndarray]], *,
          min_cosine: float, min_top1: float | None) -> list[Comparison]:
    """Quantization's check: each float output must keep a :func:`cosine` of ``min_cosine``.

    With ``min_top1``, outputs with a class axis must also keep that share of their arg-maxes;
    integer and boolean outputs (arg-max indices, masks) must keep ``min_top1`` (default 0.9) of
    their elements equal: int8 flips near-ties, a wrecked model flips most.
    ``mismatched`` is the share of samples below ``min_cosine``.

    Example:
        >>> y = [{"y": np.array([[1.0, 2.0], [3.0, 1.0]])}]
        >>> [c.ok for c in judge_cosine(y, [{"y": -y[0]["y"]}], min_cosine=0.99, min_top1=None)]
        [False]
    """
    comps = []
    for name, ag in agreement(reference, actual).items():
        if ag.exact is not None:
            need = min_top1 if min_top1 is not None else 0.9
            ok, mismatched, limits = ag.exact >= need, 1.0 - ag.exact, f"needs {need:.0%} equal"
        else:
            ok = ag.cosine_mean >= min_cosine and (min_top1 is None or ag.top1 is None or ag.top1 >= min_top1)
            mismatched = float((ag.cosines < min_cosine).mean()) if ag.cosines is not None else 1.0
            limits = f"needs cosine >= {min_cosine:g}" + (f", top-1 >= {min_top1:.0%}" if min_top1 is not None else "")
        if not math.isfinite(ag.max_abs):
            ok, mismatched = False, 1.0
        detail = ag.describe() if math.isfinite(ag.max_abs) else "output missing or reshaped"
        comps.append(Comparison(name, ag.max_abs, ag.max_rel, bool(ok), mismatched,
                                detail + ("" if ok else f" ({limits})")))
    return comps


def agreement_score(reference: Sequence[Mapping[str, np.ndarray]], actual: Sequence[Mapping[str, np.ndarray]],
          kind: str = "cosine") -> float:
    """One number for agreement with the float model: mean cosine, or mean top-1 agreement.

    Outputs without a class axis count with their cosine under ``top1``; 1.0 means identical.

    Example:
        >>> y = [{"y": np.array([[1.0, 2.0], [3.0, 1.0]])}]
        >>> agreement_score(y, [{"y": np.array([[1.0, 2.0], [1.0, 3.0]])}], "top1")
        0.5
    """
    values = []
    for ag in agreement(reference, actual).values():
        if ag.exact is not None:
            values.append(ag.exact)
        elif kind == "top1" and ag.top1 is not None:
            values.append(ag.top1)
        else:
            values.append(ag.cosine_mean)
    return float(np.mean(values)) if values else 1.0


def _floor_one(name: str, refs: list[np.ndarray], gots: list[np.ndarray], floor: float, mode: str) -> Comparison:
    for r, g in zip(refs, gots):
        if g.shape != r.shape or g.dtype != r.dtype:
            return Comparison(name, float("inf"), float("inf"), False, 1.0,
                              f"expected {r.dtype} {list(r.shape)}, received {g.dtype} {list(g.shape)}")
    ref, got = np.concatenate([r.reshape(-1, *r.shape[1:]) if r.ndim else r.reshape(1) for r in refs]), \
        np.concatenate([g.reshape(-1, *g.shape[1:]) if g.ndim else g.reshape(1) for g in gots])
    if not np.issubdtype(ref.dtype, np.floating):
        frac = exact_agreement(ref, got)
        ok = frac >= floor
        return Comparison(name, 0.0 if frac == 1 else float("inf"), 0.0, ok, 1.0 - frac,
                          f"equal elements {frac:.3f} (floor {floor:g})")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    finite_ref = np.isfinite(ref)
    broken = ~np.isfinite(got) & finite_ref
    max_abs = float(np.nanmax(np.where(finite_ref, diff, 0.0))) if ref.size else 0.0
    max_rel = float(np.nanmax(np.where(finite_ref, diff / np.maximum(np.abs(ref), 1e-30), 0.0))) if ref.size else 0.0
    if broken.any():
        return Comparison(name, float("inf"), float("inf"), False, float(broken.mean()),
                          f"{int(broken.sum())} non-finite value(s) where the reference is finite")
    cos = cosine(np.where(finite_ref, ref, 0), np.where(finite_ref, got, 0))
    top1, rows = top1_agreement(ref, got)
    # auto: scores per class ([N, classes]) are judged by their top-1; feature maps and hidden
    # states ([N, C, H, W], [N, S, H]) by cosine: an arg-max over their last axis means nothing
    use_top1 = mode == "top1" or (mode == "auto" and rows > 0 and ref.ndim == 2)
    if mode == "top1" and rows == 0:
        return Comparison(name, max_abs, max_rel, False, 1.0, "top-1 agreement undefined: every reference row is tied")
    score = top1 if use_top1 and top1 is not None else cos
    detail = (f"top-1 agreement {top1:.3f} over {rows} rows, " if rows else "") + f"cosine {cos:.4f}"
    detail += f" ({'top-1' if use_top1 else 'cosine'} floor {floor:g})"
    return Comparison(name, max_abs, max_rel, score >= floor, 1.0 - score if use_top1 else 0.0, detail)


def judge_floor(before: Sequence[Mapping[str, np.ndarray]], after: Sequence[Mapping[str, np.ndarray]], *,
          floor: float, mode: str = "auto") -> list[Comparison]:
    """Pruning's check: every output keeps its name, shape and dtype, finite values where the
    reference has them, and an agreement of at least ``floor``: :func:`top1_agreement` (``top1``),
    :func:`cosine` (``cosine``), or per output (``auto``: top-1 for scores per class, rank 2,
    where some reference row has a unique maximum; cosine otherwise, as for feature maps and
    hidden states); integer and bool outputs use :func:`exact_agreement`.
    A missing or extra output fails.

    Example:
        >>> [c.ok for c in judge_floor([{"y": np.eye(2)}], [{"y": 2 * np.eye(2)}], floor=0.9)]
        [True]
    """
    names = list(before[0]) if before else []
    out = []
    for name in names:
        if any(name not in a for a in after):
            out.append(Comparison(name, float("inf"), float("inf"), False, 1.0, "output missing after the change"))
            continue
        refs = [np.asarray(b[name]) for b in before]
        gots = [np.asarray(a[name]) for a in after]
        out.append(_floor_one(name, refs, gots, floor, mode))
    extra = sorted({n for a in after for n in a} - set(names))
    out.extend(Comparison(n, float("inf"), float("inf"), False, 1.0, "new output") for n in extra)
    return out
