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
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from onnxpipe.core.errors import InputError, OnnxpipeError
from onnxpipe.core.hardware import cpu
from onnxpipe.runtimes.cpu_pool import CpuLayout, choose_layout, cpu_share, probe_feeds
from onnxpipe.runtimes.providers import Device
from onnxpipe.serve.batcher import Batcher, Unavailable
from onnxpipe.serve.control import MODEL_CONTROL, ModelControl, _Model
from onnxpipe.serve.http_io import _HTTP_LOG
from onnxpipe.serve.limits import RequestLimits
from onnxpipe.serve.metrics import Metrics
from onnxpipe.serve.protocol import InferRequest, ProtocolError, check_inputs
from onnxpipe.serve.repository import ModelEntry
from onnxpipe.serve.routes import HttpRoutes
from onnxpipe.serve.security import check_bind
from onnxpipe.serve.staged import StagedPool, pool_for
from onnxpipe.serve.triton import model_config
from onnxpipe.serve.workers import DevicePool

log = logging.getLogger("onnxpipe.serve")


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


class InferenceServer(ModelControl, HttpRoutes):
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

    # model control (load, unload, poll): onnxpipe.serve.control; HTTP routes and handlers: onnxpipe.serve.routes

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
