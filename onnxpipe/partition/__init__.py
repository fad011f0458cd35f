"""Split a model across devices: memory analysis, cut-point search, stage models and ``pipeline.json``.

Floor: stands on :mod:`onnxpipe.core` only; the runtimes (pipeline-parallel runner) stand on it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PipelineSpec", "find_cuts", "memory_report", "profile_graph", "split_model"]

# loaded on first use: `import onnxpipe.partition` stays cheap
_LAZY = {"PipelineSpec": "onnxpipe.partition.spec", "find_cuts": "onnxpipe.partition.cut",
         "memory_report": "onnxpipe.partition.memory", "profile_graph": "onnxpipe.partition.profile",
         "split_model": "onnxpipe.partition.split"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onnxpipe.partition' has no attribute {name!r}")
