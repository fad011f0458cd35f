"""Prove an ONNX model computes what its framework computes, on example and random batches."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxpipe.converter.base import FrameworkModel
from onnxpipe.core.compare import Comparison, compare
from onnxpipe.core.errors import CheckFailedError
from onnxpipe.core.session import Session
from onnxpipe.core.tensors import batched_inputs, graph_inputs, random_like


@dataclass
class CheckRun:
    """One set of inputs: which batch, and how every output compared."""

    label: str
    batch: int | None
    outputs: list[Comparison]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.outputs)


@dataclass
class CheckReport:
    """Every run of the check and the worst case per output."""

    atol: float
    rtol: float
    runs: list[CheckRun] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs)

    def worst(self) -> list[Comparison]:
        """Per output: the largest diffs over all runs, failed if any run failed."""
        names: list[str] = []
        for r in self.runs:
            names += [c.name for c in r.outputs if c.name not in names]
        out = []
        for name in names:
            cs = [c for r in self.runs for c in r.outputs if c.name == name]
            detail = next((c.detail for c in cs if c.detail), "")
            out.append(Comparison(name, max(c.max_abs for c in cs), max(c.max_rel for c in cs),
                                  all(c.ok for c in cs), max(c.mismatched for c in cs), detail))
        return out

    def as_dict(self) -> dict:
        return {"ok": self.ok, "atol": self.atol, "rtol": self.rtol,
                "outputs": [c.as_dict() for c in self.worst()],
                "runs": [{"label": r.label, "batch": r.batch, "ok": r.ok} for r in self.runs]}


def _dynamic_first_axis(model: onnx.ModelProto, names: set[str]) -> bool:
    for info in graph_inputs(model):
        if info.name in names and info.shape and isinstance(info.shape[0], int) and info.shape[0] > 0:
            return False
    return True


Feeds = list[tuple[str, int | None, dict[str, np.ndarray]]]
"""The check's input sets: ``(label, batch, feeds)``."""


def check_feeds(model: onnx.ModelProto, fm: FrameworkModel, *, random_batches: int = 2, seed: int = 0) -> Feeds:
    """The example inputs, then ``random_batches`` random batches drawn from the examples' value
    ranges, at another batch size when the model's first axis is dynamic (only the model's
    inputs are read, so a model whose weights stay on disk will do)."""
    rng = np.random.default_rng(seed)
    batched, batch = batched_inputs(fm.inputs)
    feeds_list: Feeds = [("example", batch, dict(fm.inputs))]
    other = batch
    if batched and _dynamic_first_axis(model, batched):
        other = batch + 2
    for k in range(random_batches):
        feeds = {}
        for name, arr in fm.inputs.items():
            shape = ((other,) + arr.shape[1:]) if name in batched else arr.shape
            feeds[name] = random_like(arr, shape, rng)
        feeds_list.append((f"random #{k + 1}", other, feeds))
    return feeds_list


def compare_outputs(model: str | os.PathLike | onnx.ModelProto, feeds_list: Feeds, expected: list[list[np.ndarray]],
                    *, atol: float, rtol: float) -> CheckReport:
    """Run ``model`` (ONNX Runtime, CPU) on each input set and compare with the framework's ``expected``
    outputs, computed beforehand (so the framework's model may be gone by now)."""
    report = CheckReport(atol, rtol)
    with Session(model) as session:
        onnx_names = session.output_names
        for (label, b, feeds), exp_outputs in zip(feeds_list, expected):
            got = session.run(feeds)
            comps = []
            if len(exp_outputs) != len(onnx_names):
                comps.append(Comparison("(outputs)", float("inf"), float("inf"), False, 1.0,
                                        f"ONNX model has {len(onnx_names)} outputs, framework {len(exp_outputs)}"))
            for name, exp in zip(onnx_names, exp_outputs):
                comps.append(compare(name, got[name], exp, atol=atol, rtol=rtol))
            report.runs.append(CheckRun(label, b, comps))
    return report


def verify(model: onnx.ModelProto, fm: FrameworkModel, *, atol: float, rtol: float,
           random_batches: int = 2, seed: int = 0) -> CheckReport:
    """Compare every output of ``model`` (ONNX Runtime, CPU) with the framework's own.

    Runs the example inputs, then ``random_batches`` random batches drawn from the examples'
    value ranges, at another batch size when the model's first axis is dynamic
    (:func:`check_feeds`, :func:`compare_outputs`).
    """
    feeds_list = check_feeds(model, fm, random_batches=random_batches, seed=seed)
    expected = [fm.reference(feeds) for _, _, feeds in feeds_list]
    return compare_outputs(model, feeds_list, expected, atol=atol, rtol=rtol)


def raise_if_failed(result: Any, *, atol: float, rtol: float, reference: str, kept: str = "model") -> None:
    """Raise :class:`CheckFailedError` (carrying ``result``) when ``result.check`` failed, naming each output
    off and where the written ``kept`` (model or output folder) is; nothing when it passed or did not run."""
    if result.check is None or result.check.ok:
        return
    bad = [c for c in result.check.worst() if not c.ok]
    summary = ", ".join(f"{c.name} max abs diff {c.max_abs:.3g}" + (f" ({c.detail})" if c.detail else "") for c in bad)
    where = f"; the {kept} is kept at {result.path}" if result.path else ""
    err = CheckFailedError(f"ONNX outputs differ from {reference} beyond atol={atol:g}, rtol={rtol:g}: "
                           f"{summary}{where}", hint="inspect it, loosen --atol/--rtol, or --no-check")
    err.result = result  # type: ignore[attr-defined]
    raise err
