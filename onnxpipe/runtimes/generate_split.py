"""Generation with a decoder split across devices: each stage holds its layers and their KV cache.

``onnxpipe split`` cuts a text-generation folder between decoder layers (see
:mod:`onnxpipe.partition.layers`): stage ``k`` reads ``past_key_values.{i}`` and writes
``present.{i}`` only for its own layers. Here every stage runs in a worker of its own, on its own
device (a local process per device, or a Ray actor per device across a cluster), and keeps its
cache there: after each step it turns its presents into its next pasts. Per token the driver
hands the token, mask and positions to the stages in order, and the small tensors crossing each
cut (the residual stream, the shared mask and rotary tables) from one stage to the next; only the
last stage's logits come back to be sampled. So the cache, the largest thing a decoder keeps,
never moves, and no device holds more than its share of the weights.

One sequence runs the stages one after another (a token needs every layer); the devices overlap
only across sequences, which this engine does not batch (yet).

Example:
    >>> gen = SplitEngine("llm_parts", "cpu:0,cpu:1")  # doctest: +SKIP
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.core.deps import require
from onnxpipe.core.errors import InputError, OnnxpipeError
from onnxpipe.partition.layers import PAST, PRESENT, past_shape
from onnxpipe.partition.spec import PipelineSpec, carried
from onnxpipe.runtimes.providers import Device, parse_devices

BACKENDS = ("local", "ray")


class StageCore:
    """One stage's session and its KV cache (the body of a local worker or a Ray actor)."""

    def __init__(self, model: str, device: str, threads: int | None, device_id: int | None = None) -> None:
        from onnxpipe.runtimes.device_session import DeviceSession

        self.session = DeviceSession(model, device, threads=threads, device_id=device_id)
        self.pasts = {i.name: i for i in self.session.inputs if PAST.match(i.name)}
        self.cache: dict[str, np.ndarray] = {}

    def reset(self, batch: int = 1) -> None:
        """An empty cache: every past with 0 positions along its sequence axis."""
        self.cache = {name: np.zeros(past_shape(name, info.shape, batch, 0), dtype=info.dtype)
                      for name, info in self.pasts.items()}

    def step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one step with the cache; keep the presents as the next pasts; return the rest."""
        outputs = self.session.run({**feeds, **self.cache})
        rest = {}
        for name, value in outputs.items():
            m = PRESENT.match(name)
            if m:
                self.cache[f"past_key_values.{m.group(1)}.{m.group(2)}"] = value
            else:
                rest[name] = value
        return rest

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid()}


def _serve(conn: Any, model: str, device: str, threads: int | None) -> None:
    """A local worker: a :class:`StageCore` answering (command, payload) messages until ``stop``."""
    try:
        core = StageCore(model, device, threads)
        conn.send(("ok", core.ready()))
    except BaseException as exc:  # reported to the driver, which raises it as one line
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        try:
            cmd, payload = conn.recv()
        except EOFError:
            return
        if cmd == "stop":
            return
        try:
            result = core.reset(payload) if cmd == "reset" else core.step(payload)
            conn.send(("ok", result))
        except BaseException as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _LocalStage:
    def __init__(self, model: str, device: Device, threads: int | None) -> None:
        ctx = mp.get_context("spawn")  # no inherited ONNX Runtime threads
        self.conn, child = ctx.Pipe()
        self.device = device
        self.proc = ctx.Process(target=_serve, args=(child, model, str(device), threads), daemon=True)
        self.proc.start()
        child.close()
        self._answer()

    def _answer(self) -> Any:
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):
            raise OnnxpipeError(f"the worker of stage on {self.device.label} died (exit code {self.proc.exitcode})",
                                hint="check the device's memory; run again with --debug") from None
        if status != "ok":
            raise OnnxpipeError(f"stage on {self.device.label} failed: {value}", hint="check the split folder")
        return value

    def call(self, cmd: str, payload: Any) -> Any:
        self.conn.send((cmd, payload))
        return self._answer()

    def close(self) -> None:
        try:
            self.conn.send(("stop", None))
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()


class _RayStage:
    def __init__(self, model: str, device: Device, threads: int | None) -> None:
        ray = require("ray")
        self._ray = ray
        self.device = device
        files = {Path(model).name: Path(model).read_bytes()}
        data = Path(f"{model}.data")
        if data.is_file():
            files[data.name] = data.read_bytes()
        actor_cls = ray.remote(num_gpus=1 if device.is_gpu else 0)(_RayStageActor)
        self.actor = actor_cls.remote(files, str(device), threads)
        ray.get(self.actor.ready.remote())

    def call(self, cmd: str, payload: Any) -> Any:
        method = self.actor.reset if cmd == "reset" else self.actor.step
        try:
            return self._ray.get(method.remote(payload))
        except Exception as exc:
            raise OnnxpipeError(f"stage on {self.device.label} failed: {str(exc).strip().splitlines()[-1]}",
                                hint="check the Ray cluster's logs") from exc

    def close(self) -> None:
        self._ray.kill(self.actor)


class _RayStageActor:
    """A Ray actor holding a stage: the model's files arrive through the object store."""

    def __init__(self, files: dict[str, bytes], device: str, threads: int | None) -> None:
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="onnxpipe-ray-stage-")
        for name, blob in files.items():
            Path(self._dir.name, name).write_bytes(blob)
        model = str(Path(self._dir.name) / next(iter(files)))
        self.core = StageCore(model, device, threads, device_id=0 if Device.parse(device).is_gpu else None)

    def ready(self) -> dict[str, Any]:
        return self.core.ready()

    def reset(self, batch: int) -> None:
        self.core.reset(batch)

    def step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.core.step(feeds)


class SplitEngine:
    """The stages of a split decoder folder on their devices; one token per :meth:`step` round.

    Args:
        folder: what ``onnxpipe split`` wrote from a text-generation folder.
        devices: one device per stage (``cpu:0,cpu:1``, ``cuda:0,cuda:1``).
        backend: ``local`` (a process per device) or ``ray`` (an actor per device).
        address: with ``ray``, the cluster to join (``auto``, ``ray://head:10001``); None starts
            a local Ray unless one is up.
        threads: intra-op threads per stage where the device sets none.
    """

    def __init__(self, folder: str | os.PathLike, devices: Any, *, backend: str = "local",
                 threads: int | None = None, address: str | None = None) -> None:
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}", hint=f"use one of {', '.join(BACKENDS)}")
        self.spec = PipelineSpec.load(folder)
        devs = parse_devices(devices)
        n = len(self.spec.parts)
        if len(devs) != n:
            raise InputError(f"{folder} has {n} stages but {len(devs)} device(s) were given",
                             hint="give one device per stage, e.g. --devices " + ",".join(f"cpu:{k}" for k in range(n)))
        if not any(PAST.match(t) for p in self.spec.parts for t in p.inputs):
            raise InputError(f"{folder} is not a split decoder (no stage reads past_key_values)",
                             hint="split a folder from onnxpipe convert --task text-generation")
        if backend == "ray":
            from onnxpipe.runtimes.ray_backend import join_ray

            join_ray(address)
        cls = _RayStage if backend == "ray" else _LocalStage
        self.stages: list[Any] = []
        start = time.perf_counter()
        try:
            for k, dev in enumerate(devs):
                self.stages.append(cls(str(self.spec.part_path(k)), dev, threads))
        except BaseException:
            self.close()
            raise
        self.load_s = time.perf_counter() - start
        self.devices = devs
        self.inputs = [i["name"] for i in self.spec.inputs]
        self.outputs = self.spec.output_names
        self._keep = [set(carried(self.spec.parts, ["logits"], k, self.inputs)) for k in range(n)]

    def reset(self, batch: int = 1) -> None:
        for s in self.stages:
            s.call("reset", batch)

    def step(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One decoder step through every stage; the logits."""
        values = dict(feeds)
        for k, (stage, part) in enumerate(zip(self.stages, self.spec.parts)):
            sent = {t: values[t] for t in part.inputs if not PAST.match(t)}
            values.update(stage.call("step", sent))
            values = {t: v for t, v in values.items() if t in self._keep[k]}
        return values["logits"]

    def close(self) -> None:
        for s in self.stages:
            s.close()
        self.stages = []

    def __enter__(self) -> SplitEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
