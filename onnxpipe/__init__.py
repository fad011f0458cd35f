"""onnxpipe: from a trained PyTorch or TensorFlow model to a fast, validated ONNX deployment."""

from __future__ import annotations

from typing import Any

from onnxpipe._version import __version__
from onnxpipe.core.errors import OnnxpipeError

__all__ = ["OnnxpipeError", "__version__", "convert", "generate", "optimize", "run"]


def convert(*args: Any, **kwargs: Any) -> Any:
    """Convert a framework model to a checked ONNX model; see :func:`onnxpipe.converter.convert`.

    Example:
        >>> import onnxpipe
        >>> result = onnxpipe.convert("models/digits_cnn/model.py:build", "digits.onnx")  # doctest: +SKIP
    """
    from onnxpipe.converter import convert as _convert

    return _convert(*args, **kwargs)


def generate(*args: Any, **kwargs: Any) -> Any:
    """Continue a prompt with a converted decoder folder; see :func:`onnxpipe.runtimes.generate.generate`.

    Example:
        >>> out = onnxpipe.generate("tiny_llm_onnx", "A class definition", max_new_tokens=16)  # doctest: +SKIP
        >>> out.text, out.decode_tokens_per_s  # doctest: +SKIP
    """
    from onnxpipe.runtimes.generate import generate as _generate

    return _generate(*args, **kwargs)


def optimize(*args: Any, **kwargs: Any) -> Any:
    """Run passes over a model with a check after each; see :func:`onnxpipe.pipeline.optimize`.

    Example:
        >>> result = onnxpipe.optimize("model.onnx", ["simplify", "fp16"])  # doctest: +SKIP
    """
    from onnxpipe.pipeline import optimize as _optimize

    return _optimize(*args, **kwargs)


def run(*args: Any, **kwargs: Any) -> Any:
    """Run a recipe end to end; see :func:`onnxpipe.pipeline.run`.

    Example:
        >>> result = onnxpipe.run("models/digits_cnn/pipeline.yaml")  # doctest: +SKIP
    """
    from onnxpipe.pipeline import run as _run

    return _run(*args, **kwargs)
