"""fp16: weights and activations in float16, numerically sensitive ops kept in float32.

For CUDA and TensorRT, where float16 runs on tensor cores. Inputs and outputs keep their
float32 types, so callers feed the model as before. On CPU, ONNX Runtime runs such a model
through inserted casts (correct, not faster); the check uses a looser tolerance.
"""

from __future__ import annotations

import onnx

from onnxpipe.core.deps import require
from onnxpipe.core.graph import toposort
from onnxpipe.passes.base import Pass, PassConfig, PassContext, PassResult

# exponentials, reductions over many elements and normalizations lose too much in float16
SENSITIVE_OPS = (
    "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum",
    "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "LayerNormalization", "InstanceNormalization",
    "GroupNormalization", "RMSNormalization", "CumSum", "Range", "TopK", "Erf",
)


class Fp16(Pass):
    """Convert to float16, keeping ``keep_fp32_ops`` and ``keep_fp32_nodes`` in float32.

    Example:
        >>> Fp16({"keep_fp32_ops": ["Div"]})
        fp16(keep_fp32_ops=['Div'])
    """

    name = "fp16"
    atol = 1e-2
    rtol = 1e-2

    class Config(PassConfig):
        keep_fp32_ops: list[str] = []
        """Op types kept in float32 besides the built-in sensitive ones."""
        keep_fp32_nodes: list[str] = []
        """Node names kept in float32."""
        keep_sensitive: bool = True
        """Keep exponentials, reductions and normalizations in float32."""

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        require("onnxruntime")
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        block = list(DEFAULT_OP_BLOCK_LIST) + list(self.config.keep_fp32_ops)
        if self.config.keep_sensitive:
            block += list(SENSITIVE_OPS)
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        out = convert_float_to_float16(copy, keep_io_types=True, op_block_list=sorted(set(block)),
                                       node_block_list=list(self.config.keep_fp32_nodes))
        toposort(out.graph)  # the converter appends its input casts after their users
        kept = sum(1 for n in model.graph.node if n.op_type in block or n.name in self.config.keep_fp32_nodes)
        return PassResult(out, notes={"nodes_kept_fp32": kept})
