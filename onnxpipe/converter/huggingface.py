"""Hugging Face ``save_pretrained`` folders to checked ONNX, by task (the names Optimum uses).

``text-generation`` writes a folder: one decoder ``model.onnx`` that takes ``input_ids``,
``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key|value`` (empty on the first
step) and returns ``logits`` and ``present.{i}.key|value``, beside the tokenizer files, the
configs and a ``genai_config.json`` for onnxruntime-genai. The other tasks write one ``.onnx``.

Example:
    >>> from onnxpipe.converter.huggingface import convert_folder
    >>> result = convert_folder("llama-folder", "llama-onnx", task="text-generation")  # doctest: +SKIP
    >>> result.check.ok  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.converter.base import DEFAULT_OPSET
from onnxpipe.converter.check import raise_if_failed
from onnxpipe.converter.hf_common import (
    TASKS,
    HFConversionResult,
    export_with_fallback,
    load_pretrained,
)
from onnxpipe.core.deps import require
from onnxpipe.core.errors import InputError
from onnxpipe.core.userfiles import first_line

__all__ = ["TASKS", "HFConversionResult", "convert_folder", "infer_task", "is_hf_folder", "read_config"]


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``save_pretrained`` (it holds a ``config.json``)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict; a missing or corrupt one is a one-line error."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise InputError(f"{folder} has no config.json, so it is not a Hugging Face model folder",
                         hint="give a folder written by save_pretrained")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {first_line(exc)}", hint="re-save the model with save_pretrained") from exc
    if not isinstance(config, dict):
        raise InputError(f"{path} holds no JSON object", hint="re-save the model with save_pretrained")
    return config


def infer_task(config: dict[str, Any]) -> str:
    """The task a config's ``architectures`` name, e.g. ``LlamaForCausalLM`` -> ``text-generation``.

    Example:
        >>> infer_task({"architectures": ["BertForSequenceClassification"]})
        'text-classification'
    """
    archs = config.get("architectures") or []
    for arch in archs:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "text-generation"
        if arch.endswith("ForSequenceClassification"):
            return "text-classification"
        if arch.endswith("ForImageClassification"):
            return "image-classification"
        if arch.endswith("Model"):
            return "feature-extraction"
    raise InputError(f"cannot tell the task from the config's architectures {archs or '(none)'}",
                     hint=f"give --task, one of {', '.join(TASKS)}")


def convert_folder(
    folder: str | os.PathLike,
    output: str | os.PathLike | None,
    *,
    task: str | None = None,
    opset: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    check: bool = True,
    external_data_threshold: int | None = None,
) -> HFConversionResult:
    """Convert a ``save_pretrained`` folder for ``task`` and prove it agrees with ``transformers``.

    Args:
        folder: a local folder with ``config.json`` and weights; nothing is downloaded.
        output: ``text-generation``: a folder to write (replaced atomically); other tasks: an
            ``.onnx`` file. None keeps nothing (check only).
        task: one of :data:`TASKS`; None infers it from the config's architectures.
        opset: target opset (default :data:`DEFAULT_OPSET`).
        atol, rtol: tolerance of the check, ``|onnx - ref| <= atol + rtol * |ref|``.
        check: compare with ``transformers``; a failure raises :class:`CheckFailedError` after
            writing the output, so it can be inspected.
        external_data_threshold: initializer bytes above which weights go to a ``.data`` file.
    """
    start = time.perf_counter()
    folder = Path(folder)
    config = read_config(folder)
    inferred = task is None
    task = task or infer_task(config)
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}", hint=f"use one of {', '.join(TASKS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    opset = opset or DEFAULT_OPSET
    if task == "text-generation":
        from onnxpipe.converter import hf_decoder

        result = hf_decoder.convert(folder, config, output, opset=opset, atol=atol, rtol=rtol, check=check,
                                    external_data_threshold=external_data_threshold)
    else:
        result = _convert_single(folder, config, task, output, opset=opset, atol=atol, rtol=rtol, check=check,
                                 external_data_threshold=external_data_threshold)
    result.task_inferred = inferred
    result.source = folder
    result.seconds = time.perf_counter() - start
    raise_if_failed(result, atol=atol, rtol=rtol, reference="transformers", kept="output")
    return result


def folder_from_factory(source: str) -> Path:
    """``file.py:function`` whose function returns the path of a ``save_pretrained`` folder."""
    from onnxpipe.core.userfiles import first_line as _first
    from onnxpipe.core.userfiles import load_callable

    fn = load_callable(source, what="folder factory")
    try:
        path = fn()
    except Exception as exc:
        raise InputError(f"{source} raised {_first(exc)}", hint="fix it (run with --debug for the traceback)") from exc
    if not isinstance(path, (str, os.PathLike)) or not is_hf_folder(path):
        raise InputError(f"{source} returned {path!r}, not a Hugging Face model folder",
                         hint="with --task, a factory returns the path of a save_pretrained folder")
    return Path(path)


# ----------------------------------------------------------------------------- single-file tasks

_AUTO = {"feature-extraction": "AutoModel", "text-classification": "AutoModelForSequenceClassification",
         "image-classification": "AutoModelForImageClassification"}
_OUTPUT = {"feature-extraction": "last_hidden_state", "text-classification": "logits",
           "image-classification": "logits"}


def _example_text_inputs(folder: Path, config: dict[str, Any], model: Any) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    vocab = int(config.get("vocab_size") or 100)
    ids = rng.integers(0, vocab, size=(2, 16), dtype=np.int64)
    try:
        import inspect

        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "token_type_ids" in params and int(config.get("type_vocab_size") or 0) > 0:
        inputs["token_type_ids"] = np.zeros_like(ids)
    return inputs


def _example_image_inputs(config: dict[str, Any]) -> dict[str, np.ndarray]:
    size = config.get("image_size") or 224
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    channels = int(config.get("num_channels") or 3)
    rng = np.random.default_rng(0)
    return {"pixel_values": rng.standard_normal((2, channels, h, w)).astype(np.float32)}


def _convert_single(folder: Path, config: dict[str, Any], task: str, output: Any, *, opset: int, atol: float,
                    rtol: float, check: bool, external_data_threshold: int | None) -> HFConversionResult:
    """Export, check and write one ``.onnx``, in bounded memory as the decoder is (:mod:`.hf_decoder`)."""
    torch = require("torch")
    import gc
    import tempfile

    from onnxpipe.converter import pytorch
    from onnxpipe.converter.check import check_feeds, compare_outputs
    from onnxpipe.core import external
    from onnxpipe.core.modelio import EXTERNAL_DATA_THRESHOLD, check_model, save_model, tensor_bytes

    model = load_pretrained(folder, _AUTO[task])
    out_name = _OUTPUT[task]
    inputs = _example_image_inputs(config) if task == "image-classification" else \
        _example_text_inputs(folder, config, model)

    class _Text(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra)
            return {out_name: getattr(out, out_name)}

    class _Image(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: Any) -> Any:
            return {out_name: getattr(self.inner(pixel_values=pixel_values, return_dict=True), out_name)}

    _Task = _Image if task == "image-classification" else _Text
    wrapper = _Task(model).eval()
    fm = pytorch.from_object(wrapper, tuple(torch.from_numpy(v) for v in inputs.values()))
    if task == "image-classification":
        axes = {"pixel_values": {0: "batch_size"}, out_name: {0: "batch_size"}}
    else:
        axes = {n: {0: "batch_size", 1: "sequence_length"} for n in inputs}
        axes[out_name] = {0: "batch_size"} if out_name == "logits" else {0: "batch_size", 1: "sequence_length"}
    args = tuple(torch.from_numpy(v) for v in inputs.values())
    arch = (config.get("architectures") or [type(model).__name__])[0]
    work = tempfile.TemporaryDirectory(prefix="onnxpipe-export-")
    keep_work = False
    try:
        onnx_model, exporter, attempts = export_with_fallback(wrapper, args, list(inputs), [out_name], axes, opset,
                                                              workdir=Path(work.name) / "export")
        # the framework's outputs first: the torch model goes before ONNX Runtime loads the weights again
        feeds = check_feeds(onnx_model, fm) if check else []
        expected = [fm.reference(f) for _, _, f in feeds]
        del fm, wrapper, model, args
        gc.collect()
        limit = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
        if not external.has_external_refs(onnx_model) and tensor_bytes(onnx_model) > limit:
            external.write_streaming(onnx_model, Path(work.name) / "export" / "exported.onnx")  # as a big export is
        check_model(onnx_model, what="the exported model")
        result = HFConversionResult(None, task, False, arch, str(config.get("model_type", "")), exporter, attempts,
                                    model=onnx_model)
        if output is not None:
            result.path = save_model(onnx_model, output, threshold=external_data_threshold)
            data = result.path.with_name(f"{result.path.name}.data")
            result.files = [result.path.name] + ([data.name] if data.is_file() else [])
        elif external.has_external_refs(onnx_model):  # no output: the model keeps reading from the export
            keep_work = True
            result.scratch = work
        if check:
            result.check = compare_outputs(result.path or onnx_model, feeds, expected, atol=atol, rtol=rtol)
    finally:
        if not keep_work:
            work.cleanup()
    return result
