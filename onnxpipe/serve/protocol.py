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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxpipe.core.tensors import TensorInfo, feed_mismatch
from onnxpipe.serve.wire import (
    DATATYPES,
    ProtocolError,
    binary_bytes,
    bytes_elements,
    datatype_of,
    dumps,
    dumps_std,
    json_array,
    json_data,
    loads,
)

HEADER = "Inference-Header-Content-Length"
MAX_DIMS = 64  # as ONNX Runtime and Triton: more dims than any model has



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
            values = bytes_elements(raw, name)
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
    doc = loads(head)
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
            raw = binary_bytes(arr, datatype)
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
    head = dumps(doc) if finite else dumps_std(doc)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def error_body(message: str) -> bytes:
    """The protocol's error document: ``{"error": message}``."""
    return dumps({"error": message})
