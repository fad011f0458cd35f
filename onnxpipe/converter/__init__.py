"""Framework model -> checked ONNX model: one backend module per framework.

Floor: stands on :mod:`onnxpipe.core` and may apply passes (:mod:`onnxpipe.passes`); it never
imports the runtimes, the partitioner or anything above them.

Example:
    >>> from onnxpipe.converter import convert
    >>> result = convert("models/digits_cnn/model.py:build", "digits.onnx")  # doctest: +SKIP
    >>> result.check.ok  # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxpipe.converter.base import DEFAULT_OPSET, Attempt, FrameworkModel
from onnxpipe.converter.check import CheckReport, raise_if_failed, verify
from onnxpipe.core.errors import InputError
from onnxpipe.core.modelio import EXTERNAL_DATA_THRESHOLD, check_model, save_model
from onnxpipe.core.tensors import InputSpec

__all__ = ["DEFAULT_OPSET", "ConversionResult", "convert", "load_source"]


@dataclass
class ConversionResult:
    """What ``convert`` produced: the model, how, and the proof that it agrees with the framework."""

    model: onnx.ModelProto
    framework: str
    kind: str
    exporter: str
    attempts: list[Attempt] = field(default_factory=list)
    check: CheckReport | None = None
    path: Path | None = None
    seconds: float = 0.0
    source: FrameworkModel | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None,
            "framework": self.framework,
            "kind": self.kind,
            "exporter": self.exporter,
            "attempts": [a.as_dict() for a in self.attempts],
            "check": self.check.as_dict() if self.check else None,
            "seconds": round(self.seconds, 3),
        }


def load_source(source: str | os.PathLike, *, framework: str | None = None,
                inputs: Sequence[InputSpec | str] = (), trust: bool = False) -> FrameworkModel:
    """Load SOURCE (factory, archive, SavedModel, .keras or .onnx) without converting it."""
    from onnxpipe.converter import source as src

    specs = [s if isinstance(s, InputSpec) else InputSpec.parse(s) for s in inputs]
    return src.load(str(source), framework=framework, specs=specs, trust=trust)


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    if model.ByteSize() >= EXTERNAL_DATA_THRESHOLD:
        return model
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is a nicety; the model stays valid without it
        return model


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    framework: str | None = None,
    inputs: Sequence[InputSpec | str] = (),
    dynamic_batch: bool = True,
    opset: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    check: bool = True,
    external_data_threshold: int | None = None,
    task: str | None = None,
    trust: bool = False,
) -> ConversionResult:
    """Convert SOURCE to ONNX, prove it agrees with the framework, and write it to ``output``.

    Args:
        source: ``file.py:factory``, a TorchScript ``.pt``, a ``.pt2``, a SavedModel directory,
            a ``.keras`` file or an ``.onnx`` file.
        output: where to write the model (atomically); None keeps it in memory only.
        framework: ``torch``, ``tensorflow`` or ``onnx`` to insist on; None detects.
        inputs: ``NAME:1x3x224x224:float32`` specs where the source carries no example inputs.
        dynamic_batch: make the first axis of batched inputs and outputs symbolic.
        opset: target opset; None means :data:`DEFAULT_OPSET` for frameworks, unchanged for ONNX.
        atol, rtol: tolerance of the check, ``|onnx - ref| <= atol + rtol * |ref|``.
        check: compare outputs with the framework; a failure raises :class:`CheckFailedError`
            after writing the model, so it can be inspected.
        external_data_threshold: initializer bytes above which weights go to a ``.data`` file.
        task: for a Hugging Face ``save_pretrained`` folder, the task to export it for
            (``text-generation`` writes a decoder folder); None infers it from the config. See
            :func:`onnxpipe.converter.huggingface.convert_folder`.
        trust: allow a source that can run code while it loads: a pickled PyTorch module, pickled
            objects in a ``.pt2``, a SavedModel with file or Python ops (``file.py:factory`` is code
            by nature and always runs).

    Returns:
        A :class:`ConversionResult` (a ``HFConversionResult`` for a Hugging Face folder).
    """
    start = time.perf_counter()
    from onnxpipe.converter.huggingface import folder_from_factory, is_hf_folder
    from onnxpipe.converter.source import split_factory

    if task is not None and split_factory(str(source)) is not None:
        source = folder_from_factory(str(source))  # with --task, a factory names a save_pretrained folder
    if is_hf_folder(source):
        from onnxpipe.converter.huggingface import convert_folder

        if framework not in (None, "torch"):
            raise InputError(f"--framework {framework} was given but {source} is a Hugging Face (PyTorch) folder",
                             hint="drop --framework")
        return convert_folder(source, output, task=task, opset=opset, atol=atol, rtol=rtol, check=check,
                              external_data_threshold=external_data_threshold)
    if task is not None:
        raise InputError(f"--task applies to Hugging Face model folders, and {source} is not one (no config.json)",
                         hint="drop --task, or give a folder written by save_pretrained")
    fm = load_source(source, framework=framework, inputs=inputs, trust=trust)
    if fm.framework == "torch":
        from onnxpipe.converter import pytorch as backend
    elif fm.framework == "tensorflow":
        from onnxpipe.converter import tensorflow as backend  # type: ignore[no-redef]
    else:
        from onnxpipe.converter import onnx_file as backend  # type: ignore[no-redef]
    target_opset = opset if (opset is not None or fm.framework == "onnx") else DEFAULT_OPSET
    outcome = backend.export(fm, opset=target_opset, dynamic_batch=dynamic_batch)
    model = _infer_shapes(outcome.model)
    check_model(model, what="the exported model")
    result = ConversionResult(model, fm.framework, fm.kind, outcome.exporter, outcome.attempts, source=fm)
    if check:
        result.check = verify(model, fm, atol=atol, rtol=rtol)
    if output is not None:
        result.path = save_model(model, output, threshold=external_data_threshold)
    result.seconds = time.perf_counter() - start
    raise_if_failed(result, atol=atol, rtol=rtol, reference="the framework")
    return result
