"""Micro-batches for the batch runner: the :class:`Plan` a runner hands the dispatcher, the
:class:`Task` and :class:`Job` state it owns, and how a source is cut into tasks (never across a
shard, padded to a fixed batch, the first chunk checked against the model's inputs)."""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxpipe.core.errors import InputError
from onnxpipe.core.sources import Chunk, Source, check_chunk
from onnxpipe.core.tensors import TensorInfo
from onnxpipe.runtimes.batch_result import BatchEvent


@dataclass(frozen=True)
class Plan:
    """What the dispatcher needs to know of a runner: its devices, how to cut and how to retry.

    Args:
        devices: one per worker, in pool order (their ``label`` names them in events and errors).
        inputs: the model's graph inputs (the first chunk is checked against them).
        batch_size: samples per micro-batch.
        shard_size: samples per output shard; a micro-batch never crosses a shard.
        fixed_batch: the model's fixed batch dim, if any (short micro-batches are padded to it).
        no_axis: outputs without a sample axis (kept per micro-batch, never sliced).
        depth: micro-batches a worker holds at once.
        max_attempts: tries per sample before it is reported failed.
        max_restarts: restarts per worker before its device is given up.
        on_batch: called after every finished micro-batch.
    """

    devices: Sequence[Any]
    inputs: Sequence[TensorInfo]
    batch_size: int
    shard_size: int
    fixed_batch: int | None = None
    no_axis: frozenset[str] = frozenset()
    depth: int = 2
    max_attempts: int = 2
    max_restarts: int = 3
    on_batch: Callable[[BatchEvent], None] | None = None


@dataclass
class Task:
    """A micro-batch: samples ``[start, start + count)``; ``rows`` >= count when padded to a fixed batch."""

    id: int
    start: int
    count: int
    batched: dict[str, np.ndarray]
    constant: dict[str, np.ndarray]
    rows: int
    attempts: int = 0
    avoid: int | None = None

    def feeds(self) -> dict[str, np.ndarray]:
        return {**self.constant, **self.batched}


@dataclass
class Job:
    """The dispatcher's bookkeeping for one run (owned by its :class:`Dispatcher`)."""

    skip: set[int]
    dispatched: Counter = field(default_factory=Counter)  # samples cut per shard
    resolved: Counter = field(default_factory=Counter)    # samples done or failed per shard
    results: dict[int, list[tuple[int, int, int, dict[str, np.ndarray]]]] = field(default_factory=dict)
    failed: dict[int, dict[int, str]] = field(default_factory=dict)
    pending: deque = field(default_factory=deque)
    inflight: dict[int, tuple[Task, int]] = field(default_factory=dict)
    stream_shard: int = 0
    exhausted: bool = False
    next_shard: int = 0
    cut: int = 0          # samples read from the input
    emitted: int = 0      # samples up to which shards were emitted (or skipped)
    succeeded: int = 0
    skipped: int = 0


def cut_tasks(source: Source, plan: Plan, job: Job) -> Iterator[Task]:
    """Micro-batches cut from the source, never across a shard; finished shards are read past."""
    ids = itertools.count(job.cut)
    pos, checked = 0, False
    buf: list[Chunk] = []
    have = 0

    def cut(n: int) -> Chunk:
        nonlocal have
        pieces, need = [], n
        while need:
            c = buf[0]
            take = min(need, c.rows)
            pieces.append({k: v[:take] for k, v in c.batched.items()})
            if take == c.rows:
                buf.pop(0)
            else:
                buf[0] = Chunk({k: v[take:] for k, v in c.batched.items()}, c.constant)
            need -= take
        have -= n
        batched = pieces[0] if len(pieces) == 1 else {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
        return Chunk(batched, constant)

    constant: dict[str, np.ndarray] = {}
    chunks = source.chunks()
    while True:
        chunk = next(chunks, None)
        if chunk is not None and not checked:
            try:
                check_chunk(chunk, list(plan.inputs))
            except InputError as exc:  # say which data does not fit
                raise InputError(f"{source.description}: {exc.message}", hint=exc.hint) from None
            checked = True
        if chunk is not None and buf and not _same(chunk.constant, constant):
            flush = have  # inputs shared by a batch changed: no batch may mix the two
        else:
            flush = 0
        while have and (have >= _room(plan, pos) or flush or chunk is None):
            n = min(have, _room(plan, pos))
            piece = cut(n)
            flush = max(0, flush - n)
            shard = pos // plan.shard_size
            job.stream_shard = shard
            if shard in job.skip:
                job.skipped += n
            else:
                job.dispatched[shard] += n
                yield make_task(plan, next(ids), pos, piece)
            pos += n
            job.cut = pos
        if chunk is None:
            return
        if chunk.rows:
            constant = chunk.constant
            buf.append(chunk)
            have += chunk.rows


def _room(plan: Plan, pos: int) -> int:
    return min(plan.batch_size, plan.shard_size - pos % plan.shard_size)


def make_task(plan: Plan, tid: int, start: int, piece: Chunk, attempts: int = 0) -> Task:
    """A micro-batch of ``piece`` starting at sample ``start``, padded to a fixed batch with its last sample."""
    count = piece.rows
    batched = piece.batched
    if plan.fixed_batch is not None and count < plan.fixed_batch:  # pad with the last sample
        pad = plan.fixed_batch - count
        batched = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in batched.items()}
    return Task(tid, start, count, batched, piece.constant, count if plan.fixed_batch is None else plan.fixed_batch,
                attempts)


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] or np.array_equal(a[k], b[k]) for k in a)
