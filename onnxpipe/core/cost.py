"""The per-op cost rules: MACs and FLOPs of one node, and of a graph with its subgraphs.

Counting conventions (one MAC = one multiply-add; FLOPs = 2 * MACs for MAC ops):

- Conv / ConvInteger / QLinearConv: ``N*Cout*prod(out spatial) * (Cin/group)*prod(kernel)``.
- ConvTranspose: ``N*Cin*prod(in spatial) * (Cout/group)*prod(kernel)``.
- Gemm: ``M*N*K`` (transA/transB honored); MatMul / MatMulInteger / QLinearMatMul:
  ``prod(broadcast batch dims)*M*N*K`` with 1-D operands promoted as numpy does, so
  attention chains (Q@K^T, P@V) count even when both operands are activations.
- Einsum with 1 operand: input elements (0 if a pure transpose); with 2: the product of all
  index sizes (broadcast ``...`` included); 3+ operands: uncounted.
- LSTM / GRU / RNN: ``seq*batch*(numel(W)+numel(R))`` MACs (gate elementwise math ignored).
- Conv, ConvTranspose, QLinearConv and Gemm with a bias add one FLOP per output element.
- No MACs: MaxPool/AveragePool/LpPool ``output elements*prod(kernel)``; global pools, Reduce*,
  ArgMax/ArgMin/TopK/CumSum: input elements; elementwise ops (Add, Relu, Erf, Where, Clip,
  Max/Min/Sum/Mean, comparisons, (De)QuantizeLinear, Resize, ...): one per output element;
  Softmax/LogSoftmax/Hardmax ~5, BatchNormalization 2 (inference), Layer/Instance/Group/RMS
  normalization and LRN ~8 per output element.
- Data movement (Reshape, Transpose, Concat, Gather, Slice, Shape, Cast, Pad, ...) costs 0 and
  is not "uncounted". Ops without a rule (most custom domains) are uncounted.
- Subgraphs: an ``If`` counts its costlier branch (uncounted ops of both branches are listed);
  a ``Loop``/``Scan`` body is counted once, as one iteration (a note says so).
- Model-local functions are inlined first, so the histogram and costs show the ops they run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxpipe.core.graph import subgraphs
from onnxpipe.core.shapes import Shape

_ZERO = set("""Reshape Transpose Concat Gather GatherElements GatherND Slice Shape Size Cast CastLike
Flatten Squeeze Unsqueeze Identity Expand Tile Split SplitToSequence ConcatFromSequence SequenceAt
SequenceConstruct SequenceEmpty SequenceInsert SequenceErase SequenceLength Pad Constant
ConstantOfShape DepthToSpace SpaceToDepth Dropout ScatterND ScatterElements Scatter Range NonZero
OneHot Trilu EyeLike Compress ReverseSequence Optional OptionalGetElement OptionalHasElement
If Loop Scan RandomNormal RandomUniform RandomNormalLike RandomUniformLike Multinomial Bernoulli
Col2Im Unique""".split())
_ELEMENTWISE = set("""Add Sub Mul Div Pow Mod Neg Abs Reciprocal Floor Ceil Round Sign Sqrt Exp Log
Erf Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh Relu LeakyRelu PRelu Elu Selu Celu
ThresholdedRelu Sigmoid HardSigmoid HardSwish Tanh Softplus Softsign Gelu Mish Swish Clip Max Min
Sum Mean Where Equal Less LessOrEqual Greater GreaterOrEqual And Or Xor Not BitShift BitwiseAnd
BitwiseOr BitwiseXor BitwiseNot IsNaN IsInf Shrink QuantizeLinear DequantizeLinear
DynamicQuantizeLinear Resize Upsample FastGelu BiasGelu QuickGelu BiasAdd""".split())
_PER_ELEMENT = {"Softmax": 5, "LogSoftmax": 5, "Hardmax": 5, "BatchNormalization": 2,
                **dict.fromkeys("""LayerNormalization InstanceNormalization GroupNormalization
                RMSNormalization MeanVarianceNormalization LpNormalization LRN SkipLayerNormalization
                SimplifiedLayerNormalization SkipSimplifiedLayerNormalization""".split(), 8)}
_REDUCE = set("""ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceSumSquare ArgMax ArgMin TopK CumSum GlobalAveragePool GlobalMaxPool
GlobalLpPool""".split())
# ORT's contrib ops that follow the standard ops' semantics closely enough to share a rule
_MS_OK = set("""Gelu FastGelu BiasGelu QuickGelu BiasAdd QuantizeLinear DequantizeLinear
LayerNormalization SkipLayerNormalization SimplifiedLayerNormalization
SkipSimplifiedLayerNormalization QLinearConv""".split())


@dataclass
class UncountedOp:
    """A node whose cost could not be determined, and why."""

    node: str
    op_type: str
    reason: str
    tensors: tuple[str, ...] = field(default=(), repr=False)  # what the ORT fallback should size


def op_key(node: onnx.NodeProto) -> str:
    """The op type, prefixed by its domain outside the default one (``com.microsoft.Gelu``)."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


class NoShape(Exception):
    """A tensor the cost rule needs has no known shape."""


Record = tuple[str, int, int]  # op key, MACs, FLOPs


def graph_cost(graph: onnx.GraphProto, shapes: Mapping[str, Shape]
                ) -> tuple[list[Record], list[UncountedOp], list[str]]:
    """Cost records of every node (subgraphs included), the nodes left uncounted, and notes."""
    records: list[Record] = []
    uncounted: list[UncountedOp] = []
    notes: list[str] = []
    for node in graph.node:
        name = node.name or (node.output[0] if node.output else "")
        branches = [graph_cost(g, shapes) for g in subgraphs(node)]
        for sub_records, sub_uncounted, sub_notes in branches:
            uncounted.extend(sub_uncounted)
            notes.extend(sub_notes)
            if node.op_type != "If":
                records.extend(sub_records)
        if node.op_type == "If" and branches:  # the costlier branch: an upper bound
            records.extend(max((b[0] for b in branches), key=lambda r: sum(f for _, _, f in r)))
        elif branches and node.op_type in ("Loop", "Scan"):
            notes.append(f"{node.op_type} {name!r}: body counted once (one iteration)")
        try:
            cost = node_cost(node, shapes)
        except NoShape:
            tensors = tuple(t for t in (*node.input, *node.output) if t)
            uncounted.append(UncountedOp(name, op_key(node), "shapes unknown", tensors))
            continue
        except (IndexError, ValueError, KeyError):  # ranks or attributes the op's rule cannot use
            uncounted.append(UncountedOp(name, op_key(node), "unexpected shapes or attributes"))
            continue
        if cost is None:
            uncounted.append(UncountedOp(name, op_key(node), "no cost rule for this op"))
        else:
            records.append((op_key(node), *cost))
    return records, uncounted, notes


def node_cost(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> tuple[int, int] | None:
    """(MACs, FLOPs) of one node; None when no rule applies; raises NoShape when sizes are missing."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") and not (node.domain == "com.microsoft" and op in _MS_OK):
        return None

    def shape(i: int, outputs: bool = False) -> Shape:
        names = node.output if outputs else node.input
        if i >= len(names) or not names[i] or names[i] not in shapes:
            raise NoShape
        return shapes[names[i]]

    def has(i: int) -> bool:
        return i < len(node.input) and bool(node.input[i])

    if op in _ZERO:
        return 0, 0
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if op in _ELEMENTWISE:
        return 0, math.prod(shape(0, True))
    if op in _PER_ELEMENT:
        return 0, _PER_ELEMENT[op] * math.prod(shape(0, True))
    if op in _REDUCE:
        return 0, math.prod(shape(0))
    if op in ("MaxPool", "AveragePool", "LpPool"):
        return 0, math.prod(shape(0, True)) * math.prod(attrs.get("kernel_shape", [1]))
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shape(3 if op == "QLinearConv" else 1)
        y = math.prod(shape(0, True))
        macs = y * math.prod(w[1:])  # W is [Cout, Cin/group, *kernel]
        bias = {"Conv": 2, "QLinearConv": 8}.get(op)
        return macs, 2 * macs + (y if bias is not None and has(bias) else 0)
    if op == "ConvTranspose":
        macs = math.prod(shape(0)) * math.prod(shape(1)[1:])  # W is [Cin, Cout/group, *kernel]
        return macs, 2 * macs + (math.prod(shape(0, True)) if has(2) else 0)
    if op == "Gemm":
        a, b = shape(0), shape(1)
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return m * n * k, 2 * m * n * k + (m * n if has(2) else 0)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        macs = _matmul_macs(shape(0), shape(3 if op == "QLinearMatMul" else 1))
        return macs, 2 * macs
    if op == "Einsum":
        return _einsum_cost(attrs["equation"].decode(), [shape(i) for i in range(len(node.input))])
    if op in ("LSTM", "GRU", "RNN"):
        x = shape(0)
        macs = x[0] * x[1] * (math.prod(shape(1)) + math.prod(shape(2)))
        return macs, 2 * macs
    return None


def _matmul_macs(a: Shape, b: Shape) -> int:
    # numpy semantics: a 1-D left operand is [1, K], a 1-D right operand is [K, 1]
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    batch = np.broadcast_shapes(a2[:-2], b2[:-2])
    return math.prod(batch) * a2[-2] * a2[-1] * b2[-1]


def _einsum_cost(equation: str, operands: list[Shape]) -> tuple[int, int] | None:
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(operands) or len(terms) > 2:
        return None
    sizes: dict[str, int] = {}
    ellipses = []
    for term, shp in zip(terms, operands):
        head, ell, tail = term.partition("...")
        n_ell = len(shp) - len(head) - len(tail)
        if n_ell < 0 or (n_ell and not ell):
            return None
        ellipses.append(shp[len(head):len(head) + n_ell])
        for ch, d in zip(head + tail, shp[:len(head)] + shp[len(head) + n_ell:]):
            sizes[ch] = max(sizes.get(ch, 1), d)  # a size-1 dim broadcasts
    loop = math.prod(np.broadcast_shapes(*ellipses)) * math.prod(sizes.values())
    if len(operands) == 1:
        letters = terms[0].replace("...", "")
        out = rhs.replace("...", "") if arrow else "".join(sorted(c for c in letters if letters.count(c) == 1))
        return (0, 0) if sorted(out) == sorted(letters) else (0, loop)  # a pure transpose is free
    return loop, 2 * loop
