"""Run ONNX models on ONNX Runtime's execution providers: devices, the batch runner, validation,
benchmarks, tuning and pipeline-parallel stages. Stands on ``core`` and ``partition`` only (the
CPU ``Session`` itself is :mod:`onnxpipe.core.session`)."""

from __future__ import annotations

from typing import Any

__all__ = ["BatchRunner", "Device"]

# loaded on first use: the batch runner brings multiprocessing and shared memory with it
_LAZY = {"BatchRunner": "onnxpipe.runtimes.batch", "Device": "onnxpipe.runtimes.providers"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onnxpipe.runtimes' has no attribute {name!r}")
