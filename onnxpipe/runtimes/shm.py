"""Move dicts of numpy arrays between processes through reusable shared-memory blocks, not pickles.

The dispatcher owns every block (it creates, grows and unlinks them), so a worker killed
mid-batch leaks nothing; workers only attach. A message then carries a :class:`Layout`
(names, dtypes, shapes, offsets): a few hundred bytes whatever the arrays' size. Arrays that
cannot live in shared memory (object dtype) travel pickled instead.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

ALIGN = 64  # cache line: keeps every array aligned for SIMD loads
PREFIX = "onnxpipe_"  # /dev/shm/onnxpipe_<pid>_<random>: whose a segment is, should one ever outlive us


def _create(size: int) -> shared_memory.SharedMemory:
    for _ in range(8):
        try:  # under 31 characters: macOS's limit on a name
            return shared_memory.SharedMemory(name=f"{PREFIX}{os.getpid()}_{secrets.token_hex(4)}", create=True, size=size)
        except FileExistsError:
            continue
    return shared_memory.SharedMemory(create=True, size=size)


def owned_segments(pid: int | None = None) -> set[str]:
    """Names of the shared-memory segments process ``pid`` (default: this one) created and has not freed."""
    mark = f"{PREFIX}{os.getpid() if pid is None else pid}_"
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(mark)}
    except FileNotFoundError:  # no /dev/shm (macOS, Windows): nothing to list
        return set()


@dataclass(frozen=True)
class Layout:
    """Where each array sits in a block: ``(name, dtype str, shape, offset)`` entries.

    Example:
        >>> layout_of({"x": np.zeros((2, 3), np.float32)}).nbytes
        24
    """

    entries: tuple[tuple[str, str, tuple[int, ...], int], ...]
    nbytes: int


def sharable(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether every array has a fixed-size dtype (object and string arrays do not)."""
    return all(not a.dtype.hasobject for a in arrays.values())


def layout_of(arrays: Mapping[str, np.ndarray]) -> Layout:
    """The layout ``arrays`` take in a block, each aligned to 64 bytes."""
    entries, offset = [], 0
    for name, arr in arrays.items():
        offset = -(-offset // ALIGN) * ALIGN
        entries.append((name, arr.dtype.str, tuple(arr.shape), offset))
        offset += arr.nbytes
    return Layout(tuple(entries), offset)


def views(buf: memoryview, layout: Layout) -> dict[str, np.ndarray]:
    """Arrays over ``buf`` (no copy); drop them before the block is closed."""
    return {name: np.ndarray(shape, dtype=np.dtype(dt), buffer=buf, offset=off)
            for name, dt, shape, off in layout.entries}


def write(buf: memoryview, arrays: Mapping[str, np.ndarray], layout: Layout) -> None:
    """Copy ``arrays`` into ``buf`` at ``layout``'s offsets."""
    for (name, _dt, _shape, _off), dst in zip(layout.entries, views(buf, layout).values()):
        dst[...] = arrays[name]


def read(buf: memoryview, layout: Layout) -> dict[str, np.ndarray]:
    """Copies of the arrays at ``layout`` (safe to keep after the block is reused)."""
    return {name: v.copy() for name, v in views(buf, layout).items()}


class Block:
    """A shared-memory block owned by this process, grown on demand (a new name each time).

    Example:
        >>> b = Block(1024)
        >>> lay = b.put({"x": np.arange(4.0)})
        >>> read(b.buf, lay)["x"].tolist()
        [0.0, 1.0, 2.0, 3.0]
        >>> b.close()
    """

    def __init__(self, capacity: int) -> None:
        self.shm = _create(max(int(capacity), ALIGN))

    @property
    def name(self) -> str:
        return self.shm.name

    @property
    def capacity(self) -> int:
        return self.shm.size

    @property
    def buf(self) -> memoryview:
        return self.shm.buf

    def ensure(self, nbytes: int) -> None:
        """Replace the block by a bigger one (25% headroom) when ``nbytes`` does not fit."""
        if nbytes > self.capacity:
            self.close()
            self.shm = _create(int(nbytes * 1.25) + ALIGN)

    def put(self, arrays: Mapping[str, np.ndarray]) -> Layout:
        """Write ``arrays`` (growing if needed) and return their layout."""
        layout = layout_of(arrays)
        self.ensure(layout.nbytes)
        write(self.shm.buf, arrays, layout)
        return layout

    def close(self) -> None:
        try:
            self.shm.close()
        finally:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


class Attached:
    """A worker's attachments to the dispatcher's blocks, by name (reattached when a block grows)."""

    def __init__(self) -> None:
        self._open: dict[str, shared_memory.SharedMemory] = {}

    def buf(self, name: str, slot: str) -> memoryview:
        """The buffer of block ``name``, used for ``slot`` (a slot's previous block is let go)."""
        key = f"{slot}:{name}"
        shm = self._open.get(key)
        if shm is None:
            for old in [k for k in self._open if k.startswith(f"{slot}:")]:
                self._open.pop(old).close()
            # Python < 3.13 registers attachments with the resource tracker; the spawned worker shares
            # the dispatcher's tracker, where the name is already known, and never unlinks it.
            shm = shared_memory.SharedMemory(name=name)
            self._open[key] = shm
        return shm.buf

    def close(self) -> None:
        for shm in self._open.values():
            shm.close()
        self._open.clear()
