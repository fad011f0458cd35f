"""Data of the tiny_transformer model: each digits image read row-major as 64 tokens under the input name ``tokens``.

Token id = pixel intensity 0..16 (vocabulary 17), int64 Nx64.

numpy / scikit-learn only (no torch): ONNX-only steps use it.
"""
from __future__ import annotations

import numpy as np

from onnxpipe_zoo import _common

INPUT_NAME = "tokens"
VOCAB = 17
SEQ_LEN = 64


def _tokens(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int64).reshape(-1, SEQ_LEN)


def train_set() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(inputs, int64 labels) of the TRAIN split (1347 sequences)."""
    x_tr, _, y_tr, _ = _common.digits_split()
    return {INPUT_NAME: _tokens(x_tr)}, y_tr


def calibration(n: int = 256, batch: int = 32) -> list[dict[str, np.ndarray]]:
    """The first ``n`` TRAIN sequences, in batches of ``batch``, as ``[{"tokens": Bx64 int64}, ...]``."""
    inputs, _ = train_set()
    return _common.batches(inputs, n, batch)


def evaluation() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({"tokens": 450x64 int64}, int64 labels)``: the whole TEST split."""
    _, x_te, _, y_te = _common.digits_split()
    return {INPUT_NAME: _tokens(x_te)}, y_te
