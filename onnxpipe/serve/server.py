"""The HTTP server: Open Inference Protocol routes over aiohttp, one batcher and device pool per model.

Routes (KServe v2 / Triton): ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2`` (server
metadata), ``/v2/models/NAME[/versions/V]`` (model metadata), ``.../ready``, ``.../config``
(Triton's model config as JSON), ``POST .../infer``, the model repository extension (``GET|POST
/v2/repository/index``, ``POST /v2/repository/models/NAME/load|unload``) and ``GET /metrics``
(Prometheus). With ``grpc_port`` the same models answer the protocol over gRPC too
(:mod:`onnxpipe.serve.grpc_server`), through the same batchers and workers. Every refusal is
``{"error": "..."}`` with a 4xx/5xx status; a handler that raises never takes the server down.

Model control follows Triton's ``--model-control-mode``: ``none`` serves what it found at start
and refuses load/unload; ``explicit`` loads what ``load_models`` names (``*``: all) and then what
clients load; ``poll`` also rescans the repository every ``poll_seconds`` and loads new or changed
models, unloads removed ones. A model that is (re)loaded starts beside the old one, which keeps
serving until the new one is ready and drains its queue before it stops: no request fails.

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
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from onnxpipe._version import __version__
from onnxpipe.core.errors import InputError, OnnxpipeError
from onnxpipe.core.hardware import cpu
from onnxpipe.runtimes.cpu_pool import CpuLayout, choose_layout, cpu_share, probe_feeds
from onnxpipe.runtimes.providers import Device
from onnxpipe.serve.batcher import Batcher, Unavailable
from onnxpipe.serve.limits import RequestLimits
from onnxpipe.serve.metrics import Metrics
from onnxpipe.serve.protocol import (
    HEADER,
    InferRequest,
    ProtocolError,
    check_inputs,
    datatype_of,
    decode_request,
    encode_response,
    error_body,
    wire_shape,
)
from onnxpipe.serve.repository import ModelEntry, scan
from onnxpipe.serve.security import OPEN_PATHS, authorized, check_bind
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
    max_restarts: int = 5  # per worker within restart_window_s; past that its restart waits for the window
    restart_window_s: float = 60.0
    header_timeout_s: float = 15.0
    body_timeout_s: float = 60.0
    request_timeout_s: float = 300.0
    shutdown_grace_s: float = 1.0  # what in-flight requests and workers get at shutdown before they are cut
    grpc_port: int | None = None  # None: no gRPC; 0: a free port
    api_key: str | None = field(default=None, repr=False)
    insecure: bool = False  # listen beyond loopback without an API key
    model_control: str = "none"  # none | explicit | poll, as Triton names them
    load_models: tuple[str, ...] = ("*",)  # explicit mode: what to load at start ("*": everything)
    poll_seconds: float = 15.0
    cpu_workers: int | None = None  # one cpu device: its worker count (None: sized to the cores, see cpu_pool)

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(self.max_body_bytes, self.header_timeout_s, self.body_timeout_s, self.request_timeout_s)


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


MODEL_CONTROL = ("none", "explicit", "poll")
DRAIN_SECONDS = 60.0  # longest wait for a retired model's queued requests before it stops


class _Model:
    def __init__(self, entry: ModelEntry, pool: DevicePool | StagedPool, batcher: Batcher,
                 layout: CpuLayout | None = None) -> None:
        self.entry, self.pool, self.batcher, self.layout = entry, pool, batcher, layout
        self.stamp = _stamp(entry.path)


def _stamp(path: Path) -> tuple:
    """What tells a changed model file (or split model folder) in poll mode: sizes and mtimes."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _json(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(doc).encode(), status=status, content_type="application/json", headers=headers)


def _client_gone(exc: BaseException) -> bool:
    """A connection the client closed or reset: nothing to answer, nothing to log as an error."""
    from aiohttp import ClientConnectionResetError

    return isinstance(exc, (ConnectionResetError, BrokenPipeError, ClientConnectionResetError))


class InferenceServer:
    """Serve ``entries`` on ``devices`` (every model gets a worker per device).

    Args:
        entries: the models (see :func:`onnxpipe.serve.repository.discover`).
        devices: the devices each model runs on.
        options: address, batching and limits.

    Example:
        >>> url = await InferenceServer(entries, [Device.parse("cpu")]).start()  # doctest: +SKIP
    """

    def __init__(self, entries: list[ModelEntry], devices: list[Device], options: ServeOptions | None = None,
                 source: str | Path | None = None) -> None:
        self.entries, self.devices = entries, devices
        self.options = options or ServeOptions()
        if self.options.model_control not in MODEL_CONTROL:
            raise OnnxpipeError(f"unknown model control mode {self.options.model_control!r}",
                                hint=f"use one of {', '.join(MODEL_CONTROL)}")
        if self.options.cpu_workers is not None and (len(devices) != 1 or devices[0].kind != "cpu"):
            raise InputError("--workers sizes the pool of a single cpu device",
                             hint="leave --workers out with other devices, or list them: cpu:0,cpu:1,...")
        self.source = Path(source) if source is not None else None  # the repository load/unload reads
        self.metrics = Metrics(self.options.max_batch_size)
        self.models: dict[str, _Model] = {}
        self.url = ""
        self.grpc_address = ""  # host:port of the gRPC service, once started
        self._runner: web.AppRunner | None = None
        self._grpc = None
        self._loading = True
        self._closing = False
        self._states: dict[str, tuple[str, str]] = {}  # model -> (state, reason) while loading, unloading, failed
        self._control: asyncio.Lock | None = None  # created on the loop in start()
        self._failed: dict[str, tuple] = {}  # model -> files' stamp when it failed to load (poll retries on change)
        self._poller: asyncio.Task | None = None
        self._last: dict[str, float] = {}  # model -> time of its last answered request

    # lifecycle -----------------------------------------------------------------------------
    async def start(self) -> str:
        """Listen, then load the models on their devices; return the URL once they are ready.

        The port answers (live, not ready) while the models load, as orchestrators expect.

        Raises:
            InputError: a host beyond loopback without an API key (and not ``insecure``).
            OnnxpipeError: the port is taken, a model fails to load.
        """
        o = self.options
        check_bind(o.host, o.api_key, o.insecure)
        self._control = asyncio.Lock()
        app = web.Application(client_max_size=o.max_body_bytes, middlewares=[self._auth, self._errors])
        self._routes(app)
        # keepalive_timeout is also how long a new connection may take to send its headers: a connection
        # still waiting for a complete request line and headers then is closed (slow clients)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     keepalive_timeout=o.header_timeout_s, shutdown_timeout=o.shutdown_grace_s,
                                     logger=_HTTP_LOG)
        await self._runner.setup()
        site = web.TCPSite(self._runner, o.host, o.port)
        try:
            await site.start()
        except OSError as exc:
            import errno
            import socket

            await self._runner.cleanup()
            if isinstance(exc, socket.gaierror) or exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                raise OnnxpipeError(f"cannot listen on {o.host}:{o.port}: {exc.strerror or exc}",
                                    hint="--host must be an address of this machine, e.g. 127.0.0.1") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise OnnxpipeError(f"cannot listen on {o.host}:{o.port}: {exc.strerror or exc}",
                                    hint="ports below 1024 need privileges; pick --port 1024 or above") from None
            raise OnnxpipeError(f"cannot listen on {o.host}:{o.port}: {exc.strerror or exc}",
                                hint="pick another --port (0 picks a free one) or stop what uses it") from None
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        try:
            if o.grpc_port is not None:
                from onnxpipe.serve.grpc_server import start_grpc

                self._grpc, self.grpc_address = await start_grpc(self, o.host, o.grpc_port)
            entries = self.entries
            if o.model_control == "explicit" and "*" not in o.load_models:
                unknown = sorted(set(o.load_models) - {e.name for e in entries})
                if unknown:
                    raise InputError(f"--load-model {', '.join(unknown)}: no such model in the repository",
                                     hint=f"it has {', '.join(e.name for e in entries) or 'none'}")
                entries = [e for e in entries if e.name in o.load_models]
            for m in await self._open(entries):
                self.models[m.entry.name] = m
        except BaseException:
            await self.stop()
            raise
        if o.model_control == "poll":
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="repository-poll")
        self._loading = False
        return self.url

    async def _open(self, entries: list[ModelEntry]) -> list[_Model]:
        """Start pools and batchers for ``entries`` (all loading at once); close them all if one fails."""
        o = self.options
        loop = asyncio.get_running_loop()
        pools: list[DevicePool | StagedPool] = []
        layouts: list[CpuLayout | None] = []
        try:
            for entry in entries:
                layout = await loop.run_in_executor(None, self.cpu_layout, entry)
                layouts.append(layout)
                devices = layout.devices(self.devices[0]) if layout is not None else self.devices
                # a split model (pipeline.json) gets one pool per stage, chained
                pool = pool_for(entry, devices, depth=o.depth, max_restarts=o.max_restarts,
                                restart_window_s=o.restart_window_s, on_event=self._worker_event(entry.name))
                pools.append(pool)
                pool.launch()  # all models load at once
            for pool in pools:
                await loop.run_in_executor(None, pool.wait_ready)
            out = []
            for entry, pool, layout in zip(entries, pools, layouts):
                pool.attach(loop)
                batcher = Batcher(entry, pool, max_batch_size=o.max_batch_size, max_queue_delay_ms=o.max_queue_delay_ms,
                                  max_queue=o.max_queue, metrics=self.metrics)
                batcher.start()
                if layout is not None:
                    log.info("%s: CPU pool of %s", entry.name, layout.describe())
                out.append(_Model(entry, pool, batcher, layout))
            return out
        except BaseException:
            for pool in pools:
                pool.close()
            raise

    def cpu_layout(self, entry: ModelEntry) -> CpuLayout | None:
        """The worker pool of ``entry`` when the server runs on one ``cpu`` device (None otherwise: the
        devices as listed, one worker each). Sized to the cores less one for this process's event loop;
        ``threads`` on the device and ``cpu_workers`` force it (see :mod:`onnxpipe.runtimes.cpu_pool`)."""
        o = self.options
        if len(self.devices) != 1 or self.devices[0].kind != "cpu" or entry.pipeline is not None:
            return None  # a split model's stages share the cores as listed (see staged.py)
        batch = o.max_batch_size if entry.batchable else 1
        cores = cpu().cores
        return choose_layout(entry.path, lambda: probe_feeds(entry.path, batch), budget=cpu_share(1, cores=cores, reserve=1),
                             workers=o.cpu_workers, threads=self.devices[0].options.threads, cores=cores)

    async def _retire(self, m: _Model) -> None:
        """Stop a model nobody can reach any more, once the requests it holds are answered."""
        deadline = time.monotonic() + DRAIN_SECONDS
        while m.batcher.pending() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await m.batcher.stop()
        m.pool.close()

    async def stop(self) -> None:
        """Refuse new requests (503), answer what is queued or running with 503, stop listening and every
        worker: within ``shutdown_grace_s`` plus a second, whatever the workers are doing."""
        self._closing = True
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        for m in self.models.values():  # first: a handler waiting on a batch returns now, not at the timeout
            await m.batcher.stop()
        if self._grpc is not None:
            await self._grpc.stop(grace=self.options.shutdown_grace_s)
            self._grpc = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for m in self.models.values():
            m.pool.close(self.options.shutdown_grace_s)
        self.models.clear()

    # model control -------------------------------------------------------------------------
    def _check_control(self, action: str) -> None:
        if self.options.model_control == "none":
            raise ProtocolError(400, f"cannot {action} models: the server runs with --model-control none "
                                     "(start it with --model-control explicit or poll)")
        if self.source is None or not self.source.exists():
            raise ProtocolError(400, f"cannot {action} models: the server has no model repository to read")

    async def _scan(self) -> dict[str, tuple[str, Path]]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, scan, self.source)
        except OnnxpipeError as exc:  # two models with one name: the repository needs fixing
            raise ProtocolError(400, f"the model repository cannot be read: {exc.message}") from None

    async def load_model(self, name: str) -> None:
        """Load (or reload) model ``name`` from the repository; the old copy serves until the new one is ready.

        Raises:
            ProtocolError: model control is off (400), no such model in the repository (404), it fails to load (400).
        """
        self._check_control("load")
        async with self._control:
            found = await self._scan()
            if name not in found:
                raise ProtocolError(404, f"no model {name!r} in the repository: it has {', '.join(found) or 'none'}")
            await self._load(name, *found[name])

    async def _load(self, name: str, version: str, path: Path) -> None:
        loop = asyncio.get_running_loop()
        self._states[name] = ("LOADING", "")
        try:
            entry = await loop.run_in_executor(None, ModelEntry.open, path, name, version)
            (new,) = await self._open([entry])
        except OnnxpipeError as exc:
            self._states[name] = ("UNAVAILABLE", exc.message)
            self._failed[name] = _stamp(path)
            raise ProtocolError(400, f"model {name!r} failed to load: {exc.message}") from None
        except BaseException:
            self._states.pop(name, None)
            raise
        if self._runner is None:  # the server stopped while this model loaded: nobody will serve it
            await self._retire(new)
            self._states.pop(name, None)
            raise ProtocolError(503, "the server is shutting down")
        old = self.models.get(name)
        self.models[name] = new  # new requests go to the new copy from here on
        self._states.pop(name, None)
        self._failed.pop(name, None)
        if old is not None:
            await self._retire(old)

    async def unload_model(self, name: str) -> None:
        """Stop serving ``name``: new requests get 404, the queued ones are answered first.

        Raises:
            ProtocolError: model control is off (400), the model is not loaded (404).
        """
        self._check_control("unload")
        async with self._control:
            await self._unload(name)

    async def _unload(self, name: str) -> None:
        m = self.models.pop(name, None)
        if m is None:
            raise ProtocolError(404, f"model {name!r} is not loaded")
        self._states[name] = ("UNLOADING", "")
        try:
            await self._retire(m)
        finally:
            self._states[name] = ("UNAVAILABLE", "unloaded")

    async def _poll(self) -> None:
        """Poll mode: load new and changed models, unload removed ones, every ``poll_seconds``."""
        while True:
            await asyncio.sleep(self.options.poll_seconds)
            try:
                await self.sync_repository()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a broken file in the repository must not stop the polling
                log.warning("repository poll: %s", exc)

    async def sync_repository(self) -> list[str]:
        """Bring the served models in line with the repository now; returns what changed (``+name``, ``~name``, ``-name``)."""
        changes = []
        async with self._control:
            found = await self._scan()
            for name in [n for n in self.models if n not in found]:
                await self._unload(name)
                changes.append(f"-{name}")
            for name, (version, path) in found.items():
                m = self.models.get(name)
                if m is not None and m.entry.version == version and m.entry.path == path and m.stamp == _stamp(path):
                    continue
                if m is None and self._failed.get(name) == _stamp(path):
                    continue  # failed to load before and unchanged since: not retried every poll
                try:
                    await self._load(name, version, path)
                    changes.append(f"{'~' if m is not None else '+'}{name}")
                except ProtocolError as exc:
                    log.warning("repository poll: %s", exc.message)
        return changes

    async def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Every model of the repository (or only those served, without one) with its state."""
        found = await self._scan() if self.source is not None and self.source.is_dir() else {}
        rows = []
        busy = {n for n, (state, _) in self._states.items() if state in ("LOADING", "UNLOADING")}
        for name in sorted(set(found) | set(self.models) | busy):
            m = self.models.get(name)
            if m is not None:
                state, reason = ("READY", "") if m.pool.ready_workers() else ("UNAVAILABLE", "no device worker ready")
                version = m.entry.version
            else:
                state, reason = self._states.get(name, ("UNAVAILABLE", "not loaded"))
                version = found[name][0] if name in found else ""
            if ready_only and state != "READY":
                continue
            row = {"name": name, "version": version, "state": state}
            if reason:
                row["reason"] = reason
            rows.append(row)
        return rows

    # what HTTP and gRPC both answer ----------------------------------------------------------
    def is_ready(self) -> bool:
        return not self._loading and all(m.pool.ready_workers() > 0 for m in self.models.values())

    def extensions(self) -> list[str]:
        return ["binary_tensor_data", "model_repository", "statistics"]

    def config_of(self, m: _Model) -> dict:
        """Triton's model configuration of a served model (JSON field names)."""
        try:
            return model_config(m.entry, m.pool.devices if m.layout else self.devices, max_batch_size=self.options.max_batch_size,
                                max_queue_delay_ms=self.options.max_queue_delay_ms)
        except OnnxpipeError as exc:
            raise ProtocolError(400, exc.message) from None

    def statistics(self, name: str) -> dict:
        """Triton's model statistics from the metrics: counts and (count, seconds) pairs."""
        mt = self.metrics

        def summed(h: object) -> tuple[float, float]:  # over every device
            rows = [s for k, s in h.series.items() if ("model", name) in k]
            return sum(s[-1] for s in rows), sum(s[-2] for s in rows)

        return {"last_inference_ms": int(self._last.get(name, 0.0) * 1000),
                "inference_count": int(mt.batch_size.total(model=name)),
                "execution_count": mt.batch_size.count(model=name),
                "success": (mt.requests.value(model=name, status="success"), mt.latency.total(model=name)),
                "fail": (mt.requests.value(model=name, status="error"), 0.0),
                "queue": (mt.queue.count(model=name), mt.queue.total(model=name)),
                "compute_infer": summed(mt.compute)}

    # the one infer path, HTTP and gRPC ---------------------------------------------------------
    def lookup(self, name: str, version: str | None = None) -> _Model:
        """The model serving ``name`` (and ``version``, if given and not empty).

        Raises:
            ProtocolError: no such model or version (404).
        """
        m = self.models.get(name)
        if m is None:
            known = ", ".join(self.models) or "none loaded yet"
            raise ProtocolError(404, f"unknown model {name!r}: this server has {known}")
        if version and version != m.entry.version:
            raise ProtocolError(404, f"model {name!r} has no version {version!r}: it serves version {m.entry.version}")
        return m

    async def run(self, name: str, version: str | None, req: InferRequest) -> tuple[ModelEntry, dict]:
        """Check ``req`` against model ``name`` and run it through the model's batcher; the outputs asked for.

        The model is looked up here, right before queueing (no await in between): a request
        decoded while its model was unloaded gets 404, never a batcher that stopped.
        """
        if self._closing:
            raise Unavailable("the server is shutting down", None)
        m = self.lookup(name, version)
        e = m.entry
        check_inputs(req, e.inputs, e.output_names, e.name)
        timeout = self.options.request_timeout_s
        try:
            outputs = await asyncio.wait_for(m.batcher.infer(req.inputs), timeout)
        except asyncio.TimeoutError:  # a worker that hangs (not dies) must not hang its clients
            raise Unavailable(f"model {e.name!r} did not answer within {timeout:g} s", 1.0) from None
        self._last[name] = time.time()
        return e, {n: outputs[n] for n in (req.outputs or e.output_names)}

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
