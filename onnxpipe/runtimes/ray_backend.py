"""The batch runner on Ray: one actor per device (``num_gpus=1`` for GPU devices), same dispatcher.

The dispatcher keeps doing the ordering, retries and shards; Ray only runs micro-batches. An
actor runs one call at a time, in the order it received them, so when it dies the first of its
unfinished calls is the one it was running (an attempt against that batch) and the rest were
queued (re-run without blame). Ray hands each GPU actor its own GPU as ``CUDA_VISIBLE_DEVICES``,
so inside the actor the device index is 0. The model travels through Ray's object store (its
external-data file too), so remote nodes need no shared disk, only onnxpipe installed.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.core.deps import require
from onnxpipe.core.errors import OnnxpipeError
from onnxpipe.runtimes.providers import Device
from onnxpipe.runtimes.worker import Event


def join_ray(address: str | None) -> bool:
    """Start a local Ray, or join the cluster at ``address``, unless Ray is up; True when this call started it."""
    ray = require("ray")
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except Exception as exc:
        raise OnnxpipeError(f"cannot start or join Ray at {address or 'a local instance'}: {exc}",
                            hint="check --address (auto, ray://head:10001) and that the cluster is up") from exc
    return True


class _Actor:
    """The actor's body: a :class:`DeviceSession` on its device (wrapped by ``ray.remote`` at start)."""

    def __init__(self, files: dict[str, bytes], device: str, threads: int | None) -> None:
        from onnxpipe.runtimes.device_session import DeviceSession

        start = time.perf_counter()
        self._dir = tempfile.TemporaryDirectory(prefix="onnxpipe-ray-")
        for name, data in files.items():
            Path(self._dir.name, name).write_bytes(data)
        model = str(Path(self._dir.name) / next(iter(files)))
        self.session = DeviceSession(model, device, threads=threads,
                                     device_id=0 if Device.parse(device).is_gpu else None)
        self.load_s = time.perf_counter() - start

    def ready(self) -> dict[str, Any]:
        placement = self.session.placement.as_dict() if self.session.placement else None
        return {"pid": os.getpid(), "load_s": self.load_s, "placement": placement}

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        t0 = time.perf_counter()
        outputs = self.session.run(feeds)
        return outputs, time.perf_counter() - t0


@dataclass
class _RayWorker:
    device: Device
    threads: int | None
    depth: int
    actor: Any = None
    generation: int = 0
    queue: list[int] = field(default_factory=list)  # task ids in submission order
    ready: bool = False
    alive: bool = False
    pid: int | None = None
    restarts: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def free(self) -> int:
        return self.depth - len(self.queue) if self.ready else 0

    def inflight(self) -> list[int]:
        return list(self.queue)


class RayPool:
    """Ray actors behind the :class:`LocalPool` interface (start, submit, poll, restart, close).

    Args:
        model: path of the ``.onnx`` file (sent to the actors through the object store), or one per actor.
        devices: one actor per device.
        threads: intra-op threads per actor (also its ``num_cpus`` for CPU devices).
        address: a cluster to join (``auto``, ``ray://head:10001``); None starts a local Ray.
        depth: calls an actor holds at once.
        spread: ask Ray to place the actors on different nodes where it can (pipeline stages).

    Example:
        >>> pool = RayPool("m.onnx", [Device.parse("cpu:0")], [1])  # doctest: +SKIP
    """

    def __init__(self, model: str | list[str], devices: list[Device], threads: list[int | None], *,
                 address: str | None = None, depth: int = 2, spread: bool = False) -> None:
        self.ray = require("ray")
        self.model, self.address, self.depth, self.spread = model, address, depth, spread
        self.models = [model] * len(devices) if isinstance(model, str) else list(model)
        self.workers = [_RayWorker(d, t, depth) for d, t in zip(devices, threads)]
        self._refs: dict[Any, tuple[int, int, str, int]] = {}  # ref -> (wid, generation, kind, task)
        self._started_ray = False
        self._files: Any = None
        self._cls: Any = None

    def start(self) -> None:
        ray = self.ray
        if join_ray(self.address):
            self._started_ray = True
        self._files = {}
        for model in dict.fromkeys(self.models):
            path = Path(model)
            files = {path.name: path.read_bytes()}
            data = path.parent / f"{path.name}.data"
            if data.exists():
                files[data.name] = data.read_bytes()
            self._files[model] = ray.put(files)
        self._cls = ray.remote(_Actor)
        for wid in range(len(self.workers)):
            self._launch(wid)

    def _launch(self, wid: int) -> None:
        w = self.workers[wid]
        opts: dict[str, Any] = {"max_restarts": 0, "max_concurrency": 1}
        if w.device.is_gpu:
            opts.update(num_gpus=1, num_cpus=1)
        else:
            opts["num_cpus"] = w.threads or 1
        if self.spread:
            opts["scheduling_strategy"] = "SPREAD"
        w.generation += 1
        w.actor = self._cls.options(**opts).remote(self._files[self.models[wid]], str(w.device), w.threads)
        w.queue, w.ready, w.alive = [], False, True
        self._refs[w.actor.ready.remote()] = (wid, w.generation, "ready", -1)

    def restart(self, wid: int) -> None:
        w = self.workers[wid]
        w.restarts += 1
        try:
            self.ray.kill(w.actor, no_restart=True)
        except Exception:  # already gone
            pass
        self._launch(wid)

    def submit(self, wid: int, task: int, feeds: dict[str, np.ndarray]) -> None:
        w = self.workers[wid]
        w.queue.append(task)
        self._refs[w.actor.run.remote(feeds)] = (wid, w.generation, "run", task)

    def poll(self, timeout: float) -> list[Event]:
        ray = self.ray
        if not self._refs:
            time.sleep(min(timeout, 0.05))
            return []
        done, _ = ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        if done:
            more, _ = ray.wait(list(self._refs), num_returns=len(self._refs), timeout=0)
            done = list(dict.fromkeys(done + more))
        events: list[Event] = []
        for ref in done:
            entry = self._refs.pop(ref, None)
            if entry is None:
                continue  # dropped with its dead actor above
            wid, gen, kind, task = entry
            w = self.workers[wid]
            if gen != w.generation:
                continue  # a call on an actor already replaced
            try:
                value = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as exc:
                events.append(self._died(wid, kind, exc))
                continue
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                message = getattr(cause, "message", None) or str(cause).strip().splitlines()[-1]
                if kind == "ready":
                    w.alive = False
                    events.append(Event("start_failed", wid, message=message))
                    continue
                w.queue.remove(task)
                events.append(Event("error", wid, task, message=message))
                continue
            if kind == "ready":
                w.ready, w.pid, w.info = True, value["pid"], value
                events.append(Event("ready", wid, info=value))
            else:
                w.queue.remove(task)
                outputs, seconds = value
                events.append(Event("done", wid, task, outputs, seconds))
        return events

    def _died(self, wid: int, kind: str, exc: Exception) -> Event:
        w = self.workers[wid]
        lost = list(w.queue)
        w.queue, w.ready, w.alive = [], False, False
        for ref in [r for r, v in self._refs.items() if v[0] == wid and v[1] == w.generation]:
            del self._refs[ref]
        if kind == "ready":
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            why = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else type(exc).__name__)
            return Event("start_failed", wid, message=f"the actor died while starting: {why}")
        return Event("died", wid, lost[0] if lost else -1, message=f"actor died ({type(exc).__name__})",
                     info={"lost": lost})

    def close(self) -> None:
        for w in self.workers:
            if w.actor is not None:
                try:
                    self.ray.kill(w.actor, no_restart=True)
                except Exception:  # already gone
                    pass
                w.actor, w.alive, w.ready = None, False, False
        self._refs.clear()
        if self._started_ray:
            self.ray.shutdown()
            self._started_ray = False
