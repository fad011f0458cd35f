"""fp16: weights and activations in float16, numerically sensitive ops kept in float32.

For CUDA and TensorRT, where float16 runs on tensor cores. Inputs and outputs keep their
float32 types, so callers feed the model as before. On CPU, ONNX Runtime runs such a model
through inserted casts (correct, not faster); the check uses a looser tolerance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from onnxpipe.core import external, skeleton
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
    lazy = True  # a model on disk: the graph converted on its skeleton, each weight converted on its own
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
        kept = sum(1 for n in model.graph.node if n.op_type in block or n.name in self.config.keep_fp32_nodes)
        options = {"op_block_list": sorted(set(block)), "node_block_list": list(self.config.keep_fp32_nodes)}
        if external.lazy_bytes(model):
            out, converted = self._on_disk(model, options)
            return PassResult(out, notes={"nodes_kept_fp32": kept, "weights_converted_one_by_one": converted})
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        out = convert_float_to_float16(copy, keep_io_types=True, **options)
        toposort(out.graph)  # the converter appends its input casts after their users
        return PassResult(out, notes={"nodes_kept_fp32": kept})

    @staticmethod
    def _on_disk(model: onnx.ModelProto, options: dict[str, Any]) -> tuple[onnx.ModelProto, int]:
        """fp16 of a model whose weights stay on disk: the converter runs on the skeleton (large weights as
        graph inputs, :func:`~onnxpipe.core.skeleton.hollow`), where it types each weight input float16 or
        leaves it float32 as its readers need; each weight it made float16 is then converted alone, from
        its memory map into a spill file, and put back as an initializer."""
        from onnxruntime.transformers.float16 import convert_float_to_float16, convert_np_to_float16

        bare, taken = skeleton.hollow(model)
        io = [i.name for i in model.graph.input if i.name not in taken] + [o.name for o in model.graph.output]
        out = convert_float_to_float16(bare, keep_io_types=io, **options)
        toposort(out.graph)
        halves = {i.name for i in out.graph.input
                  if i.name in taken and i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
        weights = dict(taken)
        with external.SpillFile() as spill:
            for name in halves:
                w = external.tensor_array(taken[name])
                t = onnx.numpy_helper.from_array(convert_np_to_float16(np.asarray(w)), name)  # the converter's rounding
                del w
                spill.put(t)
                weights[name] = t
        return skeleton.fill(out, weights, model), len(halves)
