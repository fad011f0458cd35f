"""The Open Inference Protocol (KServe v2) over HTTP: JSON tensors, the binary tensor extension, checks.

A request body is JSON, optionally followed by raw tensor bytes (the binary tensor data
extension of Triton and KServe: the ``Inference-Header-Content-Length`` header gives the JSON
length, and every input with ``parameters.binary_data_size`` takes its bytes from what follows,
in input order). Everything a client can get wrong is a :class:`ProtocolError` carrying the HTTP
status and a one-line message for ``{"error": ...}``.

Example:
    >>> req = decode_request(b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}')
    >>> req.inputs["x"].tolist()
    [[1.0, 2.0]]
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxpipe.core.tensors import TensorInfo, feed_mismatch

try:  # the fast path (the serve extra installs it); the standard library decodes the same documents
    import orjson
except ImportError:  # pragma: no cover - exercised only without the serve extra
    orjson = None

HEADER = "Inference-Header-Content-Length"
MAX_DIMS = 64  # as ONNX Runtime and Triton: more dims than any model has

# protocol datatype <-> numpy; BYTES travels as numpy object arrays of bytes
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_BY_DTYPE = {v: k for k, v in DATATYPES.items()}


class ProtocolError(Exception):
    """A request the server refuses: ``status`` is the HTTP code, ``str(err)`` the message.

    Example:
        >>> ProtocolError(404, "unknown model 'm'").status
        404
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def datatype_of(dtype: np.dtype) -> str:
    """The protocol's name for a numpy dtype (object and string arrays are ``BYTES``).

    Example:
        >>> datatype_of(np.dtype("float32"))
        'FP32'
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        raise ProtocolError(500, f"dtype {dtype} has no Open Inference Protocol datatype") from None


def wire_shape(info: TensorInfo) -> list[int]:
    """A model tensor's shape as metadata shows it: unknown or symbolic dims are ``-1``.

    Example:
        >>> wire_shape(TensorInfo("x", ["N", 3], np.dtype("float32")))
        [-1, 3]
    """
    return [d if isinstance(d, int) and d > 0 else -1 for d in (info.shape or [])]


@dataclass
class InferRequest:
    """A decoded infer request: input arrays, the outputs asked for, and how to send them back."""

    inputs: dict[str, np.ndarray]
    outputs: list[str] | None = None
    binary: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def wants_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def _json(body: bytes | memoryview) -> Any:
    if orjson is not None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # NaN and Infinity, which Python's json writes and orjson refuses: the slow path reads them
    try:
        return json.loads(bytes(body))
    except RecursionError:
        raise ProtocolError(400, "malformed JSON in the request: nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(400, f"malformed JSON in the request: {exc}") from None
    except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise ProtocolError(400, f"a number in the request is out of range: {str(exc)[:120]}") from None


def _bytes_elements(raw: bytes | memoryview, name: str) -> list[bytes]:
    """BYTES tensors in binary form: each element is a 4-byte little-endian length, then the bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ProtocolError(400, f"input {name!r}: truncated BYTES element length at byte {pos}")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ProtocolError(400, f"input {name!r}: BYTES element of {n} bytes runs past the data")
        out.append(bytes(raw[pos:pos + n]))
        pos += n
    return out


def json_array(data: Any, datatype: str, count: int) -> np.ndarray:
    """JSON tensor data (flat, or nested in row-major order) as a flat array of ``datatype``.

    numpy reads the whole list at once; its inferred kind is then checked against the datatype
    (numbers for FP, integers in range for INT/UINT, true/false for BOOL), so a string or a bool
    never turns into a number silently.

    Raises:
        ValueError, TypeError: values of the wrong kind or count (the caller names the input).

    Example:
        >>> json_array([[1, 2], [3, 4]], "INT8", 4).tolist()
        [1, 2, 3, 4]
    """
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        flat = _flatten(data)
        if len(flat) != count:
            raise ValueError(f"needs {count} values, received {len(flat)}")
        arr = np.empty(count, dtype=object)
        arr[:] = [v.encode() if isinstance(v, str) else bytes(v) for v in flat]
        return arr
    if not isinstance(data, list):
        data = [data]
    try:
        got = np.array(data)
    except ValueError:  # ragged nesting: the protocol allows any nesting as long as the order is row-major
        got = np.array(_flatten(data), dtype=object)
    if got.dtype == object:  # mixed kinds or ints past 64 bits: one value at a time tells which
        got = np.array([_scalar(v, datatype) for v in _flatten(data)])
    if got.size != count:
        raise ValueError(f"needs {count} values, received {got.size}")
    kind = got.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise TypeError("BOOL data must be true or false")
    elif kind not in "iuf" or (got.size and kind == "b"):
        raise TypeError(f"{datatype} data must be numbers")
    elif dtype.kind in "iu":
        if kind == "f":
            raise TypeError(f"{datatype} data must be integers")
        info = np.iinfo(dtype)
        if got.size and (got.min() < info.min or got.max() > info.max):
            raise OverflowError(f"values outside {info.min}..{info.max}")
    return got.reshape(-1).astype(dtype, copy=False)


def _scalar(v: Any, datatype: str) -> Any:
    if isinstance(v, bool) and datatype != "BOOL" or isinstance(v, str) or v is None:
        raise TypeError(f"{datatype} data must be {'true or false' if datatype == 'BOOL' else 'numbers'}")
    if isinstance(v, int) and not -(1 << 63) <= v < (1 << 64):
        raise OverflowError(f"{v} does not fit {datatype}")
    return v


def _flatten(data: Any, max_depth: int = 64) -> list:
    # JSON tensors may be flat or nested in row-major order; both are allowed by the protocol.
    # Iterative, with a depth bound: a client's nesting never reaches Python's recursion limit.
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(d, list) for d in data):
        return data
    out: list = []
    stack = [(iter(data), 1)]
    while stack:
        items, depth = stack[-1]
        for d in items:
            if isinstance(d, list):
                if depth >= max_depth:
                    raise ProtocolError(400, f"tensor data nested deeper than {max_depth} levels")
                stack.append((iter(d), depth + 1))
                break
            out.append(d)
        else:
            stack.pop()
    return out


def _tensor(spec: Mapping[str, Any], raw: bytes | memoryview | None) -> tuple[str, np.ndarray]:
    name = spec.get("name")
    if not isinstance(name, str):
        raise ProtocolError(400, "an input has no 'name'")
    datatype = spec.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(400, f"input {name!r}: unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(400, f"input {name!r}: 'shape' must be a list of integers >= 0, received {shape!r}")
    count = math.prod(shape)
    dtype = DATATYPES[datatype]
    if raw is not None:
        if datatype == "BYTES":
            values = _bytes_elements(raw, name)
            if len(values) != count:
                raise ProtocolError(400, f"input {name!r}: shape {shape} needs {count} BYTES elements, received {len(values)}")
            arr = np.empty(count, dtype=object)
            arr[:] = values
            return name, arr.reshape(shape)
        if len(raw) != count * dtype.itemsize:
            raise ProtocolError(400, f"input {name!r}: shape {shape} of {datatype} needs {count * dtype.itemsize} "
                                     f"bytes, received {len(raw)}")
        return name, np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
    if "data" not in spec:
        raise ProtocolError(400, f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    try:
        arr = json_array(spec["data"], datatype, count)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(400, f"input {name!r}: cannot read its data as {datatype}: {exc}") from None
    return name, arr.reshape(shape)


def check_document(doc: Any) -> None:
    """The request document's structure, every field's type checked and named (400).

    Example:
        >>> check_document({"inputs": [{"name": "x", "datatype": ["FP32"], "shape": [1]}]})
        Traceback (most recent call last):
        onnxpipe.serve.protocol.ProtocolError: input 'x': 'datatype' must be a string, received a list
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise ProtocolError(400, "the request needs a non-empty 'inputs' list")
    _optional(doc, "parameters", dict, "the request")
    _optional(doc, "outputs", list, "the request")
    if "id" in doc and doc["id"] is not None and not isinstance(doc["id"], str):
        raise ProtocolError(400, f"'id' must be a string, received {_kind(doc['id'])}")
    for k, spec in enumerate(doc["inputs"]):
        if not isinstance(spec, dict):
            raise ProtocolError(400, f"inputs[{k}] must be an object, received {_kind(spec)}")
        name = spec.get("name")
        if not isinstance(name, str):
            raise ProtocolError(400, f"inputs[{k}]: 'name' must be a string, received {_kind(name)}")
        what = f"input {name[:100]!r}"
        if not isinstance(spec.get("datatype"), str):
            raise ProtocolError(400, f"{what}: 'datatype' must be a string, received {_kind(spec.get('datatype'))}")
        shape = spec.get("shape")
        if not isinstance(shape, list):
            raise ProtocolError(400, f"{what}: 'shape' must be a list of integers, received {_kind(shape)}")
        if len(shape) > MAX_DIMS:
            raise ProtocolError(400, f"{what}: {len(shape)} dims, more than the {MAX_DIMS} allowed")
        _optional(spec, "parameters", dict, what)
    for k, out in enumerate(doc.get("outputs") or []):
        if isinstance(out, dict):
            _optional(out, "parameters", dict, f"outputs[{k}]")


def _optional(doc: Mapping[str, Any], key: str, kind: type, what: str) -> None:
    value = doc.get(key)
    if value is not None and not isinstance(value, kind):
        raise ProtocolError(400, f"{what}: {key!r} must be {'an object' if kind is dict else 'a list'}, "
                                 f"received {_kind(value)}")


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def decode_request(body: bytes, header_length: int | str | None = None) -> InferRequest:
    """Decode an infer request body (JSON, plus binary tensors when ``header_length`` is given).

    Raises:
        ProtocolError: malformed JSON, bad tensors, binary sizes that do not add up (status 400).
    """
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(400, f"{HEADER} must be an integer, received {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise ProtocolError(400, f"{HEADER} is {n} but the body has {len(body)} bytes")
        head, tail = memoryview(body)[:n], memoryview(body)[n:]
    else:
        head, tail = body, memoryview(b"")
    doc = _json(head)
    check_document(doc)  # every field's type, named, before any tensor is built
    inputs: dict[str, np.ndarray] = {}
    pos = 0
    for spec in doc["inputs"]:
        if not isinstance(spec, dict):
            raise ProtocolError(400, "every entry of 'inputs' must be an object")
        size = (spec.get("parameters") or {}).get("binary_data_size")
        raw = None
        if size is not None:
            if not isinstance(size, int) or size < 0 or pos + size > len(tail):
                raise ProtocolError(400, f"input {spec.get('name')!r}: binary_data_size {size!r} does not fit the "
                                         f"{len(tail)} bytes after the JSON header")
            raw = tail[pos:pos + size]  # a view: numpy reads the tensor where the body holds it
            pos += size
        name, arr = _tensor(spec, raw)
        if name in inputs:
            raise ProtocolError(400, f"input {name!r} is given twice")
        inputs[name] = arr
    if pos != len(tail):
        raise ProtocolError(400, f"{len(tail) - pos} bytes after the JSON header belong to no input")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(400, "'parameters' must be an object")
    req = InferRequest(inputs, id=doc.get("id"), parameters=params,
                       binary_default=bool(params.get("binary_data_output", False)))
    outs = doc.get("outputs")
    if outs is not None:
        if not isinstance(outs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outs):
            raise ProtocolError(400, "'outputs' must be a list of objects with a 'name'")
        req.outputs = [o["name"] for o in outs]
        for o in outs:
            flag = (o.get("parameters") or {}).get("binary_data")
            if flag is not None:
                req.binary[o["name"]] = bool(flag)
    return req


def check_inputs(req: InferRequest, inputs: Sequence[TensorInfo], outputs: Sequence[str], model: str) -> None:
    """Check a request against the model's inputs and outputs, naming what is expected and received.

    Raises:
        ProtocolError: unknown or missing input, wrong datatype or shape, unknown output (status 400).
    """
    problem = feed_mismatch(req.inputs, inputs, dtype_name=datatype_of, shape_name=wire_shape)
    if problem is not None:
        if problem.kind == "unknown":
            raise ProtocolError(400, f"model {model!r} has no input {problem.name!r}: "
                                     f"expected {', '.join(i.name for i in inputs)}")
        if problem.kind == "missing":
            raise ProtocolError(400, f"model {model!r}: missing input {problem.name!r} ({problem.expected})")
        what = "datatype" if problem.kind == "dtype" else "shape"
        raise ProtocolError(400, f"input {problem.name!r}: expected {what} {problem.expected}, received {problem.received}")
    for name in req.outputs or []:
        if name not in outputs:
            raise ProtocolError(400, f"model {model!r} has no output {name!r}: expected {', '.join(outputs)}")


def encode_response(model: str, version: str, outputs: Mapping[str, np.ndarray], req: InferRequest,
                    ) -> tuple[bytes, int | None]:
    """The response body and, when some output is sent as binary, the JSON header's length.

    Example:
        >>> body, n = encode_response("m", "1", {"y": np.ones(2, np.float32)}, InferRequest({}))
        >>> json.loads(body)["outputs"][0]["data"], n
        ([1.0, 1.0], None)
    """
    entries, blobs = [], []
    finite = True
    for name, arr in outputs.items():
        arr = np.asarray(arr)
        datatype = datatype_of(arr.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if req.wants_binary(name):
            raw = _binary(arr, datatype)
            entry["parameters"] = {"binary_data_size": raw.nbytes}
            blobs.append(raw)
        else:
            entry["data"] = json_data(arr, datatype)
            finite = finite and (arr.dtype.kind != "f" or bool(np.isfinite(arr).all()))
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if req.id is not None:
        doc["id"] = req.id
    # orjson writes NaN and infinities as null; Python's json keeps them as NaN/Infinity, as clients expect
    head = dumps(doc) if finite else _std_dumps(doc)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


_ORJSON_NUMPY = frozenset(["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"])


def json_data(arr: np.ndarray, datatype: str) -> Any:
    """An output's values for a JSON response: a flat C-order array orjson writes natively, else a list.

    Example:
        >>> dumps({"data": json_data(np.array([[1.5, 2]], np.float16), "FP16")})
        b'{"data":[1.5,2.0]}'
    """
    if datatype == "BYTES":
        return [_text(v) for v in arr.reshape(-1)]
    flat = np.ascontiguousarray(arr).reshape(-1)
    if datatype == "FP16":
        flat = flat.astype(np.float32)
        datatype = "FP32"
    if orjson is not None and datatype in _ORJSON_NUMPY:
        return flat  # orjson writes it without a list in between (see :func:`dumps`)
    return flat.tolist()


def dumps(doc: Any) -> bytes:
    """A JSON document as compact bytes (numpy arrays inside written by orjson without a list in between)."""
    if orjson is not None:
        try:
            return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:  # a value orjson does not know: the standard library writes it
            pass
    return _std_dumps(doc)


def _std_dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=True,
                      default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)).encode()


def _binary(arr: np.ndarray, datatype: str) -> memoryview:
    """The raw little-endian bytes of a tensor, as a view of the array when it is contiguous already."""
    if datatype == "BYTES":
        parts = []
        for v in arr.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(struct.pack("<I", len(b)) + b)
        return memoryview(b"".join(parts))
    flat = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).reshape(-1)
    return memoryview(flat.view(np.uint8))


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        try:
            return v.decode()
        except UnicodeDecodeError:
            raise ProtocolError(400, "a BYTES output is not UTF-8: ask for it with binary_data") from None
    return str(v)


def error_body(message: str) -> bytes:
    """The protocol's error document: ``{"error": message}``."""
    return dumps({"error": message})
