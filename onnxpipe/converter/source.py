"""Parse a SOURCE argument and load the framework model it names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxpipe.converter.base import FrameworkModel
from onnxpipe.core.errors import InputError
from onnxpipe.core.tensors import InputSpec
from onnxpipe.core.userfiles import first_line, load_callable, split_spec

FRAMEWORKS = ("torch", "tensorflow", "onnx")
FORMS = ("file.py:factory, .onnx, .pt/.pth (TorchScript), .pt2 (torch.export), "
         ".keras, or a SavedModel directory")

_SUFFIX_KIND = {
    ".onnx": ("onnx", "onnx"),
    ".pt": ("torch", "torchscript"),
    ".pth": ("torch", "torchscript"),
    ".ptl": ("torch", "torchscript"),
    ".pt2": ("torch", "torch.export"),
    ".keras": ("tensorflow", "keras"),
    ".h5": ("tensorflow", "keras"),
}


def split_factory(source: str) -> tuple[Path, str] | None:
    """``path/to/file.py:build`` -> (path, "build"); anything else -> None."""
    try:
        return split_spec(source)
    except InputError:
        raise InputError(f"{source} names a Python file but no factory",
                         hint=f"write it as {source}:build, naming the function that returns (model, example_inputs)"
                         ) from None


def detect(source: str | Path) -> tuple[str, str]:
    """Framework and kind of a source path, without importing any framework.

    Example:
        >>> detect("model.onnx")  # doctest: +SKIP
        ('onnx', 'onnx')
    """
    text = str(source)
    factory = split_factory(text)
    if factory is not None:
        path, _ = factory
        _must_exist(path)
        return "python", "factory"
    path = Path(text)
    _must_exist(path)
    if path.is_dir():
        if (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
            return "tensorflow", "savedmodel"
        raise InputError(f"{path} is a directory but not a TensorFlow SavedModel (no saved_model.pb in it)",
                         hint="give a SavedModel directory or one of: " + FORMS)
    kind = _SUFFIX_KIND.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"cannot tell what kind of model {path} is from its suffix {path.suffix or '(none)'}",
                         hint="give one of: " + FORMS)
    return kind


def _must_exist(path: Path) -> None:
    if not path.exists():
        raise InputError(f"no such file or directory: {path}", hint="check the path")


def load_factory(path: Path, name: str) -> tuple[Any, Any]:
    """Import ``path`` and call ``name()``; it must return (model, example_inputs)."""
    factory = load_callable(f"{path}:{name}", what="factory")
    try:
        result = factory()
    except Exception as exc:
        raise InputError(f"factory {path}:{name} raised {first_line(exc)}",
                         hint="fix the factory (run with --debug for the traceback)") from exc
    if not (isinstance(result, tuple) and len(result) == 2):
        raise InputError(f"factory {path}:{name} returned {type(result).__name__}, expected (model, example_inputs)",
                         hint="return a 2-tuple: the model and its example inputs (tuple, or dict by input name)")
    return result


def framework_of(obj: Any) -> str | None:
    """``torch`` or ``tensorflow`` from an object's class hierarchy, importing neither."""
    for cls in type(obj).__mro__:
        root = (cls.__module__ or "").split(".")[0]
        if root == "torch":
            return "torch"
        if root in ("keras", "tensorflow", "tf_keras"):
            return "tensorflow"
    return None


def load(source: str, *, framework: str | None = None, specs: Sequence[InputSpec] = (),
         trust: bool = False) -> FrameworkModel:
    """Load SOURCE into a :class:`FrameworkModel`, importing only the framework it needs.

    Example:
        >>> fm = load("models/digits_cnn/model.py:build")  # doctest: +SKIP
    """
    if framework is not None and framework not in FRAMEWORKS:
        raise InputError(f"unknown framework {framework!r}", hint=f"use one of {', '.join(FRAMEWORKS)}, or omit it to detect")
    detected, kind = detect(source)
    if kind == "factory":
        path, name = split_factory(str(source))  # type: ignore[misc]
        model, example = load_factory(path, name)
        detected = framework_of(model)
        if detected is None:
            raise InputError(
                f"factory {source} returned a {type(model).__module__}.{type(model).__name__}, "
                "which is not a torch.nn.Module, Keras model or tf.function",
                hint="return a PyTorch or TensorFlow model")
        _agree(framework, detected, source)
        if detected == "torch":
            from onnxpipe.converter import pytorch

            return pytorch.from_object(model, example)
        from onnxpipe.converter import tensorflow

        return tensorflow.from_object(model, example)
    _agree(framework, detected, source)
    if detected == "onnx":
        from onnxpipe.converter import onnx_file

        return onnx_file.load(Path(source), specs)
    if detected == "torch":
        from onnxpipe.converter import pytorch

        return pytorch.from_archive(Path(source), kind, specs, trust=trust)
    from onnxpipe.converter import tensorflow

    return tensorflow.from_path(Path(source), kind, specs, trust=trust)


def _agree(asked: str | None, detected: str, source: str) -> None:
    if asked is not None and asked != detected:
        raise InputError(f"--framework {asked} was given but {source} is a {detected} model",
                         hint="drop --framework to detect it, or give a source of that framework")
