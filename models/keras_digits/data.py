"""Data of the keras_digits model: sklearn digits as float32 Nx8x8x1 (NHWC) in [0, 1] under the input name ``x``.

numpy / scikit-learn only (no tensorflow): ONNX-only steps use it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np


def _load(path: Path):
    """Import a zoo file by path under a name unique to that path.

    Every zoo directory has a ``data.py``; ``import data`` would hand one model another's module.
    Same naming as ``_common.load_path``, so each file is imported once per process.
    """
    path = Path(path).resolve()
    name = f"_onnxpipe_zoo_{path.parent.name}_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


_common = _load(Path(__file__).resolve().parent.parent / "_common.py")


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
