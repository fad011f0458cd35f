"""opset: move the model's default domain to another opset with onnx's version converter."""

from __future__ import annotations

import onnx
from pydantic import Field

from onnxpipe.core import external
from onnxpipe.core.graph import convert_opset, default_opset
from onnxpipe.passes.base import Pass, PassConfig, PassContext, PassResult


class Opset(Pass):
    """Convert to ``version`` (up or down).

    Example:
        >>> Opset({"version": 17})
        opset(version=17)
    """

    name = "opset"
    lazy = True  # the converter rewrites nodes; weights are read in only if one of its adapters needs them
    atol = 1e-5
    rtol = 1e-4

    class Config(PassConfig):
        version: int = Field(ge=7, le=onnx.defs.onnx_opset_version())
        """Target opset of the ai.onnx domain."""

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        current = default_opset(model)
        if current == self.config.version:
            return PassResult(model, modified=False, notes={"opset": current})
        out = external.with_weights_if_needed(lambda m: convert_opset(m, self.config.version), model)
        return PassResult(out, notes={"from": current, "to": self.config.version})
