"""Local worker processes, one per device, fed through pipes with arrays in shared memory.

Each worker (``spawn`` context: no inherited locks, threads or CUDA state) opens its own
:class:`DeviceSession`, says ``ready``, then runs micro-batches. A batch's inputs sit in a
shared-memory block of the dispatcher's; the worker reads them in place, runs, and writes the
outputs into a second block (or sends them pickled when they do not fit; the dispatcher then
grows that block). Every worker has ``depth`` such slots, so its next batch waits beside it
while it runs one. The batch it is running is written into a shared integer, so when a worker
dies the dispatcher knows which batch was on it and which were only queued.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from onnxpipe.runtimes import shm
from onnxpipe.runtimes.providers import Device

OUT_BLOCK = 1 << 20  # first output block; grown to what a batch needs


@dataclass
class Event:
    """What the pool saw: ``ready``, ``done``, ``error`` or ``died`` for worker ``wid``."""

    kind: str
    wid: int
    task: int = -1
    outputs: dict[str, np.ndarray] | None = None
    seconds: float = 0.0
    message: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def _main(conn: Connection, model: str, device: str, threads: int | None, cores: list[int] | None,
          device_id: int | None, current: Any) -> None:
    """Worker process: open the session, then serve ``run`` messages until ``stop`` or EOF."""
    from onnxpipe.core.errors import OnnxpipeError
    from onnxpipe.core.userfiles import first_line
    from onnxpipe.runtimes.device_session import DeviceSession

    # Ctrl-C reaches the whole process group: the dispatcher handles it and stops the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    start = time.perf_counter()
    try:
        session = DeviceSession(model, device, threads=threads, device_id=device_id)
    except Exception as exc:  # reported to the dispatcher, which names the device
        conn.send(("start_failed", str(exc) if isinstance(exc, OnnxpipeError) else first_line(exc)))
        return
    placement = session.placement.as_dict() if session.placement else None
    conn.send(("ready", os.getpid(), time.perf_counter() - start, placement))
    blocks = shm.Attached()
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg[0] == "stop":
                break
            current[0] = msg[1]
            reply = _run_one(session, blocks, msg)
            current[0] = -1
            if session.placement is not None and placement is None:  # profiled on the first run
                placement = session.placement.as_dict()
                conn.send(("placement", placement))
            conn.send(reply)
    finally:
        blocks.close()
        session.close()


def _run_one(session: Any, blocks: shm.Attached, msg: tuple) -> tuple:
    """One ``run`` message -> its ``done`` or ``error`` reply. Every view of a shared block dies
    with this frame, so a block the dispatcher replaces can be let go."""
    from onnxpipe.core.errors import OnnxpipeError
    from onnxpipe.core.userfiles import first_line

    _, task, slot, in_name, in_layout, feeds, out_name = msg
    t0 = time.perf_counter()
    try:
        outputs = session.run(shm.views(blocks.buf(in_name, f"in{slot}"), in_layout) if in_name is not None else feeds)
    except Exception as exc:  # the model failed on this batch: the dispatcher decides what to retry
        return ("error", task, exc.message if isinstance(exc, OnnxpipeError) else first_line(exc))
    seconds = time.perf_counter() - t0
    layout = shm.layout_of(outputs) if shm.sharable(outputs) else None
    buf = blocks.buf(out_name, f"out{slot}")
    if layout is not None and layout.nbytes <= len(buf):
        shm.write(buf, outputs, layout)
        return ("done", task, layout, None, seconds)
    return ("done", task, None, {k: np.array(v) for k, v in outputs.items()}, seconds)


@dataclass
class _Slot:
    inp: shm.Block
    out: shm.Block
    task: int = -1


@dataclass
class _Worker:
    device: Device
    threads: int | None
    cores: list[int] | None
    proc: Any = None
    conn: Connection | None = None
    current: Any = None
    slots: list[_Slot] = field(default_factory=list)
    ready: bool = False
    alive: bool = False
    pid: int | None = None
    restarts: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def free(self) -> int:
        return sum(1 for s in self.slots if s.task < 0) if self.ready else 0

    def inflight(self) -> list[int]:
        return [s.task for s in self.slots if s.task >= 0]


class LocalPool:
    """One process per device on this machine.

    Args:
        model: path of the ``.onnx`` file every worker loads, or one path per worker (pipeline stages).
        devices: one worker per device.
        threads: intra-op threads per worker (None: the device's own or ORT's choice).
        cores: CPU ids to pin each worker to (None: no pinning).
        depth: batches a worker holds at once (one running, the rest queued beside it).

    Example:
        >>> pool = LocalPool("m.onnx", [Device.parse("cpu:0")], [1], [None])  # doctest: +SKIP
    """

    def __init__(self, model: str | list[str], devices: list[Device], threads: list[int | None],
                 cores: list[list[int] | None], *, depth: int = 2) -> None:
        self.model = model
        self.models = [model] * len(devices) if isinstance(model, str) else list(model)
        self.depth = depth
        self.ctx = mp.get_context("spawn")
        self.workers = [_Worker(d, t, c) for d, t, c in zip(devices, threads, cores)]
        # one poll object for the whole run: building a selector per wait costs more than the batch's
        # messages on small models (multiprocessing's wait() does that); Windows has no poll()
        self._poller = select.poll() if hasattr(select, "poll") else None
        self._fds: dict[int, tuple[int, str]] = {}

    def start(self) -> None:
        for wid in range(len(self.workers)):
            self._launch(wid)

    def _launch(self, wid: int) -> None:
        w = self.workers[wid]
        parent, child = self.ctx.Pipe(duplex=True)
        w.current = self.ctx.RawArray("q", 1)
        w.current[0] = -1
        w.proc = self.ctx.Process(target=_main, name=f"onnxpipe-{w.device.label}",
                                  args=(child, self.models[wid], str(w.device), w.threads, w.cores, None, w.current),
                                  daemon=True)
        w.proc.start()
        child.close()
        w.conn, w.ready, w.alive, w.pid = parent, False, True, w.proc.pid
        if self._poller is not None:
            for fd, kind in ((parent.fileno(), "conn"), (w.proc.sentinel, "exit")):
                self._poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
                self._fds[fd] = (wid, kind)
        if not w.slots:
            w.slots = [_Slot(shm.Block(OUT_BLOCK), shm.Block(OUT_BLOCK)) for _ in range(self.depth)]
        for s in w.slots:
            s.task = -1

    def restart(self, wid: int) -> None:
        """Start a fresh process for worker ``wid`` (its slots are reused)."""
        self.workers[wid].restarts += 1
        self._launch(wid)

    def submit(self, wid: int, task: int, feeds: dict[str, np.ndarray]) -> None:
        """Queue ``feeds`` on worker ``wid``; it must have a free slot."""
        w = self.workers[wid]
        index, slot = next((i, s) for i, s in enumerate(w.slots) if s.task < 0)
        slot.task = task
        if shm.sharable(feeds):
            layout = slot.inp.put(feeds)
            msg = ("run", task, index, slot.inp.name, layout, None, slot.out.name)
        else:
            msg = ("run", task, index, None, None, dict(feeds), slot.out.name)
        try:
            w.conn.send(msg)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the worker is dead; poll() reports it with this batch in flight

    def poll(self, timeout: float) -> list[Event]:
        """Wait up to ``timeout`` seconds for messages or deaths; return what happened."""
        if self._poller is None:
            return self._poll_wait(timeout)
        events: list[Event] = []
        ready = self._poller.poll(timeout * 1000)
        for _ in range(256):  # read what is waiting, but never spin forever
            if not ready:
                break
            dead = []
            for fd, _mask in ready:
                wid, kind = self._fds.get(fd, (-1, ""))
                if wid < 0 or not self.workers[wid].alive:
                    continue
                if kind == "exit":
                    dead.append(wid)
                    continue
                try:
                    events.append(self._message(wid, self.workers[wid].conn.recv()))
                except (EOFError, OSError):
                    dead.append(wid)
            for wid in dict.fromkeys(dead):
                if self.workers[wid].alive:
                    self._drain(wid, events)
                    events.append(self._died(wid))
            ready = self._poller.poll(0)
        return events

    def _poll_wait(self, timeout: float) -> list[Event]:
        live = [w for w in self.workers if w.alive]
        if not live:
            time.sleep(min(timeout, 0.05))
            return []
        objs: list[Any] = [w.conn for w in live] + [w.proc.sentinel for w in live]
        ready = set(map(id, wait(objs, timeout)))
        events: list[Event] = []
        for wid, w in enumerate(self.workers):
            if not w.alive:
                continue
            dead = id(w.proc.sentinel) in ready
            if id(w.conn) in ready or dead:
                dead = self._drain(wid, events) or dead
            if dead:
                events.append(self._died(wid))
        return events

    def _forget(self, wid: int) -> None:
        """Stop watching worker ``wid``'s pipe and exit sentinel."""
        for fd in [fd for fd, (i, _) in self._fds.items() if i == wid]:
            del self._fds[fd]
            if self._poller is not None:
                self._poller.unregister(fd)

    def _drain(self, wid: int, events: list[Event]) -> bool:
        """Read every message waiting from worker ``wid``; True when its pipe is closed."""
        w = self.workers[wid]
        try:
            while w.conn.poll():
                events.append(self._message(wid, w.conn.recv()))
        except (EOFError, OSError):
            return True
        return False

    def _message(self, wid: int, msg: tuple) -> Event:
        w = self.workers[wid]
        kind = msg[0]
        if kind == "ready":
            w.ready, w.pid = True, msg[1]
            w.info = {"pid": msg[1], "load_s": msg[2], "placement": msg[3]}
            return Event("ready", wid, info=w.info)
        if kind == "placement":
            w.info["placement"] = msg[1]
            return Event("placement", wid, info=w.info)
        if kind == "start_failed":
            w.alive = False
            self._forget(wid)
            w.proc.join(5)
            return Event("start_failed", wid, message=msg[1])
        slot = next(s for s in w.slots if s.task == msg[1])
        slot.task = -1
        if kind == "error":
            return Event("error", wid, msg[1], message=msg[2])
        _, task, layout, outputs, seconds = msg
        if layout is not None:
            outputs = shm.read(slot.out.buf, layout)
        else:
            slot.out.ensure(shm.layout_of(outputs).nbytes if shm.sharable(outputs) else 0)
        return Event("done", wid, task, outputs, seconds)

    def _died(self, wid: int) -> Event:
        w = self.workers[wid]
        w.alive, w.ready = False, False
        self._forget(wid)
        w.proc.join(5)
        running = int(w.current[0])
        lost = w.inflight()
        for s in w.slots:
            s.task = -1
        code = w.proc.exitcode
        why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return Event("died", wid, running if running in lost else -1, message=why, info={"lost": lost})

    def close(self, grace: float = 5.0) -> None:
        """Stop every worker (killed when still running ``grace`` seconds later) and free the shared memory."""
        for w in self.workers:
            if w.alive and w.conn is not None:
                try:
                    w.conn.send(("stop",))
                except (BrokenPipeError, OSError):
                    pass
        deadline = time.monotonic() + grace  # one grace period for all workers, not one each
        for wid, w in enumerate(self.workers):
            self._forget(wid)
            if w.proc is not None:
                w.proc.join(max(0.0, deadline - time.monotonic()))
                if w.proc.is_alive():
                    w.proc.kill()
                    w.proc.join(5)
            if w.conn is not None:
                w.conn.close()
            w.alive = w.ready = False
            for s in w.slots:
                s.inp.close()
                s.out.close()
            w.slots = []
