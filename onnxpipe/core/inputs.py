"""Generated inputs: feeds made up for a model that has no real data (random, but the values it reads well).

:func:`input_hints` reads the graph for what each input feeds (token ids, masks, shapes, positions),
:func:`random_input` and :func:`generated_feeds` draw values that respect those hints,
:func:`decoder_feeds` builds a consistent KV-cache step, and :func:`example_inputs` picks among them
(``--input`` specs first). Split out of ``core.tensors``, which keeps tensor descriptions and the feed check.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxpipe.core.errors import InputError
from onnxpipe.core.tensors import InputSpec, TensorInfo, concrete_shape, graph_inputs


@dataclass(frozen=True)
class InputHint:
    """What the graph tells about the values an integer input may take.

    ``kind`` is ``index`` (it indexes a table: values in ``[low, high]``), ``mask`` (0/1: its
    name says so, or it is only compared, multiplied or selected on) or ``shape`` (it sets a
    size, a count or bounds: 1 is the one safe guess). ``why`` says where it was read.
    """

    kind: str
    low: int = 0
    high: int = 1
    why: str = ""


# ops that move integer values around without changing them (data input only)
_CARRY = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand", "Transpose", "Slice",
          "Concat", "Tile", "Gather", "CastLike", "Abs", "Max", "Min", "Clip"}
# ops where a 0/1 input makes sense: comparisons, products, selections, arithmetic on a mask
_MASKLIKE = {"Mul", "Sub", "Add", "Div", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Where",
             "Not", "And", "Or", "Xor", "ReduceSum", "ReduceMax", "ReduceMin", "CumSum", "Neg"}
# (op, slot) pairs that read a size, a count or bounds
_SHAPE_SLOTS = {("Reshape", 1), ("Expand", 1), ("Tile", 1), ("ConstantOfShape", 0), ("Range", 0), ("Range", 1),
                ("Range", 2), ("Slice", 1), ("Slice", 2), ("Slice", 3), ("Slice", 4), ("TopK", 1),
                ("OneHot", 1), ("Resize", 3), ("Pad", 1), ("Unsqueeze", 1), ("Squeeze", 1), ("Split", 1),
                ("ReduceSum", 1), ("ReduceMean", 1), ("Trilu", 1)}


def _graph_constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto | onnx.NodeProto]:
    consts: dict[str, onnx.TensorProto | onnx.NodeProto] = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.domain in ("", "ai.onnx"):
            consts[node.output[0]] = node
    for node in graph.node:  # exporters put shared constants behind Identity nodes
        if node.op_type == "Identity" and node.input and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    return consts


def _const_value(c: onnx.TensorProto | onnx.NodeProto) -> np.ndarray | None:
    from onnx import numpy_helper

    from onnxpipe.core.external import tensor_array

    try:
        if isinstance(c, onnx.TensorProto):
            return tensor_array(c)  # memory-mapped when its weights stay on disk
        attr = c.attribute[0]
        if attr.type == onnx.AttributeProto.TENSOR:
            return numpy_helper.to_array(attr.t)
        return np.asarray(onnx.helper.get_attribute_value(attr))
    except Exception:  # external data not loaded, odd Constant attributes: unknown
        return None


def _const_dims(c: onnx.TensorProto | onnx.NodeProto) -> tuple[int, ...] | None:
    if isinstance(c, onnx.TensorProto):
        return tuple(c.dims)
    value = _const_value(c)
    return None if value is None else tuple(value.shape)


def input_hints(model: onnx.ModelProto) -> dict[str, InputHint]:
    """Value ranges for the integer inputs of ``model``, read from how the graph uses them.

    An input that reaches the indices of a ``Gather`` from a constant table (through Cast,
    Unsqueeze, Reshape, an Add of a constant ...) stays inside the table's rows, the smallest
    of all tables it indexes (``token_type_ids`` into a 2-row table: 0 or 1). Masks are 0/1.

    Example:
        >>> input_hints(bert)["token_type_ids"]  # doctest: +SKIP
        InputHint(kind='index', low=0, high=1, why='Gather /embeddings/token_type_embeddings/Gather')
    """
    graph = model.graph
    consts = _graph_constants(graph)
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name:
                uses.setdefault(name, []).append((node, slot))
    hints: dict[str, InputHint] = {}
    for info in graph_inputs(model):
        if info.dtype == np.dtype(object) or not (np.issubdtype(info.dtype, np.integer) or info.dtype == np.bool_):
            continue
        low, high, tables, shape_use, other = 0, None, [], None, False
        seen: set[str] = set()
        stack: list[tuple[str, int, int, int]] = [(info.name, 0, 0, 0)]  # name, shift low, shift high, depth
        while stack:
            name, lo_shift, hi_shift, depth = stack.pop()
            if name in seen or depth > 32:
                continue
            seen.add(name)
            for node, slot in uses.get(name, []):
                op = node.op_type if node.domain in ("", "ai.onnx") else ""
                if op == "Gather" and slot == 1 and node.input[0] in consts:
                    dims = _const_dims(consts[node.input[0]])
                    axis = next((int(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == "axis"), 0)
                    if dims and -len(dims) <= axis < len(dims):
                        rows = dims[axis]
                        high = rows - 1 - hi_shift if high is None else min(high, rows - 1 - hi_shift)
                        low = max(low, -lo_shift)
                        tables.append(node.name or node.output[0])
                        continue
                if (op, slot) in _SHAPE_SLOTS:
                    shape_use = shape_use or f"{op} {node.name or node.output[0]}"
                    continue
                if op in ("Add", "Sub") and len(node.input) == 2:
                    c = consts.get(node.input[1 - slot])
                    value = None if c is None else _const_value(c)
                    if value is not None and value.size and np.issubdtype(value.dtype, np.integer):
                        sign = 1 if op == "Add" else (-1 if slot == 0 else None)
                        if sign is not None:
                            a, b = sign * int(value.min()), sign * int(value.max())
                            stack.extend((o, lo_shift + min(a, b), hi_shift + max(a, b), depth + 1) for o in node.output)
                            continue
                if op in _CARRY and (slot == 0 or op in ("Concat", "Max", "Min")):
                    stack.extend((o, lo_shift, hi_shift, depth + 1) for o in node.output[:1])
                    continue
                if op not in _MASKLIKE:
                    other = True
        if tables and high is not None and high >= low:
            hints[info.name] = InputHint("index", low, high, "Gather " + ", ".join(tables[:3]))
        elif "mask" in info.name.lower() or info.dtype == np.bool_:
            hints[info.name] = InputHint("mask", 0, 1, "named a mask" if "mask" in info.name.lower() else "bool")
        elif shape_use:
            hints[info.name] = InputHint("shape", 1, 1, f"read as a size by {shape_use}")
        elif not other and info.name in uses:
            hints[info.name] = InputHint("mask", 0, 1, "only compared, multiplied or selected on")
    return hints


def random_input(info: TensorInfo, shape: Sequence[int], rng: np.random.Generator,
                 hint: InputHint | None = None) -> np.ndarray:
    """Random data for a model input with no example: N(0,1) floats, small non-negative ints.

    With a ``hint`` (from :func:`input_hints`) integers stay in its range; a mask is 1 up to a
    random length per row (as padding leaves it), never all 0.
    """
    dtype = info.dtype
    if hint is not None and hint.kind == "mask" and (dtype == np.bool_ or np.issubdtype(dtype, np.integer)):
        out = np.ones(shape, dtype=np.int64)
        if len(shape) >= 2 and shape[-1] > 1:
            lengths = rng.integers(1, shape[-1] + 1, size=shape[:-1])
            out = (np.arange(shape[-1]) < lengths[..., None]).astype(np.int64)
        return out.astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        if hint is not None:
            return rng.integers(hint.low, hint.high + 1, size=shape).astype(dtype)
        return rng.integers(0, 8, size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


def generated_feeds(model: onnx.ModelProto, batch: int, rng: np.random.Generator,
                    dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random inputs for every graph input, shaped by :func:`concrete_shape`, valued by :func:`input_hints`.

    Symbolic dims other than the batch that integer (token) inputs share, such as a sequence
    length, default to 8 rather than 1, the same for every input that names them.

    Example:
        >>> feeds = generated_feeds(model, 2, np.random.default_rng(0))  # doctest: +SKIP
    """
    infos = graph_inputs(model)
    hints = input_hints(model)
    named = dict(dims or {})
    for info in infos:
        if info.shape and np.issubdtype(info.dtype, np.integer) and info.name in hints:
            for d in info.shape[1:]:
                if isinstance(d, str) and d not in named:
                    named[d] = 8
    return {i.name: random_input(i, concrete_shape(i, batch, named), rng, hints.get(i.name)) for i in infos}


PAST_INPUT = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def decoder_feeds(model: onnx.ModelProto, batch: int, past: int, new: int, rng: np.random.Generator,
                  ) -> dict[str, np.ndarray] | None:
    """Consistent inputs for a KV-cache decoder (``input_ids`` and ``past_key_values.{i}.key|value``
    inputs, as the text-generation export and onnxruntime-genai name them), or None for other models.

    ``new`` tokens after a cache of ``past`` (0: an empty cache, the prompt step): the cache axis
    of every ``past_key_values`` input, the token axis of ``input_ids`` / ``position_ids`` and the
    mask's axis (``past + new``) agree, as independent random dims cannot. Token ids stay inside
    the embedding table (:func:`input_hints`); the cache is N(0,1).

    Example:
        >>> feeds = decoder_feeds(model, 1, 0, 8, np.random.default_rng(0))  # doctest: +SKIP
    """
    infos = graph_inputs(model)
    names = {i.name for i in infos}
    pasts = [i for i in infos if PAST_INPUT.match(i.name) and i.shape and len(i.shape) == 4]
    if "input_ids" not in names or not pasts:
        return None
    hints = input_hints(model)
    dims: dict[str, int] = {}

    def name_dim(info: TensorInfo, axis: int, value: int) -> None:
        if info.shape and len(info.shape) > axis and isinstance(info.shape[axis], str):
            dims.setdefault(info.shape[axis], value)
    for info in infos:
        name_dim(info, 0, batch)
        if info.name in ("input_ids", "position_ids"):
            name_dim(info, 1, new)
        elif info.name == "attention_mask":
            name_dim(info, 1, past + new)
    for info in pasts:
        name_dim(info, 2, past)
    out: dict[str, np.ndarray] = {}
    for info in infos:
        shape = concrete_shape(info, batch, dims)
        if info.name == "attention_mask":
            out[info.name] = np.ones(shape, info.dtype)
        elif info.name == "position_ids":
            out[info.name] = np.broadcast_to(np.arange(past, past + new, dtype=info.dtype), shape).copy()
        elif PAST_INPUT.match(info.name) and info.shape and len(info.shape) == 4:
            size = list(shape)
            size[2] = past
            out[info.name] = rng.standard_normal(size=size).astype(info.dtype)
        else:
            out[info.name] = random_input(info, shape, rng, hints.get(info.name))
    return out


def examples_from_specs(specs: Sequence[InputSpec], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Example inputs generated from ``--input`` specs."""
    return {s.name: random_input(TensorInfo(s.name, list(s.shape), np.dtype(s.dtype)), s.shape, rng) for s in specs}


def example_inputs(model: onnx.ModelProto, specs: Sequence[InputSpec] = (), *, batch: int = 1,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for every graph input: from ``--input`` specs where given, generated elsewhere.

    A KV-cache decoder with no specs gets a consistent prompt step (:func:`decoder_feeds`: 8 tokens,
    an empty cache), which independent random dims would not be.
    """
    rng = np.random.default_rng(seed)
    if not specs:
        step = decoder_feeds(model, batch, 0, 8, rng)
        if step is not None:
            return step
    given = examples_from_specs(specs, rng)
    infos = graph_inputs(model)
    unknown = sorted(set(given) - {i.name for i in infos})
    if unknown:
        raise InputError(f"--input names {', '.join(unknown)} are not inputs of the model",
                         hint=f"its inputs are {', '.join(i.name for i in infos)}")
    hints = input_hints(model)
    dims: dict[str, int] = {}
    for info in infos:  # a sequence length shared by token inputs: 8, not 1
        if info.shape and info.name in hints and info.name not in given:
            dims.update((d, 8) for d in info.shape[1:] if isinstance(d, str))
    out = {}
    for info in infos:
        if info.name in given:
            out[info.name] = given[info.name]
        else:
            out[info.name] = random_input(info, concrete_shape(info, batch, dims), rng, hints.get(info.name))
    return out
