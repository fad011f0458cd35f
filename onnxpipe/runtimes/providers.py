"""Device names (``cpu``, ``cuda:0``, ``tensorrt:0``) to ONNX Runtime provider lists."""

from __future__ import annotations

from onnxpipe._deps import require
from onnxpipe.errors import InputError

ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


def available() -> list[str]:
    """ORT provider names this build offers."""
    return list(require("onnxruntime").get_available_providers())


def resolve(device: str) -> list[str | tuple[str, dict]]:
    """``cuda:1`` -> [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"].

    A provider this onnxruntime build lacks is an error naming the extra to install; there is
    no silent fallback to CPU.

    Example:
        >>> resolve("cpu")
        ['CPUExecutionProvider']
    """
    kind, _, index = device.strip().lower().partition(":")
    name = ALIASES.get(kind)
    if name is None:
        raise InputError(f"unknown device {device!r}", hint=f"use one of {', '.join(sorted(set(ALIASES)))}, e.g. cuda:0")
    if index and not index.isdigit():
        raise InputError(f"bad device index in {device!r}", hint="write it as cuda:0")
    have = available()
    if name not in have:
        raise InputError(f"{device}: this onnxruntime build has no {name} (it has {', '.join(have)})",
                         hint="install 'onnxpipe[gpu]' (onnxruntime-gpu, never beside onnxruntime) on a CUDA machine")
    if name == "CPUExecutionProvider":
        return [name]
    return [(name, {"device_id": int(index or 0)}), "CPUExecutionProvider"]
