"""Data of the keras_digits model: sklearn digits as float32 Nx8x8x1 (NHWC) in [0, 1] under the input name ``x``.

numpy / scikit-learn only (no tensorflow): ONNX-only steps use it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


if (_root := str(Path(__file__).resolve().parents[2])) not in sys.path:
    sys.path.insert(0, _root)  # the folder holding models/: the zoo imports as a package
from models import _common  # noqa: E402


INPUT_NAME = "x"


def _images(x: np.ndarray) -> np.ndarray:
    return (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)


def train_set() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(inputs, int64 labels) of the TRAIN split (1347 images)."""
    x_tr, _, y_tr, _ = _common.digits_split()
    return {INPUT_NAME: _images(x_tr)}, y_tr


def calibration(n: int = 256, batch: int = 32) -> list[dict[str, np.ndarray]]:
    """The first ``n`` TRAIN images, in batches of ``batch``, as ``[{"x": Bx8x8x1 float32}, ...]``."""
    inputs, _ = train_set()
    return _common.batches(inputs, n, batch)


def evaluation() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({"x": 450x8x8x1 float32}, int64 labels)``: the whole TEST split."""
    _, x_te, _, y_te = _common.digits_split()
    return {INPUT_NAME: _images(x_te)}, y_te
