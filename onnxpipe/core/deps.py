"""Import heavy optional frameworks on demand, naming the extra that provides them."""

from __future__ import annotations

import importlib
from types import ModuleType

from onnxpipe.core.errors import MissingDependencyError

# module name -> the pip extra of onnxpipe that installs it
EXTRAS: dict[str, str] = {
    "torch": "torch",
    "onnxscript": "torch",
    "tensorflow": "tf",
    "keras": "tf",
    "tf2onnx": "tf",
    "onnxruntime": "cpu",
    "onnxsim": "",
    "onnxslim": "",
    "ray": "ray",
    "aiohttp": "serve",
    "grpc": "serve",
    "orjson": "serve",
    "tritonclient": "dev",
}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise a one-line error that says how to install it.

    Example:
        >>> np = require("numpy")
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        how = f"pip install 'onnxpipe[{extra}]'" if extra else f"pip install {top}"
        if top == "onnxruntime":
            how = "pip install 'onnxpipe[cpu]' (or 'onnxpipe[gpu]' for CUDA/TensorRT; never both)"
        raise MissingDependencyError(
            f"{module} is needed for this but cannot be imported ({exc})", hint=f"install it: {how}"
        ) from exc
