"""What the Hugging Face converters share: the result, loading, exporting with fallback, the output folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.converter.base import Attempt
from onnxpipe.converter.check import CheckReport, CheckRun
from onnxpipe.core.compare import compare
from onnxpipe.core.deps import require
from onnxpipe.core.errors import ConversionError, InputError
from onnxpipe.core.userfiles import first_line

TASKS = ("feature-extraction", "text-classification", "image-classification", "text-generation")

# files of a save_pretrained folder that a text-generation output keeps beside the model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")
CONFIG_FILES = ("config.json", "generation_config.json")
MODEL_FILE = "model.onnx"
DECODE_STEPS = 8

# model_type -> the "type" onnxruntime-genai knows it as; its "gpt2" type expects the older combined
# past_{i} layout, so GPT-2's flat-KV decoder runs as the generic decoder ("llama")
GENAI_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "phi": "phi", "phi3": "phi3",
               "gpt2": "llama", "gemma": "gemma", "qwen3": "qwen3"}


@dataclass
class HFConversionResult:
    """What :func:`convert_folder` produced, how, and the check against ``transformers``."""

    path: Path | None
    task: str
    task_inferred: bool
    architecture: str
    model_type: str
    exporter: str
    attempts: list[Attempt] = field(default_factory=list)
    check: CheckReport | None = None
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    framework: str = "transformers"
    model: Any = field(default=None, repr=False)  # the onnx.ModelProto
    source: Path | None = None
    side_files: dict[str, str] = field(default_factory=dict, repr=False)  # generated files: name -> text
    scratch: Any = field(default=None, repr=False)  # a TemporaryDirectory holding the model's weights, if no output does

    def write_side_files(self, dest: str | os.PathLike) -> list[str]:
        """Copy the tokenizer and config files, and write ``genai_config.json``, beside a model in ``dest``.

        What a pipeline calls after writing its final ``model.onnx``, so that the folder generates.
        """
        dest = Path(dest)
        names = copy_side_files(self.source, dest) if self.source is not None else []
        for name, text in self.side_files.items():
            (dest / name).write_text(text)
            names.append(name)
        return names

    @property
    def kind(self) -> str:
        return f"{self.architecture}, task {self.task}" + (" (inferred from the config)" if self.task_inferred else "")

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path) if self.path else None, "framework": self.framework, "task": self.task,
                "task_inferred": self.task_inferred, "architecture": self.architecture,
                "model_type": self.model_type, "exporter": self.exporter,
                "attempts": [a.as_dict() for a in self.attempts], "files": self.files,
                "check": self.check.as_dict() if self.check else None, "seconds": round(self.seconds, 3)}


def load_pretrained(folder: Path, auto_class: str) -> Any:
    """``transformers.<auto_class>.from_pretrained(folder)`` in float32 with eager attention, in eval mode."""
    transformers = require("transformers")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    loader = getattr(transformers, auto_class)
    try:
        model = loader.from_pretrained(str(folder), dtype="float32", attn_implementation="eager",
                                       local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"transformers cannot load {folder} as {auto_class}: {first_line(exc)}",
                         hint="check that the folder holds the config and weights save_pretrained wrote, "
                              "and that --task fits the model") from exc
    return model.eval()


# ----------------------------------------------------------------------------- shared by the decoder

def export_with_fallback(wrapper: Any, args: tuple, in_names: list[str], out_names: list[str],
                         axes: dict[str, dict[int, str]], opset: int, *,
                         workdir: str | os.PathLike | None = None) -> tuple[Any, str, list[Attempt]]:
    """Export ``wrapper`` with the TorchScript exporter, else the dynamo one; report every attempt.

    ``axes`` names the dynamic axes of inputs and outputs (``{"input_ids": {0: "batch_size"}}``).
    TorchScript goes first: it exports every family covered here in about a second, where
    dynamo takes ten times longer on the same decoder (both verified to agree).

    With ``workdir`` (a folder the caller keeps), the export stays there and weights the exporter
    wrote to external data (a model over 2 GB) are not read back: the model returned refers to
    them on disk (see :mod:`onnxpipe.core.external`). Without it, the model is loaded whole.
    """
    import onnx

    from onnxpipe.converter.pytorch import _quiet
    from onnxpipe.core.modelio import load_model

    attempts: list[Attempt] = []
    with contextlib.ExitStack() as stack:
        base = Path(workdir) if workdir is not None else \
            Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onnxpipe-hf-")))
        for name, strategy in (("torchscript", _torchscript), ("dynamo", _dynamo)):
            folder = base / name
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / MODEL_FILE
            start = time.perf_counter()
            try:
                with _quiet():
                    strategy(wrapper, args, target, in_names, out_names, axes, opset)
                exported = onnx.load(str(target)) if workdir is None else load_model(target, load_external_data=False)
                got_in = [i.name for i in exported.graph.input]
                got_out = [o.name for o in exported.graph.output]
                if got_in != in_names or got_out != out_names:
                    raise ValueError(f"exported inputs {got_in} / outputs {got_out}, "
                                     f"expected {in_names} / {out_names}")
            except Exception as exc:  # noqa: BLE001 - each failure is recorded; the next strategy is tried
                attempts.append(Attempt(name, time.perf_counter() - start, first_line(exc)))
                shutil.rmtree(folder, ignore_errors=True)
                continue
            attempts.append(Attempt(name, time.perf_counter() - start))
            return exported, f"torch.onnx.export ({name})", attempts
    raise_export_failure(attempts)
    raise AssertionError("unreachable")


def _torchscript(wrapper: Any, args: tuple, target: Path, in_names: list[str], out_names: list[str],
                 axes: dict[str, dict[int, str]], opset: int) -> None:
    torch = require("torch")
    torch.onnx.export(wrapper, args, str(target), input_names=in_names, output_names=out_names,
                      dynamic_axes=axes, opset_version=opset, dynamo=False)


def _dynamo(wrapper: Any, args: tuple, target: Path, in_names: list[str], out_names: list[str],
            axes: dict[str, dict[int, str]], opset: int) -> None:
    torch = require("torch")
    dims: dict[str, Any] = {}

    def spec(name: str) -> dict[int, Any]:
        return {ax: dims.setdefault(label, torch.export.Dim(label)) for ax, label in axes.get(name, {}).items()}

    import inspect

    params = [p for p in inspect.signature(wrapper.forward).parameters.values()]
    if params and params[-1].kind == params[-1].VAR_POSITIONAL:  # forward(a, b, *rest): rest is one tuple
        fixed = len(params) - 1
        shapes: tuple = tuple(spec(n) for n in in_names[:fixed]) + (tuple(spec(n) for n in in_names[fixed:]),)
    else:
        shapes = tuple(spec(n) for n in in_names)
    torch.onnx.export(wrapper, args, str(target), input_names=in_names, output_names=out_names,
                      dynamic_shapes=shapes, opset_version=opset, dynamo=True, external_data=True,
                      report=False, verify=False)


def logits_run(label: str, got: np.ndarray, expected: np.ndarray, *, atol: float, rtol: float) -> CheckRun:
    """One step of the decoder check: the ONNX logits against the transformers logits."""
    return CheckRun(label, int(expected.shape[0]), [compare("logits", got, expected, atol=atol, rtol=rtol)])


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` to ``dest``, replacing what was there, never half-written."""
    old = None
    if dest.exists():
        if not dest.is_dir():
            raise InputError(f"{dest} exists and is not a folder", hint="give a folder path for -o")
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_side_files(folder: Path, dest: Path) -> list[str]:
    """Copy tokenizer and config files of ``folder`` that exist into ``dest``; their names."""
    copied = []
    for name in TOKENIZER_FILES + CONFIG_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, dest / name)
            copied.append(name)
    return copied


def copy_generation_files(model_path: str | os.PathLike, dest_model: str | os.PathLike) -> list[str]:
    """Keep a text-generation folder generating when one of its models is rewritten elsewhere.

    When ``model_path`` sits in a folder with ``genai_config.json`` (what ``convert --task
    text-generation`` writes) and ``dest_model`` goes to another folder, the tokenizer, config
    files and ``genai_config.json`` follow it (its decoder ``filename`` set to the new model's
    name). Returns the names copied (none for other models).
    """
    import json

    src, dest = Path(model_path).resolve().parent, Path(dest_model).resolve()
    genai = src / "genai_config.json"
    if not genai.is_file() or dest.parent == src:
        return []
    copied = copy_side_files(src, dest.parent)
    try:
        config = json.loads(genai.read_text())
        decoder = config.get("model", {}).get("decoder", {})
        if decoder.get("filename") == Path(model_path).name:
            decoder["filename"] = dest.name
        text = json.dumps(config, indent=2)
    except (ValueError, AttributeError):  # not ours to fix: copied as it is
        text = genai.read_text()
    tmp = dest.parent / ".genai_config.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, dest.parent / "genai_config.json")
    return [*copied, "genai_config.json"]


def raise_export_failure(attempts: list[Attempt]) -> None:
    detail = "; ".join(f"{a.strategy}: {a.error}" for a in attempts)
    raise ConversionError(f"every exporter failed for this decoder ({detail})",
                          hint="run with --debug; use a transformers architecture with a DynamicCache")
