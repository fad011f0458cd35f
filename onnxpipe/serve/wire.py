"""Tensors on the wire of the Open Inference Protocol, for HTTP and gRPC alike: datatypes, JSON arrays
(decoded and written), and the binary tensor layout (little-endian values; BYTES as length-prefixed
elements). Split out of :mod:`onnxpipe.serve.protocol`, which keeps the requests and responses.

Example:
    >>> json_array([[1, 2], [3, 4]], "INT8", 4).tolist()
    [1, 2, 3, 4]
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

try:  # the fast path (the serve extra installs it); the standard library decodes the same documents
    import orjson
except ImportError:  # pragma: no cover - exercised only without the serve extra
    orjson = None

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


def loads(body: bytes | memoryview) -> Any:
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


def bytes_elements(raw: bytes | memoryview, name: str) -> list[bytes]:
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
    return dumps_std(doc)


def dumps_std(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=True,
                      default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)).encode()


def binary_bytes(arr: np.ndarray, datatype: str) -> memoryview:
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
