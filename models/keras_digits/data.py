"""Data of the keras_digits model: the digits_cnn data in NHWC, float32 Nx8x8x1 in [0, 1], input ``x``.

numpy / scikit-learn only (no tensorflow): ONNX-only steps use it.
"""
from __future__ import annotations

import numpy as np

from onnxpipe_zoo.digits_cnn import data as _nchw  # same split, same scaling

INPUT_NAME = _nchw.INPUT_NAME


def _nhwc(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v.transpose(0, 2, 3, 1)) for k, v in inputs.items()}


def train_set() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(inputs, int64 labels) of the TRAIN split (1347 images)."""
    inputs, labels = _nchw.train_set()
    return _nhwc(inputs), labels


def calibration(n: int = 256, batch: int = 32) -> list[dict[str, np.ndarray]]:
    """The first ``n`` TRAIN images, in batches of ``batch``, as ``[{"x": Bx8x8x1 float32}, ...]``."""
    return [_nhwc(b) for b in _nchw.calibration(n, batch)]


def evaluation() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({"x": 450x8x8x1 float32}, int64 labels)``: the whole TEST split."""
    inputs, labels = _nchw.evaluation()
    return _nhwc(inputs), labels
