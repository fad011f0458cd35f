"""``onnxpipe auto``'s candidates: the records it keeps, and which passes and variants it tries.

:func:`singles` lists each pass family alone in the variants that suit the device and model;
:func:`fallbacks` lists the retries of a quantize variant that went over the metric budget.
The search loop (:mod:`onnxpipe.pipeline.auto`) decides what to build from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxpipe.core.errors import InputError
from onnxpipe.pipeline.objective import Objective

FAMILY_ORDER = ("fuse", "prune", "precision", "strip")
PRUNE_RATIOS = (0.25, 0.5)


@dataclass
class Candidate:
    """One pipeline tried: its passes (after the input), what it measured, and its fate."""

    name: str
    passes: list[Any]
    family: str = "baseline"
    parent: str | None = None
    status: str = "pending"  # pending, measured, failed, skipped
    kept: bool = False
    why: str = ""
    latency_ms: float | None = None
    throughput: float | None = None
    size_bytes: int | None = None
    metric: float | None = None
    ratio: float | None = None
    """Median per-round latency ratio against the baseline (below 1: faster)."""
    noise: float | None = None
    parent_ratio: float | None = None
    parent_noise: float | None = None
    build_s: float = 0.0
    measure_s: float = 0.0
    model: onnx.ModelProto | None = field(default=None, repr=False)

    def objective_value(self, goal: str) -> float | None:
        return {"latency": self.latency_ms, "throughput": self.throughput, "size": self.size_bytes}[goal]

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "model"}
        d["passes"] = [p if isinstance(p, (str, Mapping)) else repr(p) for p in self.passes]
        d["speedup"] = (1 / self.ratio) if self.ratio else None
        return d


@dataclass
class AutoResult:
    """Every candidate, the winner, and where the files went."""

    outdir: Path
    objective: Objective
    candidates: list[Candidate]
    winner: Candidate
    baseline: Candidate
    metric_name: str
    elapsed_s: float
    budget_s: float
    machine: dict[str, Any] = field(default_factory=dict)
    tuned_device: str | None = None
    conversion_s: float = 0.0
    prepare_s: float = 0.0
    """Checks, conversion, reading the data and building the baseline: before the budget's clock starts."""

    def as_dict(self) -> dict[str, Any]:
        return {"objective": self.objective.as_dict(), "metric": self.metric_name, "budget_s": self.budget_s,
                "elapsed_s": round(self.elapsed_s, 3), "conversion_s": round(self.conversion_s, 3),
                "prepare_s": round(self.prepare_s, 3), "machine": self.machine, "winner": self.winner.name,
                "baseline": self.baseline.name, "tuned_device": self.tuned_device,
                "candidates": [c.as_dict() for c in self.candidates]}


# -- what to try ---------------------------------------------------------------------------------

def _has_pass(name: str) -> bool:
    from onnxpipe.passes import PASSES

    return name in PASSES


def _accepts(name: str, cfg: Mapping[str, Any]) -> bool:
    """Whether pass ``name`` takes these options (so options that land later join without a change here)."""
    from onnxpipe.passes import get_pass

    try:
        get_pass(name).parse_config(dict(cfg))
        return True
    except InputError:
        return False


def _quantize_accepts(cfg: Mapping[str, Any]) -> bool:
    return _accepts("quantize", cfg)


def _matmul_heavy(model: onnx.ModelProto) -> bool:
    from onnxpipe.passes.quantize import _conv_share

    ops = {n.op_type for n in model.graph.node}
    return bool(ops & {"MatMul", "Gemm"}) and _conv_share(model) < 0.5


def singles(model: onnx.ModelProto, device: str, *, has_data: bool) -> list[tuple[str, str, Any]]:
    """``(label, family, pass spec)`` of every variant worth trying alone on this model and device.

    Availability comes from the pass registry and the quantize pass's own options, so passes that
    land later (``fuse``, ``quantize: {mode: int4}``) join the search without a change here.
    """
    from onnxpipe.runtimes.providers import Device

    d = Device.parse(device)
    gpu = d.is_gpu
    target = "tensorrt" if d.kind == "tensorrt" else "cuda" if gpu else "cpu"
    out: list[tuple[str, str, Any]] = []
    if _has_pass("fuse"):  # the target where the pass times its fusions, when it takes one
        out.append(("fuse", "fuse", {"fuse": {"target": device}} if _accepts("fuse", {"target": device}) else "fuse"))
    heavy = _matmul_heavy(model)
    if not gpu and heavy:  # dynamic int8: no data needed, and what MatMul-heavy models run fastest on CPU
        out.append(("int8 dynamic", "precision", {"quantize": {"mode": "dynamic"}}))
    if has_data:  # one variant per format first: formats change speed; calibrators only accuracy (fallbacks)
        # on CPU, QOperator first: the kernels (QLinearConv, QGemm) ORT's CPU provider runs as they are;
        # QDQ runs fast only where ORT fuses each group back into them
        for fmt in ("qoperator", "qdq") if target == "cpu" else ("qdq",):
            out.append((f"int8 static {fmt} minmax", "precision",
                        {"quantize": {"mode": "static", "target": target, "format": fmt, "calibration": "minmax"}}))
    if heavy and _quantize_accepts({"mode": "int4"}):
        out.append(("int4", "precision", {"quantize": {"mode": "int4"}}))
    if gpu:
        out.append(("fp16", "precision", {"fp16": {}}))
    for r in PRUNE_RATIOS:
        cfg: dict[str, Any] = {"ratio": r, "round_to": 8}
        if has_data:
            cfg["reconstruct"] = True
        out.append((f"prune {r:g}", "prune", {"prune": cfg}))
    out.append(("strip", "strip", "strip"))
    if not gpu and not heavy:  # ConvInteger seldom pays on CPU: last, and stopped early when clearly slower
        out.append(("int8 dynamic", "precision", {"quantize": {"mode": "dynamic"}}))
    return out


def fallbacks(label: str, spec: Any, device: str, max_drop: float) -> list[tuple[str, Any]]:
    """Variants of a quantize candidate that was fast enough but over the metric budget.

    Another calibrator (percentile on CPU, entropy on GPUs) for static models, then the pass's own
    ``max_drop`` search, which keeps the most sensitive nodes in float until the budget holds.

    Example:
        >>> [lbl for lbl, _ in fallbacks("int8 dynamic", {"quantize": {"mode": "dynamic"}}, "cpu", 0.01)]
        ['int8 dynamic max_drop']
    """
    from onnxpipe.runtimes.providers import Device

    if not (isinstance(spec, Mapping) and "quantize" in spec):
        return []
    cfg = dict(spec["quantize"])
    out = []
    if cfg.get("mode") == "static" and cfg.get("calibration", "minmax") == "minmax":
        cal = "entropy" if Device.parse(device).is_gpu else "percentile"
        out.append((label.replace("minmax", cal), {"quantize": {**cfg, "calibration": cal}}))
    out.append((f"{label} max_drop", {"quantize": {**cfg, "max_drop": max_drop}}))
    return out


def _pass_name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    return next(iter(spec)) if isinstance(spec, Mapping) else getattr(spec, "name", type(spec).__name__)


def _label(passes: Sequence[str]) -> str:
    return " + ".join(passes)
