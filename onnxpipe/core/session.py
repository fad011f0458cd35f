"""One ONNX Runtime session with checked feeds: the unit every runner and check builds on."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxpipe.core.deps import require
from onnxpipe.core.errors import InputError, OnnxpipeError, RunFailedError
from onnxpipe.core.external import has_external_refs, ort_model_path
from onnxpipe.core.modelio import EXTERNAL_DATA_THRESHOLD, save_model, tensor_bytes
from onnxpipe.core.tensors import TensorInfo, check_feeds, value_infos

if TYPE_CHECKING:
    import onnxruntime as ort

SCRATCH_MODEL = "ort-model"  # the folder session_source writes a model for ONNX Runtime into

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class Session:
    """An ONNX Runtime inference session that checks its feeds and names what is wrong.

    Args:
        model: a path to an ``.onnx`` file or an in-memory ``ModelProto``.
        providers: ORT provider names, in order of preference (default: CPU).
        threads: intra-op threads (None lets ORT decide).
        optimization: ``disable | basic | extended | all`` graph optimizations.

    Example:
        >>> with Session("model.onnx") as s:  # doctest: +SKIP
        ...     outputs = s.run({"x": x})
    """

    def __init__(
        self,
        model: str | os.PathLike | onnx.ModelProto,
        *,
        providers: Sequence[str | tuple[str, dict]] = ("CPUExecutionProvider",),
        threads: int | None = None,
        optimization: str = "all",
    ) -> None:
        ort_mod = require("onnxruntime")
        opts = ort_mod.SessionOptions()
        opts.log_severity_level = 4  # fatal only: run errors come back as one line (RunFailedError)
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if optimization not in OPT_LEVELS:
            raise InputError(f"unknown optimization level {optimization!r}", hint=f"use one of {', '.join(OPT_LEVELS)}")
        opts.graph_optimization_level = getattr(ort_mod.GraphOptimizationLevel, OPT_LEVELS[optimization])
        self._tmpdir: tempfile.TemporaryDirectory | None = None

        def scratch() -> Path:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="onnxpipe-")
            return Path(self._tmpdir.name)

        source = session_source(model, scratch)
        try:
            self.session: ort.InferenceSession = ort_mod.InferenceSession(source, opts, providers=list(providers))
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxpipeError(f"ONNX Runtime cannot load the model: {msg}",
                                hint="check the model with `onnxpipe inspect`") from exc
        finally:
            self.close_scratch()
        self._describe_io()

    def close_scratch(self) -> None:
        """Remove the scratch copy or links ONNX Runtime loaded the model from: it has read (memory-mapped) the
        weights, and a hard link to a user's data file must not outlive that (ONNX Runtime refuses to load a
        model whose subgraph weights are in a file with several links)."""
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def _describe_io(self) -> None:
        self.inputs: list[TensorInfo] = [
            TensorInfo(i.name, list(i.shape) if i.shape is not None else None, _ort_dtype(i.type))
            for i in self.session.get_inputs()
        ]
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
        self.close_scratch()

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return feeds as arrays, or raise naming the expected and received name, shape, dtype
        (:func:`onnxpipe.core.tensors.check_feeds`)."""
        return check_feeds(feeds, self.inputs)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run once; returns ``{output name: array}`` in the model's output order."""
        names = list(outputs) if outputs is not None else self.output_names
        checked = self.check_feeds(feeds)
        try:
            values = self.session.run(names, checked)
        except Exception as exc:  # ORT raises its own types: one line, not a traceback
            raise run_failed(exc) from exc
        return dict(zip(names, values))


def session_source(model: str | os.PathLike | onnx.ModelProto, scratch: Callable[[], Path]) -> str | bytes:
    """What ORT loads: the file's path, the serialized model, or a path in ``scratch()``: for a model
    over protobuf's limit, written there with external data; for one loaded without its external
    data, a header there linking the data files (no weight is read)."""
    if isinstance(model, onnx.ModelProto):
        if has_external_refs(model):  # weights left on disk: a header in scratch, the data files linked
            folder = scratch() / SCRATCH_MODEL
            folder.mkdir()
            return str(ort_model_path(model, folder))
        if tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
            return str(save_model(model, scratch() / SCRATCH_MODEL / "model.onnx"))
        return model.SerializeToString()
    if not Path(model).exists():
        raise InputError(f"no such file: {model}", hint="check the path")
    return str(model)


def release_source(source: str | bytes) -> None:
    """After ONNX Runtime loaded ``source``: remove it if :func:`session_source` made it in a scratch folder
    (a header with hard links to the data files, or a copy), keeping the rest of that folder."""
    if isinstance(source, str) and Path(source).parent.name == SCRATCH_MODEL:
        shutil.rmtree(Path(source).parent, ignore_errors=True)


def _ort_dtype(type_str: str) -> np.dtype:
    # ORT reports "tensor(float)", "tensor(int64)", ...
    inner = type_str[len("tensor("):-1] if type_str.startswith("tensor(") else type_str
    mapping = {"float": "float32", "double": "float64", "float16": "float16", "bool": "bool",
               "string": "object"}
    try:
        return np.dtype(mapping.get(inner, inner))
    except TypeError:
        return np.dtype(object)


def run_failed(exc: BaseException) -> RunFailedError:
    """The one-line error for an ONNX Runtime failure while running a model it loaded."""
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    return RunFailedError(f"ONNX Runtime could not run the model on these inputs: {msg[:300]}",
                          hint="check the input values (indices inside their tables, masks 0/1) "
                               "or give real data (--data, or data: in a recipe)")


def run_model(model: str | os.PathLike | onnx.ModelProto, feeds: Mapping[str, np.ndarray],
              **session_kwargs: Any) -> dict[str, np.ndarray]:
    """Run a model once on CPU and return its outputs by name.

    Example:
        >>> run_model("model.onnx", {"x": x})  # doctest: +SKIP
    """
    with Session(model, **session_kwargs) as s:
        return s.run(feeds)


def output_infos(model: onnx.ModelProto) -> list[TensorInfo]:
    return value_infos(model.graph.output)
