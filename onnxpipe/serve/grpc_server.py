"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on grpcio's asyncio server.

It runs on the HTTP server's event loop and calls the same :class:`InferenceServer` methods, so a
request over gRPC joins the same batches, on the same workers, as one over HTTP. Tensors travel
as ``raw_input_contents`` / ``raw_output_contents`` (what ``tritonclient.grpc`` sends) or as
typed ``contents``; responses always use raw contents. Errors map to gRPC status codes: 400 ->
INVALID_ARGUMENT, 401 -> UNAUTHENTICATED, 404 -> NOT_FOUND, 413 -> RESOURCE_EXHAUSTED, 503 ->
UNAVAILABLE, anything else -> INTERNAL.

Example:
    >>> server, address = await start_grpc(inference_server, "127.0.0.1", 0)  # doctest: +SKIP
    >>> tritonclient.grpc.InferenceServerClient(address).is_server_live()  # doctest: +SKIP
    True
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from onnxpipe._version import __version__
from onnxpipe.serve.grpc_proto import grpc_service_pb2_grpc as service
from onnxpipe.serve.grpc_proto import oip_pb2 as pb
from onnxpipe.serve.protocol import InferRequest, _tensor, wire_shape
from onnxpipe.serve.security import OPEN_RPCS, authorized, tensor_bytes
from onnxpipe.serve.wire import DATATYPES, ProtocolError, binary_bytes, datatype_of

# the server is an onnxpipe.serve.server.InferenceServer; it imports this module (lazily, for
# --grpc-port), so this module does not import it back, not even for type checking
InferenceServer = Any

log = logging.getLogger("onnxpipe.serve")

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}

# typed contents field of each datatype (FP16 has none: it travels raw)
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def decode_infer(msg: pb.ModelInferRequest, limit: int) -> InferRequest:
    """A gRPC infer request as the :class:`InferRequest` HTTP decoding gives; every tensor bounded by ``limit`` bytes.

    Raises:
        ProtocolError: bad datatype, shape or contents (400), a tensor over ``limit`` (413).
    """
    raw = msg.raw_input_contents
    if not msg.inputs:
        raise ProtocolError(400, "the request has no inputs")
    if raw and len(raw) != len(msg.inputs):
        raise ProtocolError(400, f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs")
    inputs: dict[str, np.ndarray] = {}
    for k, t in enumerate(msg.inputs):
        shape = list(t.shape)
        if t.datatype in DATATYPES and all(d >= 0 for d in shape):
            tensor_bytes(shape, DATATYPES[t.datatype].itemsize if t.datatype != "BYTES" else 1, limit, t.name)
        spec = {"name": t.name, "datatype": t.datatype, "shape": shape}
        if raw:
            name, arr = _tensor(spec, raw[k])
        else:
            field = _CONTENTS.get(t.datatype)
            if field is None and t.datatype in DATATYPES:
                raise ProtocolError(400, f"input {t.name!r}: {t.datatype} travels in raw_input_contents only")
            spec["data"] = list(getattr(t.contents, field)) if field else []
            if t.datatype == "BYTES":
                spec["data"] = [bytes(v) for v in spec["data"]]
            name, arr = _tensor(spec, None)
        if name in inputs:
            raise ProtocolError(400, f"input {name!r} is given twice")
        inputs[name] = arr
    req = InferRequest(inputs, id=msg.id or None)
    if msg.outputs:
        req.outputs = [o.name for o in msg.outputs]
    return req


def encode_infer(model: str, version: str, outputs: dict[str, np.ndarray], request_id: str | None,
                 ) -> pb.ModelInferResponse:
    """The response: every output's raw little-endian bytes in ``raw_output_contents``, in order."""
    resp = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id or "")
    for name, arr in outputs.items():
        arr = np.asarray(arr)
        datatype = datatype_of(arr.dtype)
        resp.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        resp.raw_output_contents.append(bytes(binary_bytes(arr, datatype)))
    return resp


def _duration(count: float, seconds: float) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=int(count), ns=int(seconds * 1e9))


class Service(service.GRPCInferenceServiceServicer):
    """Every RPC of the protocol the server implements, each a thin layer over :class:`InferenceServer`."""

    def __init__(self, server: InferenceServer) -> None:
        self.server = server

    # health and metadata --------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.server.is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        m = self.server.models.get(request.name)
        ok = m is not None and (not request.version or request.version == m.entry.version) and m.pool.ready_workers() > 0
        return pb.ModelReadyResponse(ready=ok)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="onnxpipe", version=__version__, extensions=self.server.extensions())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        e = self.server.lookup(request.name, request.version).entry
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=e.name, versions=[e.version], platform="onnxruntime_onnx",
            inputs=[tensor(name=t.name, datatype=datatype_of(t.dtype), shape=wire_shape(t)) for t in e.inputs],
            outputs=[tensor(name=t.name, datatype=datatype_of(t.dtype), shape=wire_shape(t)) for t in e.outputs])

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        config = self.server.config_of(self.server.lookup(request.name, request.version))
        cfg = pb.ModelConfig(name=config["name"], platform=config["platform"], backend=config.get("backend", ""),
                             max_batch_size=config["max_batch_size"])
        for t in config["input"]:
            cfg.input.add(name=t["name"], data_type=pb.DataType.Value(str(t["data_type"])), dims=t["dims"])
        for t in config["output"]:
            cfg.output.add(name=t["name"], data_type=pb.DataType.Value(str(t["data_type"])), dims=t["dims"])
        return pb.ModelConfigResponse(config=cfg)

    # infer ------------------------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        t0 = time.perf_counter()
        srv = self.server
        try:
            srv.lookup(request.model_name, request.model_version)
            req = decode_infer(request, srv.options.max_body_bytes)
            e, picked = await srv.run(request.model_name, request.model_version, req)
        except ProtocolError:
            if request.model_name in srv.models:
                srv.metrics.requests.inc(model=request.model_name, status="error")
            raise
        resp = encode_infer(e.name, e.version, picked, req.id)
        srv.metrics.requests.inc(model=e.name, status="success")
        srv.metrics.latency.observe(time.perf_counter() - t0, model=e.name)
        return resp

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        srv = self.server
        names = [srv.lookup(request.name, request.version).entry.name] if request.name else list(srv.models)
        out = pb.ModelStatisticsResponse()
        for name in names:
            st = srv.statistics(name)
            out.model_stats.add(
                name=name, version=srv.models[name].entry.version, last_inference=st["last_inference_ms"],
                inference_count=st["inference_count"], execution_count=st["execution_count"],
                inference_stats=pb.InferStatistics(
                    success=_duration(*st["success"]), fail=_duration(*st["fail"]), queue=_duration(*st["queue"]),
                    compute_infer=_duration(*st["compute_infer"])))
        return out

    # model repository -----------------------------------------------------------------------
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        rows = await self.server.repository_index(request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: Any,
                                  ) -> pb.RepositoryModelLoadResponse:
        await self.server.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: Any,
                                    ) -> pb.RepositoryModelUnloadResponse:
        await self.server.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _guarded(server: InferenceServer, name: str, method: Callable) -> Callable:
    """``method`` behind the API key check, with every :class:`ProtocolError` turned into a gRPC status."""
    open_rpc = name in OPEN_RPCS

    async def call(request: Any, context: Any) -> Any:
        if not open_rpc and server.options.api_key is not None:
            header = next((v for k, v in (context.invocation_metadata() or ()) if k == "authorization"), None)
            if not authorized(header if isinstance(header, str) else None, server.options.api_key):
                server.metrics.errors.inc(model="", status="401")
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "missing or wrong API key: send the metadata 'authorization: Bearer <key>'")
        try:
            return await method(request, context)
        except ProtocolError as exc:
            model = getattr(request, "model_name", "") or getattr(request, "name", "")
            server.metrics.errors.inc(model=model if model in server.models else "", status=str(exc.status))
            await context.abort(_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.exception("error in gRPC %s", name)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    call.__name__ = name
    return call


async def start_grpc(server: InferenceServer, host: str, port: int) -> tuple[grpc.aio.Server, str]:
    """Serve ``server``'s models over gRPC on ``host:port`` (0: a free port); returns the server and ``host:port``.

    Raises:
        OnnxpipeError: the port cannot be bound.
    """
    from onnxpipe.core.errors import OnnxpipeError

    limit = server.options.max_body_bytes
    aio = grpc.aio.server(options=[("grpc.max_receive_message_length", limit + (1 << 16)),
                                   ("grpc.max_send_message_length", -1),
                                   ("grpc.so_reuseport", 0)])
    impl = Service(server)
    for name in [n for n in vars(Service) if n[:1].isupper()]:  # the RPCs: instance attributes shadow the methods
        setattr(impl, name, _guarded(server, name, getattr(impl, name)))
    service.add_GRPCInferenceServiceServicer_to_server(impl, aio)
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = aio.add_insecure_port(bind)
    except RuntimeError as exc:
        bound = 0
        log.debug("gRPC bind: %s", exc)
    if not bound:
        raise OnnxpipeError(f"cannot listen for gRPC on {bind}",
                            hint="pick another --grpc-port (0 picks a free one) or stop what uses it")
    await aio.start()
    return aio, (f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}")
