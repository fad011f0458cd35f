"""The layout proof of weight-only quantization: MatMulNBits blocks read as the spec defines them.

Every stored block is dequantized (``(value - zero point) * scale``) and compared with the original
weights, within what its scale allows; ONNX Runtime's own kernel then reads back one-hot rows of
each weight, so the layout it runs is the layout that was checked. Split out of
``quant_weight_only`` (the pass) so the proof reads on its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpipe.core.external import tensor_array

# a block holds at most this many quantization steps of error (per algorithm) before the layout check fails
RTN_STEPS = {False: 0.5, True: 1.0}  # asymmetric rounds to nearest; symmetric may clip one step at the far end
SEARCH_STEPS = 2.0  # hqq and gptq move values off the nearest grid point on purpose, never by whole blocks
RMS_STEPS = 0.75  # a block's rms error in steps: uniform rounding gives 0.29; a misread layout gives several
LAYOUT_ROWS = 48  # one-hot rows of K read back through ONNX Runtime's kernel, per node


def node_attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name``, or ``default`` when it has none."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unsigned values from bytes, low bits first (the MatMulNBits packing), the last axis cut to ``count``."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        vals = packed
    elif bits == 4:
        vals = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    else:
        vals = np.stack([(packed >> s) & 0x03 for s in (0, 2, 4, 6)], axis=-1).reshape(*packed.shape[:-1], -1)
    return vals[..., :count]


@dataclass
class Blocks:
    """A MatMulNBits weight as stored: values [N, blocks, block_size], scales and zero points [N, blocks]."""

    k: int
    n: int
    bits: int
    block_size: int
    values: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray

    def dequantize(self, cols: slice = slice(None)) -> np.ndarray:
        """The weight [K, N] the spec defines: ``(value - zero point) * scale`` per block (columns ``cols`` of it)."""
        values = self.values[cols]
        w = (values.astype(np.float64) - self.zero_points[cols][..., None]) * self.scales[cols][..., None]
        return w.reshape(len(values), -1)[:, : self.k].T


def column_chunks(k: int, n: int, budget: int = 1 << 22) -> list[slice]:
    """Column ranges of a [K, N] weight with about ``budget`` elements each: float64 work on a large weight
    (an LM head of 128k x 4096) a slice at a time, never the whole weight in float64 at once."""
    step = max(1, budget // max(k, 1))
    return [slice(lo, min(n, lo + step)) for lo in range(0, n, step)]


def read_blocks(node: onnx.NodeProto, inits: Mapping[str, np.ndarray]) -> Blocks:
    """A MatMulNBits node's stored blocks, read as its spec says (B [N, blocks, blob], scales [N * blocks],
    zero points packed per row of N like B, or float [N * blocks]; default zero point 2^(bits-1))."""
    k, n, bits, bs = (int(node_attr(node, a)) for a in ("K", "N", "bits", "block_size"))
    blocks = -(-k // bs)
    b = np.asarray(inits[node.input[1]]).reshape(n, blocks, -1)
    values = _unpack(b, bits, bs)
    scales = np.asarray(inits[node.input[2]], dtype=np.float64).reshape(n, blocks)
    if len(node.input) > 3 and node.input[3]:
        zp = np.asarray(inits[node.input[3]])
        if np.issubdtype(zp.dtype, np.floating):
            zero = zp.astype(np.float64).reshape(n, blocks)
        else:
            zero = _unpack(zp.reshape(n, -1), bits, blocks).astype(np.float64)
    else:
        zero = np.full((n, blocks), 2.0 ** (bits - 1))
    return Blocks(k, n, bits, bs, values, scales, zero)


@dataclass
class LayoutCheck:
    """How the stored blocks of every quantized MatMul agree with the original weights."""

    ok: bool = True
    nodes: int = 0
    worst_steps: float = 0.0
    worst_rms_steps: float = 0.0
    worst_node: str | None = None
    runtime_max_diff: float = 0.0
    relative_error: float = 0.0
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "nodes": self.nodes, "worst_block_error_steps": round(self.worst_steps, 3),
                "worst_block_rms_steps": round(self.worst_rms_steps, 3), "worst_node": self.worst_node,
                "runtime_readback_max_diff": self.runtime_max_diff,
                "weight_relative_error": round(self.relative_error, 5), "failures": self.failures[:10]}


def _readback(node: onnx.NodeProto, inits: Mapping[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Rows of the weight as ONNX Runtime's MatMulNBits kernel sees it: the node times one-hot rows."""
    from onnxpipe.core.session import Session

    k = int(node_attr(node, "K"))
    single = helper.make_node("MatMulNBits", ["a", *node.input[1:]], ["y"], domain="com.microsoft",
                              **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    tensors = [numpy_helper.from_array(np.asarray(inits[name]), name) for name in node.input[1:] if name]
    graph = helper.make_graph([single], "readback", [helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    eye = np.zeros((len(rows), k), np.float32)
    eye[np.arange(len(rows)), rows] = 1.0
    with Session(model, optimization="disable") as s:
        return s.run({"a": eye})["y"]


def check_layout(float_model: onnx.ModelProto, quantized: onnx.ModelProto, algorithm: str, symmetric: bool,
                 *, bits: int = 4, runtime: bool = True) -> LayoutCheck:
    """Dequantize every MatMulNBits node's blocks and compare them with the float model's weights block by block.

    A block passes when its largest error is within what its scale allows (half a step for
    round-to-nearest, one for symmetric, ``SEARCH_STEPS`` for hqq/gptq, which trade single values
    for a lower total error) and its rms error is under ``RMS_STEPS`` steps. ONNX Runtime's kernel
    then reads back ``LAYOUT_ROWS`` rows of each weight: they must equal our dequantization.
    """
    floats = {n.name: n for n in float_model.graph.node}
    f_inits = {i.name: i for i in float_model.graph.initializer}
    q_inits_proto = {i.name: i for i in quantized.graph.initializer}
    out = LayoutCheck()
    err_sq = ref_sq = 0.0
    for node in quantized.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        base = node.name.rsplit("_Q", 1)[0]
        original = floats.get(base)
        if original is None or original.input[1] not in f_inits:
            continue
        node_bits = int(node_attr(node, "bits"))
        # nodes at another width than the pass's come from the rtn quantizer (the budget's 8-bit ones)
        limit = RTN_STEPS[symmetric] if algorithm == "rtn" or node_bits != bits else SEARCH_STEPS
        inits = {name: tensor_array(q_inits_proto[name]) for name in node.input[1:] if name in q_inits_proto}
        w32 = tensor_array(f_inits[original.input[1]])  # memory-mapped when on disk: read a column slice at a time
        w32 = w32.reshape(w32.shape[-2], w32.shape[-1])
        blocks = read_blocks(node, inits)
        if (blocks.k, blocks.n) != w32.shape:
            out.failures.append(f"{node.name}: K x N {blocks.k}x{blocks.n} where the weight is "
                                f"{w32.shape[0]}x{w32.shape[1]}")
            continue
        pad = blocks.values.shape[1] * blocks.block_size - blocks.k
        step = np.maximum(np.abs(blocks.scales), np.finfo(np.float32).tiny)
        counts = np.minimum(blocks.block_size, blocks.k - np.arange(blocks.values.shape[1]) * blocks.block_size)
        # values within float32 rounding of a grid point count as exact
        slack = 1e-5 * float(np.abs(w32).max(initial=0.0))
        rows = np.unique(np.linspace(0, blocks.k - 1, min(LAYOUT_ROWS, blocks.k)).astype(int))
        got = _readback(node, inits, rows) if runtime else None
        worst = worst_rms = gap = top = 0.0
        bad = total = 0
        for cols in column_chunks(blocks.k, blocks.n):
            w = np.asarray(w32[:, cols], dtype=np.float64)
            deq = blocks.dequantize(cols)
            diff = np.pad(np.abs(deq - w).T, ((0, 0), (0, pad))).reshape(w.shape[1], -1, blocks.block_size)
            steps = np.maximum(diff.max(axis=-1) - slack, 0.0) / step[cols]
            rms = np.sqrt((diff ** 2).sum(axis=-1) / counts) / step[cols]
            err_sq += float(((deq - w) ** 2).sum())
            ref_sq += float((w ** 2).sum())
            worst, worst_rms = max(worst, float(steps.max())), max(worst_rms, float(rms.max()))
            bad += int((steps > limit + 1e-3).sum() + (rms > RMS_STEPS).sum())
            total += steps.size
            if got is not None:
                gap = max(gap, float(np.abs(got[:, cols] - deq[rows]).max()))
                top = max(top, float(np.abs(deq[rows]).max(initial=0.0)))
        out.nodes += 1
        if worst > out.worst_steps:
            out.worst_steps, out.worst_node = worst, node.name
        out.worst_rms_steps = max(out.worst_rms_steps, worst_rms)
        if bad:
            out.failures.append(f"{node.name} ({node_bits}-bit): {bad} of {total} blocks off the original weights "
                                f"(worst {worst:.2f} steps, rms {worst_rms:.2f} steps; allowed {limit:g}, {RMS_STEPS:g})")
        if got is not None:
            out.runtime_max_diff = max(out.runtime_max_diff, gap)
            if gap > 1e-3 * top + 1e-6:
                out.failures.append(f"{node.name}: ONNX Runtime reads the weight differently from the stored "
                                    f"layout (max difference {gap:.3g})")
    out.relative_error = math.sqrt(err_sq / ref_sq) if ref_sq else 0.0
    out.ok = not out.failures
    return out

