"""Run ONNX models: sessions on ONNX Runtime's execution providers."""

from onnxpipe.runtimes.session import Session, run_model

__all__ = ["Session", "run_model"]
