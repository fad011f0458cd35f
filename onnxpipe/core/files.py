"""Atomic file writers (a directory's worth, JSON, text, figures) and file digests.

Everything the project writes goes through :func:`atomic_output`: a temporary directory beside the
destination, renamed into place only when the write finished, so a failure never leaves half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success, move every file in it next to ``path``.

    Files written into the directory under ``path``'s own name (and any sidecar files such as
    external data) appear at the destination only once everything was written: an error or an
    interrupt leaves no half-written output behind.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        # sidecars first, the model file last: a reader never sees a model without its data
        files = sorted(tmp.iterdir(), key=lambda f: f.name == dest.name)
        for f in files:
            os.replace(f, dest.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def scratch_cwd() -> Iterator[Path]:
    """Run a library call in a temporary working directory, removed afterwards.

    Some of ONNX Runtime's tools write debug files into the current directory (symbolic shape
    inference leaves ``sym_shape_infer_temp.onnx`` and a random ``.data`` file beside it when it
    cannot infer every shape); a user's folder must not collect them. Not thread-safe: the
    working directory belongs to the process.
    """
    import tempfile

    before = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="onnxpipe-cwd-") as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(before)


def write_json(doc: dict[str, Any], path: str | os.PathLike) -> Path:
    dest = Path(path)
    with atomic_output(dest) as tmp:
        (tmp / dest.name).write_text(json.dumps(doc, indent=2))
    return dest


def write_text(text: str, path: str | os.PathLike) -> Path:
    dest = Path(path)
    with atomic_output(dest) as tmp:
        (tmp / dest.name).write_text(text)
    return dest


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure to ``path`` atomically (PNG by the suffix) and close it."""
    import matplotlib.pyplot as plt

    dest = Path(path)
    try:
        with atomic_output(dest) as tmp:
            fig.savefig(tmp / dest.name, dpi=110)
    finally:
        plt.close(fig)
    return dest


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file (external data files beside it included), read in 8 MiB blocks.

    Example:
        >>> len(file_digest("model.onnx"))  # doctest: +SKIP
        64
    """
    h = hashlib.sha256()
    p = Path(path)
    for f in [p, p.parent / f"{p.name}.data"]:
        if f.exists():
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(8 << 20), b""):
                    h.update(block)
    return h.hexdigest()
