"""The HTTP server: Open Inference Protocol routes over aiohttp, one batcher and device pool per model.

Routes (KServe v2 / Triton): ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2`` (server
metadata), ``/v2/models/NAME[/versions/V]`` (model metadata), ``.../ready``, ``.../config``
(Triton's model config as JSON), ``POST .../infer``, ``POST /v2/repository/index`` and ``GET
/metrics`` (Prometheus). Every refusal is ``{"error": "..."}`` with a 4xx/5xx status; a handler
that raises never takes the server down.

Example:
    >>> server = InferenceServer(discover("model.onnx"), parse_devices("cpu"))  # doctest: +SKIP
    >>> with BackgroundServer(server) as url:  # doctest: +SKIP
    ...     urllib.request.urlopen(url + "/v2/health/ready").status
    200
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from onnxpipe._version import __version__
from onnxpipe.core.errors import OnnxpipeError
from onnxpipe.runtimes.providers import Device
from onnxpipe.serve.batcher import Batcher
from onnxpipe.serve.metrics import Metrics
from onnxpipe.serve.protocol import (
    HEADER,
    ProtocolError,
    check_inputs,
    datatype_of,
    decode_request,
    encode_response,
    wire_shape,
)
from onnxpipe.serve.repository import ModelEntry
from onnxpipe.serve.staged import StagedPool, pool_for
from onnxpipe.serve.triton import model_config
from onnxpipe.serve.workers import DevicePool

log = logging.getLogger("onnxpipe.serve")

OFFLOAD_BYTES = 256 << 10  # bodies bigger than this are decoded and encoded off the event loop


@dataclass(frozen=True)
class ServeOptions:
    """How the server listens and batches.

    Example:
        >>> ServeOptions(port=0).host
        '127.0.0.1'
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_body_bytes: int = 64 << 20
    max_queue: int = 2048
    depth: int = 2
    max_restarts: int = 5


class _Model:
    def __init__(self, entry: ModelEntry, pool: DevicePool | StagedPool, batcher: Batcher) -> None:
        self.entry, self.pool, self.batcher = entry, pool, batcher


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(doc).encode(), status=status, content_type="application/json")


class InferenceServer:
    """Serve ``entries`` on ``devices`` (every model gets a worker per device).

    Args:
        entries: the models (see :func:`onnxpipe.serve.repository.discover`).
        devices: the devices each model runs on.
        options: address, batching and limits.

    Example:
        >>> url = await InferenceServer(entries, [Device.parse("cpu")]).start()  # doctest: +SKIP
    """

    def __init__(self, entries: list[ModelEntry], devices: list[Device], options: ServeOptions | None = None) -> None:
        self.entries, self.devices = entries, devices
        self.options = options or ServeOptions()
        self.metrics = Metrics(self.options.max_batch_size)
        self.models: dict[str, _Model] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._loading = True

    # lifecycle -----------------------------------------------------------------------------
    async def start(self) -> str:
        """Listen, then load every model on its devices; return the URL once all are ready.

        The port answers (live, not ready) while the models load, as orchestrators expect.
        """
        o = self.options
        app = web.Application(client_max_size=o.max_body_bytes, middlewares=[self._errors])
        self._routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, o.host, o.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OnnxpipeError(f"cannot listen on {o.host}:{o.port}: {exc.strerror or exc}",
                                hint="pick another --port (0 picks a free one) or stop what uses it") from None
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        loop = asyncio.get_running_loop()
        try:
            pools = []
            for entry in self.entries:
                # a split model (pipeline.json) gets one pool per stage, chained
                pool = pool_for(entry, self.devices, depth=o.depth, max_restarts=o.max_restarts,
                                on_event=self._worker_event(entry.name))
                pools.append(pool)
                pool.launch()  # all models load at once
            for pool in pools:
                await loop.run_in_executor(None, pool.wait_ready)
            for entry, pool in zip(self.entries, pools):
                pool.attach(loop)
                batcher = Batcher(entry, pool, max_batch_size=o.max_batch_size, max_queue_delay_ms=o.max_queue_delay_ms,
                                  max_queue=o.max_queue, metrics=self.metrics)
                batcher.start()
                self.models[entry.name] = _Model(entry, pool, batcher)
        except BaseException:
            for pool in pools:
                pool.close()
            self.models.clear()
            await self._runner.cleanup()
            raise
        self._loading = False
        return self.url

    async def stop(self) -> None:
        """Stop listening, answer what is queued with 503, and stop every worker."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for m in self.models.values():
            await m.batcher.stop()
            m.pool.close()
        self.models.clear()

    def _worker_event(self, model: str) -> Callable[[str, str, str], None]:
        def on_event(kind: str, device: str, detail: str) -> None:
            if kind == "restart":
                self.metrics.restarts.inc(model=model, device=device)
        return on_event

    # routing -------------------------------------------------------------------------------
    def _routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        r.add_get("/metrics", self.prometheus)
        r.add_post("/v2/repository/index", self.index)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(base, self.model_metadata)
            r.add_get(base + "/ready", self.model_ready)
            r.add_get(base + "/config", self.model_config)
            r.add_post(base + "/infer", self.infer)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                      ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProtocolError as exc:
            status, message = exc.status, exc.message
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
            log.exception("error in %s %s", request.method, request.path)
            status, message = 500, f"internal error: {type(exc).__name__}: {exc}"
        model = request.match_info.get("model")
        self.metrics.errors.inc(model=model if model in self.models else "", status=str(status))
        if model in self.models and request.path.endswith("/infer"):
            self.metrics.requests.inc(model=model, status="error")
        return _json({"error": message}, status)

    def _model(self, request: web.Request) -> _Model:
        name = request.match_info["model"]
        m = self.models.get(name)
        if m is None:
            known = ", ".join(self.models) or "none loaded yet"
            raise ProtocolError(404, f"unknown model {name!r}: this server has {known}")
        version = request.match_info.get("version")
        if version is not None and version != m.entry.version:
            raise ProtocolError(404, f"model {name!r} has no version {version!r}: it serves version {m.entry.version}")
        return m

    # handlers ------------------------------------------------------------------------------
    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ok = not self._loading and all(m.pool.ready_workers() > 0 for m in self.models.values())
        return _json({"ready": ok}, 200 if ok else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json({"name": "onnxpipe", "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]})

    async def index(self, request: web.Request) -> web.Response:
        return _json([{"name": m.entry.name, "version": m.entry.version,
                       "state": "READY" if m.pool.ready_workers() else "UNAVAILABLE"} for m in self.models.values()])

    async def model_metadata(self, request: web.Request) -> web.Response:
        e = self._model(request).entry

        def tensors(infos: list) -> list[dict]:
            return [{"name": t.name, "datatype": datatype_of(t.dtype), "shape": wire_shape(t)} for t in infos]

        return _json({"name": e.name, "versions": [e.version], "platform": "onnxruntime_onnx",
                      "inputs": tensors(e.inputs), "outputs": tensors(e.outputs)})

    async def model_ready(self, request: web.Request) -> web.Response:
        m = self._model(request)
        ok = m.pool.ready_workers() > 0
        return _json({"name": m.entry.name, "ready": ok}, 200 if ok else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        m = self._model(request)
        try:
            config = model_config(m.entry, self.devices, max_batch_size=self.options.max_batch_size,
                                  max_queue_delay_ms=self.options.max_queue_delay_ms)
        except OnnxpipeError as exc:
            raise ProtocolError(400, exc.message) from None
        return _json(config)

    async def prometheus(self, request: web.Request) -> web.Response:
        for m in self.models.values():
            self.metrics.workers_ready.set(m.pool.ready_workers(), model=m.entry.name)
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    async def infer(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        m = self._model(request)
        e = m.entry
        size = request.content_length
        if size is not None and size > self.options.max_body_bytes:
            raise ProtocolError(413, f"the request body ({size} bytes) is over the limit of {self.options.max_body_bytes} bytes")
        body = await request.read()
        loop = asyncio.get_running_loop()
        big = len(body) > OFFLOAD_BYTES
        header = request.headers.get(HEADER)
        req = await loop.run_in_executor(None, decode_request, body, header) if big else decode_request(body, header)
        check_inputs(req, e.inputs, e.output_names, e.name)
        outputs = await m.batcher.infer(req.inputs)
        picked = {n: outputs[n] for n in (req.outputs or e.output_names)}
        if big or sum(v.nbytes for v in picked.values()) > OFFLOAD_BYTES:
            payload, head = await loop.run_in_executor(None, encode_response, e.name, e.version, picked, req)
        else:
            payload, head = encode_response(e.name, e.version, picked, req)
        self.metrics.requests.inc(model=e.name, status="success")
        self.metrics.latency.observe(time.perf_counter() - t0, model=e.name)
        if head is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload, content_type="application/octet-stream", headers={HEADER: str(head)})


class BackgroundServer:
    """Run an :class:`InferenceServer` on an event loop in a thread (tests, benchmarks, notebooks).

    Example:
        >>> with BackgroundServer(InferenceServer(entries, devices, ServeOptions(port=0))) as url:  # doctest: +SKIP
        ...     print(url)
        http://127.0.0.1:40123
    """

    def __init__(self, server: InferenceServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="onnxpipe-serve", daemon=True)

    def start(self, timeout: float = 300.0) -> str:
        self._thread.start()
        try:
            return asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
        self.loop.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def serve_until_stopped(server: InferenceServer, on_ready: Callable[[str], None] | None = None) -> None:
    """Start ``server``, call ``on_ready(url)``, and run until SIGINT or SIGTERM; then shut down cleanly."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    try:
        url = await server.start()
        if on_ready is not None:
            on_ready(url)
        await stop.wait()
    finally:
        await server.stop()
