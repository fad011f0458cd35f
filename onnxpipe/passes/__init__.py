"""Graph passes, one module each; this mapping is the only list of them, and importing it loads none.

Floor: passes stand on :mod:`onnxpipe.core` only (a pass that needs a session, a comparison or a
timing uses core's); they never import the converter or the runtimes.

Example:
    >>> from onnxpipe.passes import get_pass
    >>> Simplify = get_pass("simplify")  # imports onnxpipe.passes.simplify only now
"""

from __future__ import annotations

import importlib

from onnxpipe.core.errors import InputError

PASSES: dict[str, str] = {
    "simplify": "onnxpipe.passes.simplify:Simplify",
    "opset": "onnxpipe.passes.opset:Opset",
    "fp16": "onnxpipe.passes.fp16:Fp16",
    "fix-shapes": "onnxpipe.passes.fix_shapes:FixShapes",
    "prune": "onnxpipe.passes.prune:Prune",
    "quantize": "onnxpipe.passes.quantize:Quantize",
    "strip": "onnxpipe.passes.strip:Strip",
    "fuse": "onnxpipe.passes.fuse:Fuse",
}


def available() -> list[str]:
    """Names of every pass, without importing any of them."""
    return list(PASSES)


def get_pass(name: str) -> type:
    """The pass class registered under ``name``; an unknown name lists the known ones."""
    target = PASSES.get(name)
    if target is None:
        raise InputError(f"unknown pass {name!r}", hint=f"known passes: {', '.join(PASSES)}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
