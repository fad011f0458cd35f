"""Run ONNX models: sessions on ONNX Runtime's execution providers."""

from __future__ import annotations

from typing import Any

from onnxpipe.runtimes.session import Session, run_model

__all__ = ["BatchRunner", "Device", "Session", "run_model"]

# loaded on first use: the batch runner brings multiprocessing and shared memory with it
_LAZY = {"BatchRunner": "onnxpipe.runtimes.batch", "Device": "onnxpipe.runtimes.providers"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onnxpipe.runtimes' has no attribute {name!r}")
