"""Triton's generate extension for text-generation folders: ``/generate`` and ``/generate_stream``.

A served model whose ``model.onnx`` sits beside a ``genai_config.json`` (what ``onnxpipe convert
--task text-generation`` writes) also answers

- ``POST /v2/models/{name}/generate`` with ``{"text_input": "...", "parameters": {"max_tokens": 32,
  "temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 1}}`` -> ``{"model_name", "model_version",
  "text_output"}``;
- ``POST /v2/models/{name}/generate_stream``: the same request, answered with server-sent events,
  one ``data: {"model_name", "model_version", "text_output": <piece>}`` per token.

Concurrent requests are decoded together: one thread takes every queued request (up to
:data:`MAX_BATCH`, after waiting :data:`GATHER_MS` for companions), left-pads the prompts and runs
one ORT step for all rows (:class:`onnxpipe.runtimes.generate.BatchDecoder`); a row leaves the
batch at its EOS or ``max_tokens``; requests that arrive meanwhile form the next batch. Each row
samples with its own parameters and seed. Tokens are identical to a request decoded alone.

Not onnxruntime-genai's ``Engine`` (its continuous batching): on this decoder (plain attention,
no GroupQueryAttention) it ran, 2.3x faster for 8 requests, but its batched rows diverged from the
same requests decoded alone after 3-5 tokens (6 of 8 rows, greedy, onnxruntime-genai 0.18).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from onnxpipe.core.errors import InputError
from onnxpipe.runtimes.generate import BatchDecoder, Sampling, TextGenerator, TextStream
from onnxpipe.serve.protocol import ProtocolError

log = logging.getLogger("onnxpipe.serve.generate")

_KEY = web.AppKey("generate_state", object)
_END = object()
DEFAULT_MAX_TOKENS = 64
MAX_BATCH = 16  # requests decoded together at most
GATHER_MS = 5.0  # after a request arrives, wait this long for others to join its batch


def is_generate_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a decoder for generation (``model.onnx`` beside ``genai_config.json``)."""
    return (folder / "model.onnx").is_file() and (folder / "genai_config.json").is_file()


@dataclass
class _Job:
    ids: list[int]
    max_tokens: int
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class GenerateService:
    """One text-generation folder: a thread decodes the queued requests together, batch after batch."""

    def __init__(self, folder: Path, name: str, version: str, *, max_batch: int = MAX_BATCH,
                 gather_ms: float = GATHER_MS) -> None:
        self.name, self.version = name, version
        self.max_batch, self.gather_s = max_batch, gather_ms / 1000
        self.generator = TextGenerator(folder, engine="ort")  # tokenizer, EOS ids, context length
        self.decoder = BatchDecoder(folder)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._drive, name=f"generate-{name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._inbox.put(_END)
        self._thread.join(timeout=30)

    def _drive(self) -> None:
        while True:
            jobs = [self._inbox.get()]
            deadline = time.monotonic() + self.gather_s  # let requests sent together start together
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._inbox.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            stop = any(j is _END for j in jobs)
            jobs = [j for j in jobs if j is not _END]
            if jobs:
                try:
                    self.decoder.run([j.ids for j in jobs], [j.max_tokens for j in jobs],
                                     on_token=lambda row, token, batch=jobs: batch[row].put(token),
                                     samplings=[j.sampling for j in jobs])
                except Exception as exc:
                    log.exception("generate batch failed")
                    for j in jobs:
                        j.put(exc)
                for j in jobs:
                    j.put(_END)
            if stop:
                return

    # the event loop side ---------------------------------------------------------------------
    async def tokens(self, text: str, max_tokens: int, sampling: Sampling,
                     result: dict[str, Any] | None = None) -> AsyncIterator[str]:
        """Text pieces of the continuation of ``text``, as they are decoded.

        At the end ``result["text"]`` holds the whole continuation decoded at once (byte-level
        pieces that are no valid UTF-8 on their own can decode differently piece by piece).
        """
        gen = self.generator
        ids = gen.encode(text)
        if not ids:
            raise ProtocolError(400, "text_input encodes to no tokens")
        if gen.context_length and len(ids) + max_tokens > gen.context_length:
            raise ProtocolError(400, f"text_input ({len(ids)} tokens) + max_tokens ({max_tokens}) exceed the "
                                     f"model's context of {gen.context_length}")
        job = _Job(ids, max_tokens, sampling, asyncio.get_running_loop())
        self._inbox.put(job)
        stream = TextStream(gen.decode)
        produced: list[int] = []
        while True:
            item = await job.out.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            if item in gen.eos_ids:
                continue
            produced.append(item)
            piece = stream(item)
            if piece:
                yield piece
        whole = gen.decode(produced)
        if result is not None:
            result["text"] = whole
        tail = stream.flush(whole)
        if tail:
            yield tail


def _parameters(doc: Any) -> tuple[str, int, Sampling]:
    if not isinstance(doc, dict):
        raise ProtocolError(400, "the request body must be a JSON object with text_input")
    text = doc.get("text_input")
    if not isinstance(text, str) or not text:
        raise ProtocolError(400, "text_input must be a non-empty string")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(400, "parameters must be an object")
    known = {"max_tokens", "temperature", "top_p", "top_k", "seed", "do_sample", "stream"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ProtocolError(400, f"unknown parameters {unknown}: use {sorted(known)}")
    try:
        max_tokens = int(params.get("max_tokens", DEFAULT_MAX_TOKENS))
        temperature = float(params.get("temperature", 1.0))
        top_p = float(params.get("top_p", 1.0))
        top_k = int(params.get("top_k", 0))
        seed = None if params.get("seed") is None else int(params["seed"])
    except (TypeError, ValueError) as exc:
        raise ProtocolError(400, f"a parameter has the wrong type: {exc}") from None
    sampled = any(k in params for k in ("temperature", "top_p", "top_k", "seed"))
    do_sample = bool(params.get("do_sample", sampled))
    if max_tokens < 1:
        raise ProtocolError(400, f"max_tokens must be >= 1, got {max_tokens}")
    sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
    try:
        sampling.validate()
    except InputError as exc:  # a bad value from the client
        raise ProtocolError(400, str(exc)) from None
    return text, max_tokens, sampling


async def _service(request: web.Request) -> GenerateService:
    """The service of the requested model, loaded on its first generate request."""
    state: _State = request.app[_KEY]
    name = request.match_info["model"]
    model = state.server.models.get(name)
    entry = getattr(model, "entry", None)
    folder = Path(entry.path).parent if entry is not None else None
    if entry is None or entry.pipeline is not None or not is_generate_folder(folder):
        raise ProtocolError(404, f"model {name!r} does not generate text (a generating model is a folder "
                                 "written by onnxpipe convert --task text-generation)")
    version = request.match_info.get("version")
    if version is not None and version != entry.version:
        raise ProtocolError(404, f"model {name!r} has no version {version!r}: it serves version {entry.version}")
    key = (name, str(entry.path), entry.version)
    async with state.lock:
        svc = state.services.get(key)
        if svc is None:
            for old in [k for k in state.services if k[0] == name]:  # a reloaded model: drop the old copy
                state.services.pop(old).close()
            loop = asyncio.get_running_loop()
            svc = await loop.run_in_executor(None, GenerateService, folder, name, entry.version)
            state.services[key] = svc
    return svc


@dataclass
class _State:
    server: Any  # the InferenceServer: its ``models`` map names to loaded models with an ``entry``
    services: dict[tuple[str, str, str], GenerateService] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


async def _generate(request: web.Request) -> web.Response:
    svc = await _service(request)
    text, max_tokens, sampling = _parameters(await request.json())
    result: dict[str, Any] = {}
    async for _ in svc.tokens(text, max_tokens, sampling, result):
        pass
    return web.json_response({"model_name": svc.name, "model_version": svc.version, "text_output": result["text"]})


async def _generate_stream(request: web.Request) -> web.StreamResponse:
    svc = await _service(request)
    text, max_tokens, sampling = _parameters(await request.json())
    pieces = svc.tokens(text, max_tokens, sampling)
    first = await anext(pieces, None)  # errors before the first token still get a JSON error status
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(piece: str) -> None:
        doc = {"model_name": svc.name, "model_version": svc.version, "text_output": piece}
        await response.write(f"data: {json.dumps(doc)}\n\n".encode())

    try:
        if first is not None:
            await send(first)
        async for piece in pieces:
            await send(piece)
    except ProtocolError as exc:
        await response.write(f"data: {json.dumps({'error': exc.message})}\n\n".encode())
    await response.write_eof()
    return response


def install(app: web.Application, server: Any) -> None:
    """Add the generate routes to ``server``'s app; services load on first use, close at cleanup."""
    state = _State(server)
    app[_KEY] = state
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_post(base + "/generate", _generate)
        app.router.add_post(base + "/generate_stream", _generate_stream)

    async def stop(_: web.Application) -> None:
        for svc in state.services.values():
            svc.close()
        state.services.clear()

    app.on_cleanup.append(stop)
