"""Data of the digits_cnn model: sklearn digits as float32 Nx1x8x8 in [0, 1] under the input name ``x``.

numpy / scikit-learn only (no torch): ONNX-only steps use it.
"""
from __future__ import annotations

import numpy as np

from onnxpipe_zoo import _common

INPUT_NAME = "x"


def _images(x: np.ndarray) -> np.ndarray:
    return (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)


def train_set() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(inputs, int64 labels) of the TRAIN split (1347 images)."""
    x_tr, _, y_tr, _ = _common.digits_split()
    return {INPUT_NAME: _images(x_tr)}, y_tr


def calibration(n: int = 256, batch: int = 32) -> list[dict[str, np.ndarray]]:
    """The first ``n`` TRAIN images, in batches of ``batch``, as ``[{"x": Bx1x8x8 float32}, ...]``."""
    inputs, _ = train_set()
    return _common.batches(inputs, n, batch)


def evaluation() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({"x": 450x1x8x8 float32}, int64 labels)``: the whole TEST split."""
    _, x_te, _, y_te = _common.digits_split()
    return {INPUT_NAME: _images(x_te)}, y_te
