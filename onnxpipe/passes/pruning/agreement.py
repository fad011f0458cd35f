"""How close a pruned model stays to the unpruned one: the criterion the pipeline judges pruning by.

Pruning changes values by design, so an elementwise tolerance would reject every result.
Instead each output must keep its name, shape and dtype, hold only finite values (where the
reference does), and agree with the reference at least ``floor``:

- ``top1``: the fraction of rows whose arg-max over the last axis is unchanged, counted over
  rows where the reference has a unique maximum (ties say nothing about agreement);
- ``cosine``: the mean cosine similarity per sample (first axis);
- integer and bool outputs: the fraction of equal elements.

``auto`` uses top1 for float outputs of rank >= 2 whose last axis has more than one entry and
where some reference row has a unique maximum, cosine otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from onnxpipe.core.compare import Comparison


def top1_agreement(ref: np.ndarray, got: np.ndarray) -> tuple[float, int]:
    """(agreement, rows counted); rows where the reference's maximum is tied are not counted.

    Example:
        >>> top1_agreement(np.array([[0., 1.], [2., 1.]]), np.array([[0., 3.], [0., 1.]]))
        (0.5, 2)
    """
    r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    g = got.reshape(-1, got.shape[-1]).astype(np.float64)
    top = r.max(axis=1, keepdims=True)
    unique = (r == top).sum(axis=1) == 1
    if not unique.any():
        return float("nan"), 0
    same = r.argmax(axis=1) == g.argmax(axis=1)
    return float(same[unique].mean()), int(unique.sum())


def cosine(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean cosine similarity per sample; two all-zero samples count as identical.

    Example:
        >>> cosine(np.array([[1., 0.]]), np.array([[2., 0.]]))
        1.0
    """
    r = ref.reshape(ref.shape[0] if ref.ndim else 1, -1).astype(np.float64)
    g = got.reshape(r.shape).astype(np.float64)
    nr, ng = np.linalg.norm(r, axis=1), np.linalg.norm(g, axis=1)
    dot = (r * g).sum(axis=1)
    both_zero = (nr == 0) & (ng == 0)
    cos = np.where(both_zero, 1.0, dot / np.maximum(nr * ng, 1e-300))
    return float(np.clip(cos, -1.0, 1.0).mean())


def _one(name: str, refs: list[np.ndarray], gots: list[np.ndarray], floor: float, mode: str) -> Comparison:
    for r, g in zip(refs, gots):
        if g.shape != r.shape or g.dtype != r.dtype:
            return Comparison(name, float("inf"), float("inf"), False, 1.0,
                              f"expected {r.dtype} {list(r.shape)}, received {g.dtype} {list(g.shape)}")
    ref, got = np.concatenate([r.reshape(-1, *r.shape[1:]) if r.ndim else r.reshape(1) for r in refs]), \
        np.concatenate([g.reshape(-1, *g.shape[1:]) if g.ndim else g.reshape(1) for g in gots])
    if not np.issubdtype(ref.dtype, np.floating):
        frac = float(np.mean(ref == got)) if ref.size else 1.0
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
    cos = cosine(np.where(finite_ref, ref, 0), np.where(finite_ref, got, 0)) if ref.size else 1.0
    top1, rows = (top1_agreement(ref, got) if ref.ndim >= 2 and ref.shape[-1] > 1 and ref.size
                  else (float("nan"), 0))
    use_top1 = mode == "top1" or (mode == "auto" and rows > 0)
    if mode == "top1" and rows == 0:
        return Comparison(name, max_abs, max_rel, False, 1.0, "top-1 agreement undefined: every reference row is tied")
    score = top1 if use_top1 else cos
    detail = (f"top-1 agreement {top1:.3f} over {rows} rows, " if rows else "") + f"cosine {cos:.4f}"
    detail += f" ({'top-1' if use_top1 else 'cosine'} floor {floor:g})"
    return Comparison(name, max_abs, max_rel, score >= floor, 1.0 - score if use_top1 else 0.0, detail)


def judge(before: Sequence[Mapping[str, np.ndarray]], after: Sequence[Mapping[str, np.ndarray]], *,
          floor: float, mode: str = "auto") -> list[Comparison]:
    """One Comparison per output of ``before``; a missing or extra output fails.

    Example:
        >>> [c.ok for c in judge([{"y": np.eye(2)}], [{"y": 2 * np.eye(2)}], floor=0.9)]
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
        out.append(_one(name, refs, gots, floor, mode))
    extra = sorted({n for a in after for n in a} - set(names))
    out.extend(Comparison(n, float("inf"), float("inf"), False, 1.0, "new output") for n in extra)
    return out
