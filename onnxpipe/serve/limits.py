"""What a request may cost before the server spends anything on it: size, shape, nesting, time.

Checked in this order, each before the work it protects:

1. the declared ``Content-Length`` against ``max_body_bytes`` (413, nothing read);
2. the body read within ``body_timeout_s`` (408; headers have ``header_timeout_s``, see the server);
3. the JSON part's decoding cost (every JSON value becomes a Python object of ~40 bytes), its
   nesting (arrays deeper than a tensor's dims, more objects than a request has) and the shapes and
   datatypes it declares, found by a scan of the raw bytes, against the limit (413/400, nothing
   decoded, no parser recursing);
4. then :func:`onnxpipe.serve.protocol.decode_request` checks the decoded document's structure
   (types of ``name``, ``datatype``, ``shape``, ``parameters``, ``id``, at most ``MAX_DIMS`` dims),
   so a client mistake is a 400 naming the field.

Example:
    >>> limits = RequestLimits(max_body_bytes=1 << 20)
    >>> limits.check_json_cost(b'{"inputs": [{"name": "x", "shape": [1000000000], "datatype": "FP32"}]}')
    Traceback (most recent call last):
    onnxpipe.serve.protocol.ProtocolError: input 'x' declares shape [1000000000] of FP32: 4000000000 bytes, over the limit of 1048576 bytes
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from onnxpipe.serve.protocol import MAX_DIMS
from onnxpipe.serve.wire import DATATYPES, ProtocolError

PY_OBJECT_BYTES = 40  # what one decoded JSON value costs: the object plus its slot in a list

MAX_OBJECTS = 4096  # JSON objects in one request: one per input and output and their parameters
_DEEP = re.compile(rb"\[(?:\s*\[){%d}" % (MAX_DIMS + 1))  # more nested arrays than a tensor has dims
_SHAPE = re.compile(rb'"shape"\s*:\s*\[([^\[\]]*)\]')
_DATATYPE = re.compile(rb'"datatype"\s*:\s*"([A-Za-z0-9]{1,16})"')
_NAME = re.compile(rb'"name"\s*:\s*"([^"\\]{0,200})"')


@dataclass(frozen=True)
class RequestLimits:
    """The bounds on one request.

    Args:
        max_body_bytes: the largest body, and the most memory decoding it may take.
        header_timeout_s: time for a connection to send its request line and headers (slow clients).
        body_timeout_s: time to receive the body once the headers are in.
        request_timeout_s: time for the answer once the request is decoded (503 after it, with Retry-After).
    """

    max_body_bytes: int = 64 << 20
    header_timeout_s: float = 15.0
    body_timeout_s: float = 60.0
    request_timeout_s: float = 300.0

    def check_length(self, content_length: int | None) -> None:
        """A declared body over the limit is refused before a byte of it is read."""
        if content_length is not None and content_length > self.max_body_bytes:
            raise ProtocolError(413, f"the request body ({content_length} bytes) is over the limit of "
                                     f"{self.max_body_bytes} bytes")

    def check_json_cost(self, head: bytes) -> None:
        """Refuse a JSON part whose decoding, or whose declared tensors, would take more than the limit.

        Both come from a scan of the raw bytes (no decoding): the count of separators bounds the
        number of JSON values; ``"shape": [...]`` and ``"datatype": "..."`` give the tensors' sizes.
        """
        values = head.count(b",") + head.count(b"[") + 1
        cost = len(head) + values * PY_OBJECT_BYTES
        if cost > self.max_body_bytes:
            raise ProtocolError(413, f"the JSON part of the request ({len(head)} bytes, ~{values} values) would take "
                                     f"~{cost} bytes to decode, over the limit of {self.max_body_bytes} bytes; send "
                                     f"large tensors in binary (parameters.binary_data_size)")
        objects = head.count(b"{")
        if objects > MAX_OBJECTS:  # also bounds object nesting, which would otherwise go to the parser's limit
            raise ProtocolError(400, f"the request's JSON holds {objects} objects, more than the {MAX_OBJECTS} allowed")
        if _DEEP.search(head):
            raise ProtocolError(400, f"the request's JSON nests arrays deeper than the {MAX_DIMS} dims a tensor may have")
        shapes = _SHAPE.findall(head)
        types = _DATATYPE.findall(head)
        names = _NAME.findall(head)
        for k, dims_text in enumerate(shapes):
            dims = [d.strip() for d in dims_text.split(b",") if d.strip()]
            name = names[k].decode(errors="replace") if len(names) == len(shapes) else f"#{k}"
            if len(dims) > MAX_DIMS:
                raise ProtocolError(400, f"input {name!r}: {len(dims)} dims, more than the {MAX_DIMS} allowed")
            if not all(d.isdigit() and len(d) <= 19 for d in dims):
                continue  # not plain integers: the structure check names the problem
            datatype = types[k].decode() if len(types) == len(shapes) else None
            itemsize = DATATYPES[datatype].itemsize if datatype in DATATYPES and datatype != "BYTES" else 1
            nbytes = math.prod(int(d) for d in dims) * itemsize
            if nbytes > self.max_body_bytes:
                shape = "[" + ", ".join(d.decode() for d in dims) + "]"
                raise ProtocolError(413, f"input {name!r} declares shape {shape}" + (f" of {datatype}" if datatype else "")
                                         + f": {nbytes} bytes, over the limit of {self.max_body_bytes} bytes")
