"""The HTTP side of :class:`onnxpipe.serve.server.InferenceServer`: its routes, middlewares (API key,
errors as ``{"error": ...}``) and request handlers.

:class:`HttpRoutes` is a part of the server: it uses the server's ``models``, ``options``, ``metrics``
and the methods HTTP and gRPC share (``lookup``, ``run``, ``statistics``, ...).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from onnxpipe._version import __version__
from onnxpipe.serve.batcher import Unavailable
from onnxpipe.serve.control import _Model
from onnxpipe.serve.http_io import OFFLOAD_BYTES, _bad_body, _client_gone, _json, _read_body
from onnxpipe.serve.protocol import HEADER, decode_request, encode_response, error_body, wire_shape
from onnxpipe.serve.security import OPEN_PATHS, authorized
from onnxpipe.serve.wire import ProtocolError, datatype_of

log = logging.getLogger("onnxpipe.serve")


class HttpRoutes:
    """Routes, middlewares and handlers of the HTTP server (mixed into the server)."""

    # routing -------------------------------------------------------------------------------
    def _routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        r.add_get("/metrics", self.prometheus)
        r.add_post("/v2/repository/index", self.index)
        r.add_get("/v2/repository/index", self.index)
        r.add_post("/v2/repository/models/{model}/load", self.load)
        r.add_post("/v2/repository/models/{model}/unload", self.unload)
        r.add_get("/v2/models/stats", self.stats)  # before /v2/models/{model}: routes match in order
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(base, self.model_metadata)
            r.add_get(base + "/ready", self.model_ready)
            r.add_get(base + "/config", self.model_config)
            r.add_post(base + "/infer", self.infer)
            r.add_get(base + "/stats", self.stats)
        from onnxpipe.serve.generate import install  # text-generation folders: Triton's generate extension

        install(app, self)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                    ) -> web.StreamResponse:
        # before the body is read: a request without the key costs its headers, nothing more
        key = self.options.api_key
        if key is not None and request.path not in OPEN_PATHS and not authorized(request.headers.get("Authorization"), key):
            self.metrics.errors.inc(model="", status="401")
            return web.Response(body=error_body("missing or wrong API key: send 'Authorization: Bearer <key>'"),
                                status=401, content_type="application/json",
                                headers={"WWW-Authenticate": 'Bearer realm="onnxpipe"'})
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                      ) -> web.StreamResponse:
        headers = None
        try:
            return await handler(request)
        except ProtocolError as exc:
            status, message = exc.status, exc.message
            wait = getattr(exc, "retry_after", None)
            if isinstance(exc, Unavailable) and wait is not None:
                headers = {"Retry-After": str(max(1, round(wait)))}
        except web.HTTPRequestEntityTooLarge:
            status = 413
            message = f"the request body is over the limit of {self.options.max_body_bytes} bytes"
        except web.HTTPException as exc:  # no such route, wrong method
            if exc.status < 400:
                raise
            status, message = exc.status, f"{exc.reason}: {request.method} {request.path}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: the client gets its message, the log the traceback
            if _client_gone(exc):  # nobody to answer; aiohttp drops the response on the closed connection
                log.info("%s %s: the client went away", request.method, request.path)
                return web.Response(status=400)
            if _bad_body(exc):  # a false Content-Encoding, a truncated chunked body: the client's mistake
                status, message = 400, f"cannot read the request body: {type(exc).__name__}: {exc}"
                return self._refusal(request, status, message, headers)
            log.exception("error in %s %s", request.method, request.path)
            status, message = 500, f"internal error: {type(exc).__name__}: {exc}"
        return self._refusal(request, status, message, headers)

    def _refusal(self, request: web.Request, status: int, message: str, headers: dict[str, str] | None) -> web.Response:
        model = request.match_info.get("model")
        self.metrics.errors.inc(model=model if model in self.models else "", status=str(status))
        if model in self.models and request.path.endswith("/infer"):
            self.metrics.requests.inc(model=model, status="error")
        return _json({"error": message}, status, headers)

    def _model(self, request: web.Request) -> _Model:
        return self.lookup(request.match_info["model"], request.match_info.get("version"))

    # handlers ------------------------------------------------------------------------------
    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ok = self.is_ready()
        return _json({"ready": ok}, 200 if ok else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json({"name": "onnxpipe", "version": __version__, "extensions": self.extensions()})

    async def index(self, request: web.Request) -> web.Response:
        ready = False
        if request.method == "POST" and request.can_read_body:
            doc = await request.read()
            if doc.strip():
                try:
                    ready = bool(json.loads(doc).get("ready", False))
                except (ValueError, AttributeError):
                    raise ProtocolError(400, 'the index request must be a JSON object like {"ready": true}') from None
        return _json(await self.repository_index(ready))

    async def stats(self, request: web.Request) -> web.Response:
        names = [self._model(request).entry.name] if "model" in request.match_info else list(self.models)
        rows = []
        for name in names:
            st = self.statistics(name)
            rows.append({"name": name, "version": self.models[name].entry.version,
                         "last_inference": st["last_inference_ms"], "inference_count": st["inference_count"],
                         "execution_count": st["execution_count"],
                         "inference_stats": {k: {"count": int(st[k][0]), "ns": int(st[k][1] * 1e9)}
                                             for k in ("success", "fail", "queue", "compute_infer")}})
        return _json({"model_stats": rows})

    async def load(self, request: web.Request) -> web.Response:
        await self.load_model(request.match_info["model"])
        return _json({})

    async def unload(self, request: web.Request) -> web.Response:
        await self.unload_model(request.match_info["model"])
        return _json({})

    async def model_metadata(self, request: web.Request) -> web.Response:
        m = self._model(request)
        e = m.entry

        def tensors(infos: list) -> list[dict]:
            return [{"name": t.name, "datatype": datatype_of(t.dtype), "shape": wire_shape(t)} for t in infos]

        doc = {"name": e.name, "versions": [e.version], "platform": "onnxruntime_onnx",
               "inputs": tensors(e.inputs), "outputs": tensors(e.outputs)}
        if m.layout is not None:  # an extension field: clients of the protocol ignore what they do not know
            doc["cpu_pool"] = m.layout.as_dict()
        return _json(doc)

    async def model_ready(self, request: web.Request) -> web.Response:
        m = self._model(request)
        ok = m.pool.ready_workers() > 0
        return _json({"name": m.entry.name, "ready": ok}, 200 if ok else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        return _json(self.config_of(self._model(request)))

    async def prometheus(self, request: web.Request) -> web.Response:
        for m in self.models.values():
            self.metrics.workers_ready.set(m.pool.ready_workers(), model=m.entry.name)
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    async def infer(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        name, version = request.match_info["model"], request.match_info.get("version")
        self.lookup(name, version)  # an unknown model is refused before its body is read
        limits = self.options.limits
        if self._closing:
            raise Unavailable("the server is shutting down", None)
        limits.check_length(request.content_length)
        try:
            body = await asyncio.wait_for(_read_body(request, limits.max_body_bytes), limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise ProtocolError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s") from None
        loop = asyncio.get_running_loop()
        big = len(body) > OFFLOAD_BYTES
        header = request.headers.get(HEADER)
        head = body if header is None or not str(header).isdigit() else body[:int(header)]
        limits.check_json_cost(head)  # declared shapes x datatypes and the JSON's decoding cost, nothing decoded yet
        req = await loop.run_in_executor(None, decode_request, body, header) if big else decode_request(body, header)
        del body, head
        e, picked = await self.run(name, version, req)
        if big or sum(v.nbytes for v in picked.values()) > OFFLOAD_BYTES:
            payload, head = await loop.run_in_executor(None, encode_response, e.name, e.version, picked, req)
        else:
            payload, head = encode_response(e.name, e.version, picked, req)
        self.metrics.requests.inc(model=e.name, status="success")
        self.metrics.latency.observe(time.perf_counter() - t0, model=e.name)
        if head is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload, content_type="application/octet-stream", headers={HEADER: str(head)})
