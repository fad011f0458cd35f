"""Input specs, dtype names, generated inputs and output comparison shared by every stage."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxpipe.core.errors import InputError

DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool",
    )
}
DTYPES.update({"float": np.dtype("float32"), "half": np.dtype("float16"), "double": np.dtype("float64"),
               "int": np.dtype("int64"), "long": np.dtype("int64")})

_SPEC = re.compile(r"^(?P<name>[^:]+):(?P<shape>[^:]*)(?::(?P<dtype>[A-Za-z0-9]+))?$")


@dataclass(frozen=True)
class InputSpec:
    """A named input with a concrete shape and dtype, e.g. ``x:1x3x224x224:float32``.

    Example:
        >>> InputSpec.parse("x:1x3x8x8:float32")
        InputSpec(name='x', shape=(1, 3, 8, 8), dtype='float32')
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        m = _SPEC.match(text.strip())
        example = "NAME:1x3x224x224:float32"
        if not m:
            raise InputError(f"cannot parse input spec {text!r}", hint=f"write it as {example}")
        shape_text = m.group("shape").strip()
        try:
            shape = tuple(int(d) for d in shape_text.lower().split("x")) if shape_text else ()
        except ValueError:
            raise InputError(
                f"cannot parse the shape {shape_text!r} in input spec {text!r}",
                hint=f"dims are positive integers joined by 'x', as in {example}",
            ) from None
        if any(d <= 0 for d in shape):
            raise InputError(f"input spec {text!r} has a dim <= 0", hint=f"dims are positive integers, as in {example}")
        dtype = (m.group("dtype") or "float32").lower()
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r} in input spec {text!r}",
                             hint=f"use one of {', '.join(sorted(DTYPES))}")
        return cls(m.group("name"), shape, str(DTYPES[dtype]))

    def zeros(self) -> np.ndarray:
        return np.zeros(self.shape, dtype=self.dtype)


def onnx_elem_to_numpy(elem_type: int) -> np.dtype:
    """ONNX TensorProto element type to a numpy dtype."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


@dataclass
class TensorInfo:
    """Name, shape (ints, symbolic names or None) and dtype of a graph input or output."""

    name: str
    shape: list[int | str | None] | None
    dtype: np.dtype
    extra: dict = field(default_factory=dict)

    def shape_str(self) -> str:
        if self.shape is None:
            return "?"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


def value_infos(values: Sequence[onnx.ValueInfoProto]) -> list[TensorInfo]:
    """Describe graph inputs or outputs (sequence and map types get an object dtype)."""
    infos = []
    for v in values:
        t = v.type
        if t.HasField("tensor_type"):
            tt = t.tensor_type
            shape = None
            if tt.HasField("shape"):
                shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            dtype = onnx_elem_to_numpy(tt.elem_type) if tt.elem_type else np.dtype("float32")
            infos.append(TensorInfo(v.name, shape, dtype))
        else:
            infos.append(TensorInfo(v.name, None, np.dtype(object), {"kind": t.WhichOneof("value")}))
    return infos


def graph_inputs(model: onnx.ModelProto) -> list[TensorInfo]:
    """Real inputs of the graph (initializers listed as inputs, as in IR < 4, are left out)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in value_infos(model.graph.input) if i.name not in inits]


def concrete_shape(info: TensorInfo, batch: int, dims: Mapping[str, int] | None = None) -> tuple[int, ...]:
    """Replace symbolic dims: the first axis by ``batch``, named ones from ``dims``, others by 1."""
    if info.shape is None:
        raise InputError(f"input {info.name!r} has no shape in the model",
                         hint=f"give it with --input {info.name}:1x3x224x224:float32")
    dims = dims or {}
    out = []
    for axis, d in enumerate(info.shape):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif isinstance(d, str) and d in dims:
            out.append(int(dims[d]))
        else:
            out.append(batch if axis == 0 else 1)
    return tuple(out)


def random_like(example: np.ndarray, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Random data of ``shape`` drawn from the value range seen in ``example``.

    Integer inputs (token ids, indices) stay within the example's range, so embeddings and
    gathers remain valid; floats are drawn uniformly between the example's min and max.
    """
    dtype = example.dtype
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if example.size == 0:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = float(np.min(example)), float(np.max(example))
    if np.issubdtype(dtype, np.integer):
        return rng.integers(int(lo), int(hi) + 1, size=shape).astype(dtype)
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    return rng.uniform(lo, hi, size=shape).astype(dtype)


def random_input(info: TensorInfo, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Random data for a model input with no example: N(0,1) floats, small non-negative ints."""
    dtype = info.dtype
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 8, size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


def batched_inputs(inputs: Mapping[str, np.ndarray]) -> tuple[set[str], int | None]:
    """The inputs that share the leading (batch) axis, and that batch size.

    The batch size is the most common leading dim among inputs of rank >= 1; on a tie, the
    largest (a table or option beside the data is usually the short one).

    Example:
        >>> batched_inputs({"x": np.zeros((4, 3)), "y": np.zeros((4,)), "t": np.zeros((7, 2))})
        ({'x', 'y'}, 4)
    """
    sizes = [a.shape[0] for a in inputs.values() if np.ndim(a) >= 1]
    if not sizes:
        return set(), None
    batch = max(set(sizes), key=lambda d: (sizes.count(d), d))
    return {n for n, a in inputs.items() if np.ndim(a) >= 1 and a.shape[0] == batch}, batch


def examples_from_specs(specs: Sequence[InputSpec], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Example inputs generated from ``--input`` specs."""
    return {s.name: random_input(TensorInfo(s.name, list(s.shape), np.dtype(s.dtype)), s.shape, rng) for s in specs}


def example_inputs(model: onnx.ModelProto, specs: Sequence[InputSpec] = (), *, batch: int = 1,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for every graph input: from ``--input`` specs where given, generated elsewhere."""
    rng = np.random.default_rng(seed)
    given = examples_from_specs(specs, rng)
    infos = graph_inputs(model)
    unknown = sorted(set(given) - {i.name for i in infos})
    if unknown:
        raise InputError(f"--input names {', '.join(unknown)} are not inputs of the model",
                         hint=f"its inputs are {', '.join(i.name for i in infos)}")
    out = {}
    for info in infos:
        if info.name in given:
            out[info.name] = given[info.name]
        else:
            out[info.name] = random_input(info, concrete_shape(info, batch), rng)
    return out
