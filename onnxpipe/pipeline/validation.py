"""Cross-provider validation with precision variants built by onnxpipe's own passes.

The validator itself is :func:`onnxpipe.runtimes.validate.validate` (one for the CLI, the recipe's
``validate:`` step and the API); this floor adds what a runtime may not do: convert the model to
fp16 (the ``fp16`` pass) or int8 (the ``quantize`` pass, dynamic mode) for a target that asks.

Example:
    >>> report = validate("model.onnx", parse_targets("cpu,cpu/fp16,cpu/int8"), inputs=[{"x": x}])  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpipe.core.compare import Tolerance
from onnxpipe.core.errors import InputError
from onnxpipe.passes.base import PassContext, apply_pass
from onnxpipe.runtimes.providers import Device
from onnxpipe.runtimes.validate import QUANTIZED_OPS, Target, ValidationReport, device_variant, parse_targets
from onnxpipe.runtimes.validate import validate as validate_on_devices

__all__ = ["parse_targets", "precision_model", "validate", "validate_providers"]


def precision_model(model: onnx.ModelProto, target: Target, workdir: Path) -> tuple[onnx.ModelProto | str, Device]:
    """The model and device that run ``target``'s precision: fp16 through the ``fp16`` pass, int8
    through the ``quantize`` pass (dynamic, int8 weights); TensorRT and fp32 as
    :func:`~onnxpipe.runtimes.validate.device_variant` says.

    Example:
        >>> m, dev = precision_model(model, Target(Device.parse("cpu"), "fp16"), tmp)  # doctest: +SKIP
    """
    dev, p = target.device, target.precision
    if p == "fp32" or dev.kind == "tensorrt":
        return device_variant(model, target, workdir)
    if p == "fp16":
        from onnxpipe.passes.fp16 import Fp16

        return apply_pass(Fp16({}), model, PassContext()).model, dev
    if any(n.op_type in QUANTIZED_OPS for n in model.graph.node):
        return model, dev  # already int8
    from onnxpipe.passes.quantize import Quantize

    try:
        return apply_pass(Quantize({"mode": "dynamic"}), model, PassContext(workdir=workdir)).model, dev
    except InputError as exc:
        if not exc.message.startswith("nothing to quantize"):
            raise
        return model, dev  # no MatMul, Gemm, Conv ... to quantize: int8 runs the float graph


def validate(model: onnx.ModelProto | str | os.PathLike, targets: Sequence[Target], **options: Any) -> ValidationReport:
    """:func:`onnxpipe.runtimes.validate.validate`, with fp16 and int8 targets built by our passes."""
    return validate_on_devices(model, targets, variant=precision_model, **options)


def validate_providers(model: onnx.ModelProto, providers: Sequence[str], inputs: list[dict[str, np.ndarray]],
                       *, atol: float, rtol: float) -> list[dict[str, Any]]:
    """The recipe's ``validate:`` step: the final model on every listed provider against the same
    model on CPU (ONNX Runtime's defaults), every output within ``atol`` / ``rtol``.

    Providers are device specs with options (``cuda:0``, ``tensorrt:0[fp16]``); each row also says
    on which providers the nodes ran.
    """
    targets = [Target(Device.parse("cpu"))] + [Target(Device.parse(p)) for p in providers]
    report = validate(model, targets, inputs=inputs, default=Tolerance(atol, rtol))
    return [{"provider": name, "ok": row.ok, "outputs": [o.as_dict() for o in row.outputs],
             "placement": row.placement_counts, **({"error": row.error} if row.error else {})}
            for name, row in zip(providers, report.rows[1:])]
