"""onnxpipe: from a trained PyTorch or TensorFlow model to a fast, validated ONNX deployment."""

from __future__ import annotations

from typing import Any

from onnxpipe.errors import OnnxpipeError

__version__ = "0.1.0"
__all__ = ["OnnxpipeError", "__version__", "convert"]


def convert(*args: Any, **kwargs: Any) -> Any:
    """Convert a framework model to a checked ONNX model; see :func:`onnxpipe.converter.convert`.

    Example:
        >>> import onnxpipe
        >>> result = onnxpipe.convert("models/digits_cnn/model.py:build", "digits.onnx")  # doctest: +SKIP
    """
    from onnxpipe.converter import convert as _convert

    return _convert(*args, **kwargs)
