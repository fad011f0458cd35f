"""Model control of the server (Triton's ``--model-control-mode``): load, unload, poll the repository, index it.

:class:`ModelControl` is a part of :class:`onnxpipe.serve.server.InferenceServer`: it uses the server's
``models``, ``options``, ``source``, ``_open`` and the state the server sets up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from onnxpipe.core.errors import OnnxpipeError
from onnxpipe.runtimes.cpu_pool import CpuLayout
from onnxpipe.serve.batcher import Batcher
from onnxpipe.serve.protocol import ProtocolError
from onnxpipe.serve.repository import ModelEntry, scan
from onnxpipe.serve.staged import StagedPool
from onnxpipe.serve.workers import DevicePool

log = logging.getLogger("onnxpipe.serve")

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


class ModelControl:
    """Load, unload and poll the model repository (mixed into the server)."""

    async def _retire(self, m: _Model) -> None:
        """Stop a model nobody can reach any more, once the requests it holds are answered."""
        deadline = time.monotonic() + DRAIN_SECONDS
        while m.batcher.pending() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await m.batcher.stop()
        m.pool.close()


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
