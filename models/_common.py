"""Shared helpers of the example model zoo: the digits split and the weight cache.

numpy / scikit-learn / platformdirs only: the zoo's ``data.py`` modules import this file and must
stay usable without torch or tensorflow.

Zoo files are loaded by file path, and every zoo directory has a ``data.py``: a plain
``import data`` would hand the second model the first one's module. So the folder is installed as
the package ``onnxpipe_zoo`` (pyproject's package-dir) and each file imports its siblings as
``onnxpipe_zoo.<name>.data``, names that cannot clash.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

log = logging.getLogger("onnxpipe.zoo")

SPLIT_SEED = 0
TEST_SIZE = 0.25
CACHE_ENV = "ONNXPIPE_CACHE_DIR"


# ----------------------------------------------------------------------------- data

_SPLIT: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, x_test, y_train, y_test)`` of sklearn's digits: x float64 Nx64 in 0..16, y int64.

    Fixed split: 25 % test, stratified, ``random_state=0`` (1347 train / 450 test).
    """
    global _SPLIT
    if _SPLIT is None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x_tr, x_te, y_tr, y_te = train_test_split(
            digits.data, digits.target, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=digits.target)
        _SPLIT = (x_tr, x_te, y_tr.astype(np.int64), y_te.astype(np.int64))
    return tuple(a.copy() for a in _SPLIT)  # type: ignore[return-value]


def batches(inputs: dict[str, np.ndarray], n: int, batch: int) -> list[dict[str, np.ndarray]]:
    """The first ``n`` rows of ``inputs`` cut into dicts of at most ``batch`` rows."""
    if n < 1 or batch < 1:
        raise ValueError("n and batch must be >= 1")
    total = min(n, len(next(iter(inputs.values()))))
    return [{k: np.ascontiguousarray(v[i:min(i + batch, total)]) for k, v in inputs.items()}
            for i in range(0, total, batch)]


# ----------------------------------------------------------------------------- cache

def cache_dir() -> Path:
    """``$ONNXPIPE_CACHE_DIR/zoo``, else ``platformdirs.user_cache_dir("onnxpipe")/zoo`` (not created)."""
    base = os.environ.get(CACHE_ENV)
    if not base:
        import platformdirs

        base = platformdirs.user_cache_dir("onnxpipe")
    return Path(base).expanduser() / "zoo"


def config_hash(config: dict) -> str:
    """A short stable hash of a training config (include a code-version key in it)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_path(name: str, config: dict, suffix: str) -> Path:
    return cache_dir() / f"{name}-{config_hash(config)}{suffix}"


@contextmanager
def atomic_target(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success it is moved onto ``final`` with os.replace.

    The temporary name keeps ``final``'s suffixes (Keras insists on ``.weights.h5``).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name.split('.')[0]}-", suffix=".tmp" + suffix, dir=final.parent)
    os.close(fd)
    os.unlink(tmp)  # writers (h5py, torch.save) create the file themselves
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
