"""fuse's graph work: detecting what a model is, and the small rewrites the fusers need.

Detection (:func:`detect`) reads the model family, attention layers, heads and hidden size from the
graph alone (attention layers are softmaxes that feed a MatMul); :func:`fused_counts` and
:func:`attention_count` count what a fusion wrote. The rewrites work in place: a scalar zero in the
"safe softmax" ``Where(IsNaN(p), 0, p)`` (:func:`scalar_safe_softmax_zero`), ``Gemm`` written as
``MatMul + Add`` (:func:`gemm_to_matmul`), symbolic shapes on every value (:func:`infer_shapes`), and
ONNX Runtime's ONNX-domain ``SimplifiedLayerNormalization`` written portably
(:func:`expand_ort_only_ops`). The pass itself, its fusers and its measurement are in
:mod:`onnxpipe.passes.fuse`.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpipe.core.external import tensor_array
from onnxpipe.core.files import scratch_cwd
from onnxpipe.core.tensors import graph_inputs

ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                 "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention")
"""com.microsoft ops that each stand for one attention layer."""

FUSED_OPS = ATTENTION_OPS + (
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
    "EmbedLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "QuickGelu", "GemmFastGelu", "BiasAdd",
    "BiasSplitGelu", "RotaryEmbedding", "SkipGroupNorm", "GroupNorm", "FusedMatMul", "FusedConv")
"""ONNX Runtime contrib ops (domain com.microsoft) that a fusion writes."""

_PASS_THROUGH = {"Where", "Cast", "Identity", "Dropout", "IsNaN", "Reshape"}


def fused_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Contrib fusion ops in the main graph, by op type.

    Example:
        >>> fused_counts(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])))
        {}
    """
    c = Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft" and n.op_type in FUSED_OPS)
    return dict(sorted(c.items()))


def attention_count(counts: Mapping[str, int]) -> int:
    return sum(v for k, v in counts.items() if k in ATTENTION_OPS)


@dataclass
class Detected:
    """What the graph says about the transformer inside it."""

    model_type: str | None
    layers: int
    num_heads: int = 0
    hidden_size: int = 0
    layer_norms: int = 0
    evidence: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _feeds_matmul(name: str, consumers: Mapping[str, list[onnx.NodeProto]], hops: int = 3) -> bool:
    for c in consumers.get(name, []):
        if c.op_type in ("MatMul", "Einsum"):
            return True
        if hops and c.op_type in _PASS_THROUGH and any(_feeds_matmul(o, consumers, hops - 1) for o in c.output):
            return True
    return False


def attention_softmaxes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Softmax nodes of attention: their probabilities multiply the values (a MatMul follows)."""
    g = model.graph
    consumers = _consumers(g)
    return [n for n in g.node if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")
            and _feeds_matmul(n.output[0], consumers)]


def _shape_of(model: onnx.ModelProto, name: str) -> list[int | str | None] | None:
    for v in list(model.graph.value_info) + list(model.graph.output):
        if v.name == name and v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in v.type.tensor_type.shape.dim]
    return None


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Symbolic shapes on every value (ONNX Runtime's symbolic inference, ONNX's where it fails).

    The rewriter checks ranks and head sizes before it fuses; TorchScript exports carry no shapes
    for intermediate values, which is what keeps it from fusing their attention.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    out = None
    with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()), scratch_cwd():
        # ONNX's inference is the fallback; ORT's drops debug files into the cwd when it fails
        out = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    if out is not None:
        return out
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def _initializer_or_constant(graph: onnx.GraphProto) -> Callable[[str], np.ndarray | None]:
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}

    def value(name: str) -> np.ndarray | None:
        if name in inits:
            return tensor_array(inits[name])  # memory-mapped when the weights stay on disk
        n = producers.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None
    return value


def scalar_safe_softmax_zero(model: onnx.ModelProto) -> int:
    """``Where(IsNaN(p), [0.], p)`` -> ``Where(IsNaN(p), 0., p)``, in place; returns how many.

    TorchScript writes the zero of torch's "safe softmax" as a one-element vector, the rewriter's
    attention pattern expects a scalar; the result is the same (``p`` has rank 4 there).
    """
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    value = _initializer_or_constant(g)
    changed = 0
    for n in g.node:
        if n.op_type != "Where" or len(n.input) != 3:
            continue
        cond = producers.get(n.input[0])
        if cond is None or cond.op_type != "IsNaN":
            continue
        c = value(n.input[1])
        if c is None or c.size != 1 or c.ndim == 0:
            continue
        name = f"{n.input[1]}__scalar"
        if name not in {i.name for i in g.initializer}:
            g.initializer.append(numpy_helper.from_array(c.reshape(()), name))
        n.input[1] = name
        changed += 1
    return changed


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """``Gemm(a, b, c)`` -> ``MatMul(a, b) + c`` (plain alpha/beta, no transposed ``a``), in place.

    GPT-2's Conv1D exports as Reshape(3D -> 2D) -> Gemm -> Reshape(2D -> 3D); the rewriter folds
    those reshapes away, which a MatMul survives and a Gemm (2D only) does not.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes: list[onnx.NodeProto] = []
    changed = 0
    for n in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "Gemm" or n.domain not in ("", "ai.onnx") or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(n)
            continue
        a, b = n.input[0], n.input[1]
        if attrs.get("transB", 0):
            if b in inits:
                t = numpy_helper.from_array(numpy_helper.to_array(inits[b]).T.copy(), f"{b}__t")
                g.initializer.append(t)
                inits[t.name] = t
                b = t.name
            else:
                nodes.append(onnx.helper.make_node("Transpose", [b], [f"{n.output[0]}__bt"], perm=[1, 0]))
                b = f"{n.output[0]}__bt"
        has_c = len(n.input) > 2 and n.input[2]
        mm_out = f"{n.output[0]}__mm" if has_c else n.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [a, b], [mm_out], name=f"{n.name}__matmul"))
        if has_c:
            nodes.append(onnx.helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=f"{n.name}__add"))
        changed += 1
    if changed:
        del g.node[:]
        g.node.extend(nodes)
    return changed


def detect(model: onnx.ModelProto, shaped: onnx.ModelProto | None = None) -> Detected:
    """Model family, attention layers, heads and hidden size, from the graph alone.

    ``shaped`` is the same model with inferred shapes (heads are read off the softmax input,
    ``[batch, heads, seq, seq]``).
    """
    g = model.graph
    ops = Counter(n.op_type for n in g.node)
    softmaxes = attention_softmaxes(model)
    # attention already in one node: ONNX Runtime's (a second fuse run) or ONNX's own (opset 23)
    already = sum(1 for n in g.node if (n.domain == "com.microsoft" and n.op_type in ATTENTION_OPS)
                  or (n.domain in ("", "ai.onnx") and n.op_type == "Attention"))
    layers = len(softmaxes) + already
    evidence = [f"{len(softmaxes)} attention softmax(es)"] + ([f"{already} attention node(s)"] if already else [])
    value = _initializer_or_constant(g)
    consumers = _consumers(g)

    heads: Counter[int] = Counter()
    if shaped is not None:
        for s in softmaxes:
            shape = _shape_of(shaped, s.input[0])
            if shape and len(shape) == 4 and isinstance(shape[1], int) and shape[1] > 0:
                heads[shape[1]] += 1
    hidden: Counter[int] = Counter()
    norms = [n for n in g.node if n.op_type in ("LayerNormalization", "SimplifiedLayerNormalization",
                                                   "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
                                                   "RMSNormalization")]
    for n in norms:
        w = value(n.input[1]) if len(n.input) > 1 else None
        if w is None and len(n.input) > 2 and n.op_type.startswith("Skip"):
            w = value(n.input[2])
        if w is not None and w.ndim == 1:
            hidden[w.shape[0]] += 1
    rms = 0
    for n in g.node:  # x * rsqrt(mean(x^2) + eps): a Pow(., 2) feeding a ReduceMean
        if n.op_type == "Pow":
            e = value(n.input[1])
            if e is not None and e.size == 1 and float(e.reshape(())) == 2.0 and any(
                    c.op_type == "ReduceMean" for c in consumers.get(n.output[0], [])):
                rms += 1
    if not hidden:  # RMS norms: the weight multiplied in last is a hidden-sized vector
        for n in g.node:
            if n.op_type == "Mul":
                for i in n.input:
                    w = value(i)
                    if w is not None and w.ndim == 1 and w.size > 8:
                        hidden[w.shape[0]] += 1
    float_images = [i for i in graph_inputs(model) if i.shape is not None and len(i.shape) == 4
                    and np.issubdtype(i.dtype, np.floating)]
    token_inputs = [i for i in graph_inputs(model) if np.issubdtype(i.dtype, np.integer)]
    rotary = ops.get("Sin", 0) > 0 and ops.get("Cos", 0) > 0
    model_type: str | None
    if not layers:
        model_type = None
    elif rotary or (rms and not ops.get("LayerNormalization")):
        model_type = "llama"
        evidence.append("rotary embedding (Sin/Cos)" if rotary else "RMS norms, no LayerNormalization")
    elif float_images and ops.get("Conv") and not token_inputs:
        model_type = "vit"
        evidence.append("image input and a Conv patch embedding")
    elif ops.get("Trilu") or (ops.get("Tanh") and ops.get("Pow")):
        model_type = "gpt2"
        evidence.append("causal mask (Trilu)" if ops.get("Trilu") else "tanh GELU")
    else:
        model_type = "bert"
        evidence.append("bidirectional encoder (no causal mask, no rotary)")
    return Detected(model_type, layers, heads.most_common(1)[0][0] if heads else 0,
                    hidden.most_common(1)[0][0] if hidden else 0, len(norms) + rms, evidence)




ORT_ONLY_ONNX_OPS = ("SimplifiedLayerNormalization",)
"""Ops ONNX Runtime registers in the ONNX domain itself: onnx.checker (and every other runtime) rejects them."""


def _opset(model: onnx.ModelProto) -> int:
    return next((d.version for d in model.opset_import if d.domain in ("", "ai.onnx")), 1)


def expand_ort_only_ops(model: onnx.ModelProto) -> int:
    """Write ``SimplifiedLayerNormalization`` (ONNX domain, known to ONNX Runtime only) portably, in place.

    From opset 23 it is the standard ``RMSNormalization``; below, ``x / sqrt(mean(x^2) + eps) * scale``
    (ONNX Runtime fuses that back when it loads the model). Returns how many were rewritten.
    """
    g = model.graph
    opset = _opset(model)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    nodes: list[onnx.NodeProto] = []
    changed = 0
    for n in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type not in ORT_ONLY_ONNX_OPS or n.domain not in ("", "ai.onnx") or attrs.get("axis", -1) != -1
                or any(o and o in used for o in n.output[1:])):
            nodes.append(n)
            continue
        x, scale, y = n.input[0], n.input[1], n.output[0]
        eps = float(attrs.get("epsilon", 1e-5))
        if opset >= 23:
            nodes.append(onnx.helper.make_node("RMSNormalization", [x, scale], [y], name=n.name, axis=-1, epsilon=eps))
        else:
            t = f"{y}__rms"
            stash_float = attrs.get("stash_type", 1) == 1  # statistics in float32 whatever the input type
            eps_name = f"{t}_eps" if stash_float else f"{t}_eps0"  # else the epsilon follows the input's type
            g.initializer.append(numpy_helper.from_array(np.array(eps, np.float32), eps_name))
            if opset >= 18:
                g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{t}_axes"))
                mean = onnx.helper.make_node("ReduceMean", [f"{t}_sq", f"{t}_axes"], [f"{t}_ms"], keepdims=1)
            else:
                mean = onnx.helper.make_node("ReduceMean", [f"{t}_sq"], [f"{t}_ms"], axes=[-1], keepdims=1)
            if stash_float:
                cast = [onnx.helper.make_node("Cast", [x], [f"{t}_x"], to=onnx.TensorProto.FLOAT)]
            else:
                cast = [onnx.helper.make_node("CastLike", [eps_name, x], [f"{t}_eps"])]
            xs = f"{t}_x" if stash_float else x
            nodes += cast + [
                onnx.helper.make_node("Mul", [xs, xs], [f"{t}_sq"]), mean,
                onnx.helper.make_node("Add", [f"{t}_ms", f"{t}_eps"], [f"{t}_var"]),
                onnx.helper.make_node("Sqrt", [f"{t}_var"], [f"{t}_std"]),
                onnx.helper.make_node("Div", [xs, f"{t}_std"], [f"{t}_n"]),
                onnx.helper.make_node("CastLike", [f"{t}_n", x], [f"{t}_nx"]),
                onnx.helper.make_node("Mul", [f"{t}_nx", scale], [y], name=n.name)]
        changed += 1
    if changed:
        del g.node[:]
        g.node.extend(nodes)
    return changed
