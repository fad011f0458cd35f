"""TensorFlow / Keras 3 to ONNX through tf2onnx, by way of a tf.function.

``tf2onnx.convert.from_keras`` fails on Keras 3 (KeyError on keras_tensor), so every form is
wrapped into a ``tf.function`` with an explicit input signature and converted with
``tf2onnx.convert.from_function``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.converter.base import Attempt, ExportOutcome, FrameworkModel, default_output_names, normalize_examples
from onnxpipe.core.deps import require
from onnxpipe.core.errors import ConversionError, InputError
from onnxpipe.core.inputs import examples_from_specs
from onnxpipe.core.tensors import InputSpec, batched_inputs
from onnxpipe.core.userfiles import first_line


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return require("tensorflow")


def _flat_outputs(out: Any) -> tuple[list[np.ndarray], list[str] | None]:
    """Outputs in tf.nest order (dict keys sorted), which is the order tf2onnx writes them."""
    tf = _tf()
    names = None
    if isinstance(out, dict):
        names = sorted(str(k) for k in out)
    flat = tf.nest.flatten(out)
    return [np.asarray(t.numpy() if hasattr(t, "numpy") else t) for t in flat], names


class _Callable:
    """Calls a Keras model, tf.function or signature with inputs by name; holds how to convert."""

    def __init__(self, fn: Callable[..., Any], names: list[str], mode: str) -> None:
        self.fn, self.names, self.mode = fn, names, mode

    def __call__(self, *args: Any) -> Any:
        if self.mode == "kwargs":
            return self.fn(**dict(zip(self.names, args)))
        if self.mode == "dict":
            return self.fn(dict(zip(self.names, args)))
        if self.mode == "list":
            return self.fn(list(args) if len(args) > 1 else args[0])
        return self.fn(*args)


def _framework_model(kind: str, obj: Any, call: _Callable, inputs: dict[str, np.ndarray]) -> FrameworkModel:
    tf = _tf()

    def reference(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        tensors = [tf.convert_to_tensor(feeds[n]) for n in call.names]
        return _flat_outputs(call(*tensors))[0]

    _, names = _flat_outputs(call(*[tf.convert_to_tensor(inputs[n]) for n in call.names]))
    return FrameworkModel("tensorflow", kind, (obj, call), inputs, reference, names)


def _keras_call(model: Any, by_keyword: bool, names: list[str]) -> _Callable:
    def call(x: Any) -> Any:
        return model(x, training=False)

    return _Callable(call, names, "dict" if by_keyword else "list")


def from_object(model: Any, example: Any) -> FrameworkModel:
    """A Keras 3 model or a ``tf.function`` returned by a factory."""
    _tf()  # sets TF's log level before Keras imports it
    keras = require("keras")
    if isinstance(model, keras.Model):
        keras_names = [getattr(t, "name", None) for t in (getattr(model, "inputs", None) or [])]
        inputs, by_keyword = normalize_examples(example, [n for n in keras_names if n])
        return _framework_model("keras", model, _keras_call(model, by_keyword, list(inputs)), inputs)
    if hasattr(model, "get_concrete_function") or callable(model):
        sig = getattr(model, "input_signature", None)
        names = [getattr(s, "name", None) or f"input_{i}" for i, s in enumerate(sig or [])]
        if not names:
            py = getattr(model, "python_function", model)
            try:
                import inspect

                names = [p.name for p in inspect.signature(py).parameters.values()
                         if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            except (TypeError, ValueError):
                names = []
        inputs, by_keyword = normalize_examples(example, names)
        return _framework_model("tf.function", model, _Callable(model, list(inputs), "kwargs" if by_keyword else "args"), inputs)
    raise InputError(f"expected a Keras model or tf.function, received {type(model).__name__}",
                     hint="return a keras.Model or a tf.function from the factory")


def _spec_examples(specs: Sequence[Any], given: Sequence[InputSpec], what: Path) -> dict[str, np.ndarray]:
    """Example inputs from a model's own TensorSpecs (batch None -> 2), or from --input."""
    rng = np.random.default_rng(0)
    if given:
        return examples_from_specs(given, rng)
    out: dict[str, np.ndarray] = {}
    for name, shape, dtype in specs:
        dims = list(shape)
        if any(d is None for d in dims[1:]):
            raise InputError(f"input {name!r} of {what} has unknown dims {tuple(dims)}",
                             hint=f"give a concrete shape with --input {name}:1x...:{np.dtype(dtype).name}")
        concrete = [2 if d is None else int(d) for d in dims]
        out[name] = examples_from_specs([InputSpec(name, tuple(concrete), np.dtype(dtype).name)], rng)[name]
    return out


# ops that reach outside the graph: files, Python callbacks, the shell of the process
RISKY_OPS = frozenset({
    "ReadFile", "WriteFile", "MatchingFiles", "DeleteFile", "ImmutableConst", "FileSystemSetConfiguration",
    "PyFunc", "PyFuncStateless", "EagerPyFunc",
    "WholeFileReader", "WholeFileReaderV2", "TextLineReader", "TextLineReaderV2", "FixedLengthRecordReader",
    "FixedLengthRecordReaderV2", "TFRecordReader", "TFRecordReaderV2", "ReaderReadV2", "ReaderRead",
    "TFRecordDataset", "TFRecordDatasetV2", "TextLineDataset", "FixedLengthRecordDataset", "FixedLengthRecordDatasetV2",
    "DatasetToTFRecord", "ExperimentalDatasetToTFRecord", "SaveDataset", "SaveDatasetV2", "LoadDataset",
    "CreateSummaryFileWriter", "WriteSummary", "WriteScalarSummary", "WriteHistogramSummary", "WriteImageSummary",
    "WriteAudioSummary", "WriteGraphSummary", "WriteRawProtoSummary", "ImportEvent",
    "Save", "SaveV2", "SaveSlices", "Restore", "RestoreV2", "RestoreSlice", "MergeV2Checkpoints",
    "LoadAndRemapMatrix", "GenerateVocabRemapping", "InitializeTableFromTextFile", "InitializeTableFromTextFileV2",
})
# the checkpoint functions every SavedModel carries: their Save/Restore ops are TensorFlow's own
_CHECKPOINT_FUNCS = ("_traced_save", "_traced_restore", "saver_", "save_fn", "restore_fn")


def risky_ops(path: Path) -> list[str]:
    """Ops of a SavedModel's graphs that touch files or run Python, as ``op (function)``; read from
    ``saved_model.pb`` without loading or running anything."""
    from tensorflow.core.protobuf import saved_model_pb2

    from onnxpipe.core.userfiles import reading

    sm = saved_model_pb2.SavedModel()
    pb = path / "saved_model.pb"
    with reading(pb, "SavedModel", hint="re-export it with tf.saved_model.save"):
        sm.ParseFromString(pb.read_bytes())
    found: dict[str, None] = {}
    for mg in sm.meta_graphs:
        saver = {mg.saver_def.save_tensor_name.split(":")[0], mg.saver_def.restore_op_name.split(":")[0]}
        for node in mg.graph_def.node:
            if node.op in RISKY_OPS and not (node.op.startswith(("Save", "Restore", "Merge")) and
                                              (node.name in saver or node.name.startswith("save"))):
                found[f"{node.op} ({node.name})"] = None
        for fn in mg.graph_def.library.function:
            fname = fn.signature.name
            checkpoint = any(tag in fname for tag in _CHECKPOINT_FUNCS)
            for node in fn.node_def:
                if node.op in RISKY_OPS and not (checkpoint and node.op.startswith(("Save", "Restore", "Merge"))):
                    found[f"{node.op} (in {fname})"] = None
    return list(found)


def from_path(path: Path, kind: str, specs: Sequence[InputSpec], *, trust: bool = False) -> FrameworkModel:
    """A SavedModel directory or a ``.keras`` file (Keras' safe mode on unless ``trust``)."""
    tf = _tf()
    if kind == "keras":
        keras = require("keras")
        try:
            model = keras.saving.load_model(str(path), compile=False, safe_mode=not trust)
        except Exception as exc:
            if not trust and "safe_mode" in str(exc):
                raise InputError(f"{path} holds Python code (a lambda layer) that runs when it loads",
                                 hint="load it only if you trust where it comes from: add --trust "
                                      "(recipe: trust: true)") from None
            raise InputError(f"{path} is not a loadable Keras model ({first_line(exc)})",
                             hint="save it with model.save('model.keras')") from exc
        tensors = getattr(model, "inputs", None) or []
        if not tensors and not specs:
            raise InputError(f"{path} has no input layer shapes", hint="give them with --input NAME:1x8x8x1:float32")
        inputs = _spec_examples([(t.name, t.shape, t.dtype) for t in tensors], specs, path)
        return _framework_model("keras", model, _keras_call(model, False, list(inputs)), inputs)
    if not trust:
        ops = risky_ops(path)
        if ops:
            raise InputError(f"SavedModel {path} runs ops that touch files or run Python: {', '.join(ops[:4])}"
                             + (f" and {len(ops) - 4} more" if len(ops) > 4 else ""),
                             hint="running it for the check would run them; add --trust (recipe: trust: true) "
                                  "only if you trust where it comes from")
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        raise InputError(f"{path} is not a loadable SavedModel ({first_line(exc)})",
                         hint="export it with model.export(dir) or tf.saved_model.save") from exc
    sigs = dict(getattr(loaded, "signatures", {}) or {})
    if not sigs:
        raise InputError(f"SavedModel {path} has no serving signature",
                         hint="save it with a signature (model.export(dir), or tf.saved_model.save(..., signatures=f))")
    fn = sigs.get("serving_default") or next(iter(sigs.values()))
    arg_specs = fn.structured_input_signature[1]
    names = list(arg_specs)
    inputs = _spec_examples([(n, tuple(s.shape), s.dtype.as_numpy_dtype) for n, s in arg_specs.items()], specs, path)
    if set(inputs) != set(names):
        raise InputError(f"--input names {', '.join(inputs)} do not match the SavedModel's inputs {', '.join(names)}",
                         hint="use the signature's input names")
    inputs = {n: inputs[n] for n in names}
    return _framework_model("savedmodel", (loaded, fn), _Callable(fn, names, "kwargs"), inputs)


def export(fm: FrameworkModel, *, opset: int, dynamic_batch: bool) -> ExportOutcome:
    """Convert with ``tf2onnx.convert.from_function``; the batch axis is None when dynamic."""
    tf = _tf()
    tf2onnx = require("tf2onnx")
    _, call = fm.obj
    batched, _ = batched_inputs(fm.inputs) if dynamic_batch else (set(), None)
    signature = [
        tf.TensorSpec([None if (i == 0 and n in batched) else d for i, d in enumerate(a.shape)],
                      tf.as_dtype(a.dtype), name=n)
        for n, a in fm.inputs.items()
    ]
    function = tf.function(call, input_signature=signature, autograph=False)
    start = time.perf_counter()
    buf = io.StringIO()
    level = logging.getLogger("tf2onnx").level
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buf):
            model = _from_function(tf, tf2onnx, function, signature, opset)
    except Exception as exc:
        attempt = Attempt("tf2onnx.from_function", time.perf_counter() - start, first_line(exc))
        raise ConversionError(f"tf2onnx could not convert the model ({attempt.error})",
                              hint="run with --debug; check that every op is supported by tf2onnx") from exc
    finally:
        logging.getLogger("tf2onnx").setLevel(level)
    _clean_output_names(model, fm.output_names)
    return ExportOutcome(model, "tf2onnx (from_function)",
                         [Attempt("tf2onnx.from_function", time.perf_counter() - start)])


def _from_function(tf: Any, tf2onnx: Any, function: Any, signature: list[Any], opset: int) -> Any:
    """``tf2onnx.convert.from_function``, but with only the signature's tensors as graph inputs.

    tf2onnx takes every non-resource input of the concrete function as a graph input, captured
    constants included (a ``tf.constant`` closed over by the function becomes a bogus input).
    Captures follow the signature's tensors, so the first ``len(signature)`` inputs are the real
    ones; freezing turns the captures into constants.
    """
    from tf2onnx import tf_loader

    concrete = function.get_concrete_function(*signature)
    input_names = [t.name for t in concrete.inputs[: len(signature)]]
    output_names = [t.name for t in concrete.outputs if t.dtype != tf.dtypes.resource]
    renames = tf2onnx.convert.tensor_names_from_structed(concrete, input_names, output_names)
    with tf.device("/cpu:0"):
        frozen = tf_loader.from_function(concrete, input_names, output_names)
        model, _ = tf2onnx.convert._convert_common(
            frozen, name=concrete.name, continue_on_error=True, opset=opset,
            input_names=input_names, output_names=output_names, tensors_to_rename=renames)
    return model


def _clean_output_names(model: Any, names: list[str] | None) -> None:
    """tf2onnx names outputs after TF tensors (``Identity:0``); use the model's keys, or output_i."""
    from onnxpipe.core.graph import rename_values

    outputs = [o.name for o in model.graph.output]
    wanted = names if names and len(names) == len(outputs) else default_output_names(len(outputs))
    taken = {v for n in model.graph.node for v in list(n.input) + list(n.output)} | {i.name for i in model.graph.input}
    mapping = {old: new for old, new in zip(outputs, wanted) if old != new and new not in taken}
    rename_values(model.graph, mapping)
