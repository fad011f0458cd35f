"""Reading HTTP requests and writing JSON answers for :mod:`onnxpipe.serve.server`: the body in one
buffer under its limit, which errors are the client's (a bad body, a closed connection), and the
aiohttp logger that keeps those at one INFO line.

Example:
    >>> _json({"live": True}).status
    200
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from onnxpipe.serve.protocol import ProtocolError

OFFLOAD_BYTES = 256 << 10  # bodies bigger than this are decoded and encoded off the event loop


async def _read_body(request: web.Request, limit: int) -> bytearray:
    """The body in one buffer of its declared length (``request.read()`` joins chunks: twice the memory)."""
    # a compressed body is read decompressed: its length is unknown until the end (and bounded by the limit)
    size = request.content_length if not request.headers.get("Content-Encoding") else None
    buf = bytearray(size) if size is not None else bytearray()
    pos = 0
    async for chunk in request.content.iter_any():
        end = pos + len(chunk)
        if end > limit:
            raise ProtocolError(413, f"the request body is over the limit of {limit} bytes")
        if size is not None and end > size:
            raise ProtocolError(400, f"the request body is longer than its Content-Length ({size} bytes)")
        buf[pos:end] = chunk
        pos = end
    if size is not None and pos != size:
        raise ProtocolError(400, f"the request body has {pos} bytes, not its Content-Length of {size}")
    return buf


def _bad_body(exc: BaseException) -> bool:
    """A body aiohttp could not read: a false Content-Encoding, a broken chunked encoding."""
    from aiohttp import http_exceptions
    from aiohttp.web_protocol import RequestPayloadError

    return isinstance(exc, (http_exceptions.HttpProcessingError, RequestPayloadError))


class _ClientMistakes(logging.Filter):
    """aiohttp logs a request its parser refuses (a false Content-Encoding, a bad chunk) with a traceback
    at ERROR, though the client got its 400: keep one line at INFO instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (_bad_body(exc) or _client_gone(exc)):
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            record.args, record.exc_info, record.exc_text = (), None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_HTTP_LOG = logging.getLogger("onnxpipe.serve.http")
_HTTP_LOG.addFilter(_ClientMistakes())


def _json(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(doc).encode(), status=status, content_type="application/json", headers=headers)


def _client_gone(exc: BaseException) -> bool:
    """A connection the client closed or reset: nothing to answer, nothing to log as an error."""
    from aiohttp import ClientConnectionResetError

    return isinstance(exc, (ConnectionResetError, BrokenPipeError, ClientConnectionResetError))
