"""Input specs, dtype names, tensor descriptions and the feed check shared by every stage (generated inputs: core.inputs)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class FeedMismatch:
    """The first thing wrong with a set of feeds, as :func:`feed_mismatch` found it.

    ``kind`` is ``"unknown"`` (names the model does not take, in the feeds' order), ``"missing"``
    (the model's inputs with no value, in the model's order), ``"dtype"``, ``"shape"`` (rank or a
    fixed dim) or ``"dims"`` (one symbolic dim given two sizes). ``expected`` and ``received`` are
    ready to print; ``str()`` is the default one-line message. Callers keep their own wording
    (a server's 400, a calibration batch's number) by formatting these fields themselves.
    """

    kind: str
    names: tuple[str, ...]
    expected: str
    received: str

    @property
    def name(self) -> str:
        return self.names[0]

    def __str__(self) -> str:
        if self.kind == "unknown":
            return f"unknown input(s) {', '.join(sorted(self.names))}: expected {self.expected}"
        if self.kind == "missing":
            return f"missing input {self.name!r}: expected {self.expected}"
        what = {"dtype": "dtype", "shape": "shape"}.get(self.kind, "dims")
        return f"input {self.name!r}: expected {what} {self.expected}, received {self.received}"


def feed_mismatch(
    feeds: Mapping[str, Any],
    inputs: Sequence[TensorInfo],
    *,
    allow_unknown: bool = False,
    shapes: str = "dims",
    batch_multiple: bool = False,
    same_symbols: bool = False,
    dtype_name: Callable[[np.dtype], str] = str,
    shape_name: Callable[[TensorInfo], Any] = TensorInfo.shape_str,
) -> FeedMismatch | None:
    """The one feed check behind sessions, the batch runner, calibration data and the server.

    Checks, in this order: names (unknown ones unless ``allow_unknown``, then missing ones), then per
    input its dtype (equal under ``dtype_name``) and shape: ``shapes="dims"`` checks the rank and
    every fixed dim (a dim ``<= 0``, ``None`` or a name matches anything), ``"rank"`` only the rank,
    ``"none"`` nothing. ``batch_multiple`` lets a fixed axis 0 of size ``b`` receive ``k * b``
    samples. ``same_symbols`` also requires a symbolic dim (``"seq"``) to have one size across all
    inputs. Returns ``None`` when everything fits.

    Example:
        >>> x = TensorInfo("x", ["N", 3], np.dtype("float32"))
        >>> str(feed_mismatch({"x": np.zeros((2, 4), np.float32)}, [x]))
        "input 'x': expected shape [N, 3], received [2, 4]"
        >>> feed_mismatch({"x": np.zeros((2, 3), np.float32)}, [x]) is None
        True
    """
    known = {i.name for i in inputs}
    if not allow_unknown:
        unknown = tuple(n for n in feeds if n not in known)
        if unknown:
            return FeedMismatch("unknown", unknown, ", ".join(sorted(known)), ", ".join(feeds))
    missing = tuple(i.name for i in inputs if i.name not in feeds)
    if missing:
        first = next(i for i in inputs if i.name == missing[0])
        return FeedMismatch("missing", missing, f"{dtype_name(first.dtype)} {shape_name(first)}",
                            ", ".join(feeds) or "none")
    sizes: dict[str, tuple[int, str]] = {}
    for info in inputs:
        arr = feeds[info.name]
        shape = tuple(np.shape(arr))
        dtype = arr.dtype if hasattr(arr, "dtype") else np.asarray(arr).dtype
        if dtype_name(dtype) != dtype_name(info.dtype):
            return FeedMismatch("dtype", (info.name,), str(dtype_name(info.dtype)), str(dtype_name(dtype)))
        if info.shape is None or shapes == "none":
            continue
        bad = len(shape) != len(info.shape)
        if not bad and shapes == "dims":
            for axis, (d, got) in enumerate(zip(info.shape, shape)):
                if not (isinstance(d, int) and d > 0) or d == got:
                    continue
                bad = not (batch_multiple and axis == 0 and got % d == 0)
                if bad:
                    break
        if bad:
            return FeedMismatch("shape", (info.name,), str(shape_name(info)), str(list(shape)))
        if same_symbols:
            for d, got in zip(info.shape, shape):
                if isinstance(d, str) and d:
                    size, where = sizes.setdefault(d, (got, info.name))
                    if size != got:
                        return FeedMismatch("dims", (info.name,), f"{d}={size} (as in input {where!r})",
                                            f"{d}={got}")
    return None


def check_feeds(feeds: Mapping[str, Any], inputs: Sequence[TensorInfo], **options: Any) -> dict[str, np.ndarray]:
    """Feeds as arrays in the model's input order, or an :class:`InputError` from :func:`feed_mismatch`
    (same ``options``) with a hint on the fix.

    Example:
        >>> x = TensorInfo("x", ["N", 3], np.dtype("float32"))
        >>> check_feeds({"x": np.zeros((2, 3), np.float64)}, [x])
        Traceback (most recent call last):
        onnxpipe.core.errors.InputError: input 'x': expected dtype float32, received float64 (cast the data to float32)
    """
    arrays = {k: np.asarray(v) for k, v in feeds.items()}
    problem = feed_mismatch(arrays, inputs, **options)
    if problem is not None:
        raise InputError(str(problem), hint=FEED_HINTS[problem.kind].format(dtype=problem.expected))
    return {i.name: arrays[i.name] for i in inputs}


FEED_HINTS = {
    "unknown": "rename the inputs to the model's input names",
    "missing": "give a value for every model input",
    "dtype": "cast the data to {dtype}",
    "shape": "reshape the data to the model's input shape",
    "dims": "give inputs that share a named dim the same size along it",
}


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



def tile_batch(sample: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """``sample``'s batched inputs cut or repeated (row by row, cyclically) to ``batch`` rows.

    For timing and checks on the user's own data at any batch size; inputs without the batch
    axis (a table, an option) are passed unchanged.

    Example:
        >>> tile_batch({"x": np.arange(3)}, 5)["x"].tolist()
        [0, 1, 2, 0, 1]
    """
    names, rows = batched_inputs(sample)
    if not rows:
        return dict(sample)
    index = np.arange(batch) % rows
    return {n: (np.ascontiguousarray(a[index]) if n in names else a) for n, a in sample.items()}
