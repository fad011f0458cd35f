"""Cross-provider validation: one model on several providers and precisions, every output against a reference.

Targets are devices with an optional precision, ``cpu``, ``cuda:0/fp16``, ``tensorrt/int8``.
TensorRT gets its own ``fp16`` / ``int8`` builder flags; fp16 and int8 on CPU/CUDA run a converted
model that the caller's ``variant`` builds (:mod:`onnxpipe.pipeline.validation` builds it with
onnxpipe's own ``fp16`` and ``quantize`` passes; a model with Q/DQ nodes already is run as is). The reference is the first target, another model (run on CPU
in fp32), or saved outputs (``.npz``).

Example:
    >>> report = validate("model.onnx", parse_targets("cpu,cpu/fp16"), inputs=[{"x": x}])  # doctest: +SKIP
    >>> report.ok  # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.markup import escape
from rich.table import Table

from onnxpipe.core.compare import OutputCheck, Tolerance, check_output
from onnxpipe.core.errors import InputError, OnnxpipeError
from onnxpipe.core.modelio import load_model
from onnxpipe.core.userfiles import first_line
from onnxpipe.runtimes.providers import Device, split_devices

PRECISIONS = ("fp32", "fp16", "int8")


# float16 rounds at ~1e-3 relative; int8 is judged by agreement, not elementwise closeness
DEFAULTS = {"fp32": Tolerance(1e-4, 1e-3), "fp16": Tolerance(1e-2, 1e-2, 1e-3),
            "int8": Tolerance(1e-1, 1e-1, 0.05, 0.98)}


@dataclass(frozen=True)
class Target:
    """A device and a precision: one row of the matrix."""

    device: Device
    precision: str = "fp32"

    @property
    def label(self) -> str:
        return self.device.label + ("" if self.precision == "fp32" else f"/{self.precision}")


def parse_targets(spec: str | Sequence[str], precisions: Sequence[str] = ()) -> list[Target]:
    """``"cpu,cuda/fp16"`` -> targets; ``precisions`` multiplies those without their own.

    Example:
        >>> [t.label for t in parse_targets("cpu,cpu:1/fp16")]
        ['cpu:0', 'cpu:1/fp16']
    """
    items = split_devices(spec) if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        dev, _, prec = str(item).partition("/")
        for p in [prec] if prec else (list(precisions) or ["fp32"]):
            if p not in PRECISIONS:
                raise InputError(f"unknown precision {p!r} in {item!r}", hint=f"use one of {', '.join(PRECISIONS)}")
            out.append(Target(Device.parse(dev), p))
    if not out:
        raise InputError("no providers given", hint="e.g. --providers cpu,cuda")
    return out


@dataclass
class Row:
    """A target's outputs checked against the reference (or why it could not run)."""

    target: str
    outputs: list[OutputCheck] = field(default_factory=list)
    error: str | None = None
    placement: str | None = None
    placement_counts: dict[str, Any] | None = None  # per provider, as Placement.as_dict() says
    localized: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(o.ok for o in self.outputs)


@dataclass
class ValidationReport:
    """The provider x output matrix."""

    reference: str
    rows: list[Row]
    batches: int

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def as_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "batches": self.batches, "ok": self.ok,
                "rows": [{"target": r.target, "ok": r.ok, "error": r.error, "placement": r.placement,
                          "localized": r.localized, "outputs": [o.as_dict() for o in r.outputs]} for r in self.rows]}

    def table(self) -> Table:
        names = list(dict.fromkeys(o.name for r in self.rows for o in r.outputs))
        t = Table(title=f"validation against {escape(self.reference)} ({self.batches} batch(es))")
        t.add_column("provider")
        for n in names:
            t.add_column(escape(n))
        t.add_column("nodes")
        for r in self.rows:
            if r.error:
                t.add_row(r.target, *([f"[red]ERROR[/] {escape(r.error)}"] + [""] * (len(names) - 1) if names else []),
                          r.placement or "")
                continue
            cells = []
            for n in names:
                o = next((o for o in r.outputs if o.name == n), None)
                if o is None:
                    cells.append("-")
                    continue
                mark = "[green]ok[/]" if o.ok else "[red]FAIL[/]"
                text = f"{mark} max {o.max_abs:.2g} · mean {o.mean_abs:.2g} · cos {o.cosine:.5f}"
                if o.top1 is not None:
                    text += f" · top1 {o.top1:.0%} · top5 {o.topk:.0%}"
                text += f" · out {o.mismatched:.2%}" + (f" · {escape(o.detail)}" if o.detail else "")
                cells.append(text)
            t.add_row(r.target, *cells, r.placement or "")
        return t


Variant = Callable[[onnx.ModelProto, Target, Path], tuple["onnx.ModelProto | str", Device]]
"""Builds the model and device that run a target: ``(model, target, workdir) -> (model or path, device)``."""

QUANTIZED_OPS = ("QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger")


def device_variant(model: onnx.ModelProto, target: Target, workdir: Path) -> tuple[onnx.ModelProto | str, Device]:
    """What runs ``target`` without changing the graph: fp32 as is, TensorRT with its ``fp16`` / ``int8``
    builder flags, a model that is int8 already as is. Other precisions need a converted model,
    built by the caller's ``variant`` (``onnxpipe.pipeline.validation.precision_model`` builds them
    with onnxpipe's own fp16 and quantize passes): runtimes never change a model themselves.

    Example:
        >>> m, dev = device_variant(model, Target(Device.parse("tensorrt"), "fp16"), tmp)  # doctest: +SKIP
        >>> dev.options.fp16  # doctest: +SKIP
        True
    """
    dev, p = target.device, target.precision
    if p == "fp32":
        return model, dev
    if dev.kind == "tensorrt":
        return model, Device.parse(dev, **{p: True})
    if p == "int8" and any(n.op_type in QUANTIZED_OPS for n in model.graph.node):
        return model, dev  # already int8
    raise InputError(f"{target.label}: no {p} build of the model to run",
                     hint="validate with `onnxpipe validate`, which builds it with the fp16 / quantize pass")


def run_target(model: onnx.ModelProto | str, device: Device, batches: Sequence[Mapping[str, np.ndarray]]
               ) -> tuple[list[dict[str, np.ndarray]], Any]:
    """Outputs on every batch, and where the nodes ran (``Placement`` or None).

    Example:
        >>> outs, placed = run_target("m.onnx", Device.parse("cpu"), [{"x": x}])  # doctest: +SKIP
        >>> placed.summary()  # doctest: +SKIP
        'cpu 52'
    """
    from onnxpipe.runtimes.device_session import DeviceSession

    with DeviceSession(model, device) as s:
        outs = [s.run(b) for b in batches]
        return outs, s.placement


def load_outputs_npz(path: str | os.PathLike, batches: int) -> list[dict[str, np.ndarray]]:
    """Saved outputs: plain names for one batch, ``b<k>/<name>`` for several."""
    from onnxpipe.core.userfiles import read_npz

    return split_batches(read_npz(path, what="reference outputs"), batches, what=f"reference outputs {path}")


def split_batches(arrays: Mapping[str, np.ndarray], batches: int | None, *, what: str) -> list[dict[str, np.ndarray]]:
    """``{"b0/x": ..., "b1/x": ...}`` -> batches; plain names are one batch.

    Example:
        >>> [sorted(b) for b in split_batches({"b0/x": 1, "b1/x": 2}, 2, what="inputs")]
        [['x'], ['x']]
    """
    if all("/" not in k for k in arrays):
        out = [dict(arrays)]
    else:
        groups: dict[int, dict[str, np.ndarray]] = {}
        for k, v in arrays.items():
            head, _, name = k.partition("/")
            if not (head.startswith("b") and head[1:].isdigit() and name):
                raise InputError(f"{what}: cannot read key {k!r}", hint="keys are <name> or b<k>/<name>")
            groups.setdefault(int(head[1:]), {})[name] = v
        out = [groups[k] for k in sorted(groups)]
    if batches is not None and len(out) != batches:
        raise InputError(f"{what} holds {len(out)} batch(es), the inputs {batches}",
                         hint="save the reference outputs of exactly these inputs (--load-inputs)")
    return out


def validate(model: onnx.ModelProto | str | os.PathLike, targets: Sequence[Target], *,
             inputs: Sequence[Mapping[str, np.ndarray]], reference: str | os.PathLike | None = None,
             tolerances: Mapping[str, Tolerance] | None = None, default: Tolerance | None = None,
             localize: bool = False, chunk: int = 32, variant: Variant = device_variant) -> ValidationReport:
    """Run every target on ``inputs`` and compare each output with the reference.

    Args:
        model: the model to validate.
        targets: devices and precisions (see :func:`parse_targets`).
        inputs: input batches.
        reference: None (the first target), an ``.onnx`` (run on CPU, fp32) or an ``.npz`` of outputs.
        tolerances: per output name; others use ``default`` or the precision's default.
        default: tolerance for outputs not in ``tolerances`` (None: by precision).
        localize: for a failing row, find the first node whose output diverges.
        chunk: intermediate tensors compared at a time when localizing.
        variant: builds each target's model and device (default :func:`device_variant`: fp32 and
            TensorRT's own precisions; the pipeline floor passes one that builds fp16 / int8 models).

    Raises:
        InputError: a provider this build lacks (before anything runs), unreadable references.

    Example:
        >>> r = validate("m.onnx", parse_targets("cpu,cuda,cuda/fp16"), inputs=[{"x": x}])  # doctest: +SKIP
        >>> [(row.target, row.ok) for row in r.rows]  # doctest: +SKIP
        [('cpu:0 (reference)', True), ('cuda:0', True), ('cuda:0/fp16', True)]
    """
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model, load_external_data=False)
    for t in targets:
        t.device.check_available()
    tolerances = dict(tolerances or {})
    ref_model: onnx.ModelProto | None = None
    ref_device = Device.parse("cpu")
    with tempfile.TemporaryDirectory(prefix="onnxpipe-validate-") as tmp:
        rest = list(targets)
        if reference is None:
            first = rest.pop(0)
            ref_label = first.label
            m, ref_device = variant(proto, first, Path(tmp))
            ref_model = m if isinstance(m, onnx.ModelProto) else load_model(m, load_external_data=False)
            expected, placed = run_target(m, ref_device, inputs)
            rows = [Row(f"{first.label} (reference)", placement=placed.summary() if placed else None,
                        placement_counts=placed.as_dict() if placed else None)]
        elif str(reference).endswith(".npz"):
            ref_label = str(reference)
            expected, rows = load_outputs_npz(reference, len(inputs)), []
        else:
            ref_model = load_model(reference, load_external_data=False)
            ref_label = f"{reference} on cpu"
            expected, _ = run_target(ref_model, ref_device, inputs)
            rows = []
        for target in rest:
            row = Row(target.label)
            rows.append(row)
            try:
                m, dev = variant(proto, target, Path(tmp))
                got, placed = run_target(m, dev, inputs)
                if placed is not None:
                    row.placement, row.placement_counts = placed.summary(), placed.as_dict()
            except OnnxpipeError as exc:
                row.error = exc.message
                continue
            except Exception as exc:  # a provider or quantizer failing is this row's result, not a crash
                row.error = first_line(exc)
                continue
            for name in dict.fromkeys(list(expected[0]) + list(got[0])):
                tol = tolerances.get(name) or default or DEFAULTS[target.precision]
                if name not in got[0] or name not in expected[0]:
                    row.outputs.append(OutputCheck(name, False, float("inf"), float("inf"), float("inf"), 0.0, 1.0,
                                                   detail="missing" if name not in got[0] else "not in reference",
                                                   tolerance=tol))
                    continue
                row.outputs.append(check_output(name, [g[name] for g in got], [e[name] for e in expected], tol))
            if localize and not row.ok:
                row.localized = _localize(m, dev, ref_model, ref_device, inputs[0], row, chunk)
    return ValidationReport(ref_label, rows, len(inputs))


def _localize(model: Any, device: Device, ref_model: onnx.ModelProto | None, ref_device: Device,
              feeds: Mapping[str, np.ndarray], row: Row, chunk: int) -> dict[str, Any]:
    from onnxpipe.runtimes.localize import localize

    if ref_model is None:
        return {"found": False, "why": "saved outputs have no intermediate tensors: give --reference MODEL.onnx"}
    bad = next(o for o in row.outputs if not o.ok)
    m = model if isinstance(model, onnx.ModelProto) else load_model(model, load_external_data=False)
    found = localize(m, device, ref_model, ref_device, feeds, bad.tolerance, chunk=chunk)
    return found.as_dict() if found else {"found": False, "why": "every intermediate tensor matches; only the "
                                                                  "outputs differ (or the graphs share no names)"}
