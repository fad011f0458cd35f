"""The one timing loop: every latency onnxpipe reports (``bench``, the pipeline report's latency
column, ``tune``'s duels, the benchmarks) is measured here, the same way.

Definition: a *run* is one call of the session's ``run(feeds)`` (feeds checked once beforehand;
what a caller of :class:`~onnxpipe.core.session.Session` or a device session waits for). After
``warmup`` untimed runs, runs are timed with ``time.perf_counter`` until at least ``min_runs``
were timed and ``budget_s`` seconds have passed (at most ``max_runs``). Percentiles interpolate
linearly between samples (numpy's default), so ``p50_ms`` is the median.

Example:
    >>> t = time_calls(lambda: None, warmup=0, min_runs=5, budget_s=0)
    >>> t.runs, t.p50_ms <= t.p90_ms <= t.p99_ms
    (5, True)
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxpipe.core.session import Session

MAX_RUNS = 10_000


@dataclass
class Timing:
    """The timed runs of one measurement, in milliseconds, sorted."""

    times_ms: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.times_ms), q)) if self.times_ms else 0.0

    @property
    def runs(self) -> int:
        return len(self.times_ms)

    @property
    def p50_ms(self) -> float:
        return self.percentile(50)

    median_ms = p50_ms

    @property
    def p90_ms(self) -> float:
        return self.percentile(90)

    @property
    def p99_ms(self) -> float:
        return self.percentile(99)

    @property
    def min_ms(self) -> float:
        return self.times_ms[0] if self.times_ms else 0.0

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms) if self.times_ms else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"median_ms": self.p50_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms, "min_ms": self.min_ms,
                "mean_ms": self.mean_ms, "runs": self.runs}


def time_calls(call: Callable[[], Any], *, warmup: int = 3, min_runs: int = 10, budget_s: float = 1.0,
               max_runs: int = MAX_RUNS) -> Timing:
    """Time ``call()``: ``warmup`` untimed calls, then timed ones until ``min_runs`` and ``budget_s``
    are both reached (never more than ``max_runs``)."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < max_runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return Timing(times)


def interleaved_ms(calls: Sequence[Callable[[], Any]], *, rounds: int = 5, budget_s: float = 0.05,
                   min_runs: int = 3, deadline: float | None = None,
                   stop: Callable[[list[list[float]]], bool] | None = None) -> list[list[float]]:
    """Per-round median ms of every call, timed in alternating rounds (ABC CBA ABC ...).

    Timing two models minutes apart on a shared machine compares the load, not the models: here
    every round times each call once with :func:`time_calls` (``budget_s`` each, one untimed call
    after each switch so the previous session's spinning threads are not billed), and the order
    reverses every round so drift favours none. Stops after ``rounds``, at ``deadline``
    (``time.perf_counter()`` seconds) once two rounds are done, or when ``stop(rounds so far)``
    says the answer is already clear (e.g. a candidate far slower than the reference).

    Example:
        >>> a, b = interleaved_ms([lambda: None, lambda: None], rounds=3, budget_s=0.0)
        >>> len(a), len(b)
        (3, 3)
    """
    out: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    for k in range(rounds):
        if k >= 2 and deadline is not None and time.perf_counter() >= deadline:
            break
        for i in (order if k % 2 == 0 else order[::-1]):
            out[i].append(time_calls(calls[i], warmup=1, min_runs=min_runs, budget_s=budget_s).median_ms)
        if stop is not None and stop(out):
            break
    return out


def ratio_noise(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """Median of the per-round ratios after/before and the standard error of that median.

    The error comes from the rounds' spread, robustly: 1.4826 x MAD estimates the standard
    deviation, x 1.2533 turns a mean's standard error into a median's, / sqrt(rounds).

    Example:
        >>> ratio_noise([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
        (2.0, 0.0)
    """
    r = [b / a if a > 0 else float("inf") for a, b in zip(before, after)]
    if not r:
        return float("nan"), float("inf")
    med = statistics.median(r)
    if len(r) < 2:
        return med, float("inf")
    mad = statistics.median(abs(x - med) for x in r)
    return med, 1.4826 * mad * 1.2533 / len(r) ** 0.5


def time_session(session: Any, feeds: Mapping[str, np.ndarray], **loop: Any) -> Timing:
    """Time ``session.run`` on ``feeds`` (checked once first) with :func:`time_calls`; ``session`` is
    a :class:`Session` or any session with its ``check_feeds`` / ``run`` (a device session)."""
    checked = session.check_feeds(feeds)
    return time_calls(lambda: session.run(checked), **loop)


def interleaved(sessions: Mapping[str, Any], feeds: Mapping[str, np.ndarray], *, rounds: int = 5,
                budget_s: float = 1.0) -> dict[str, list[float]]:
    """Per label, the median ms of each round of :func:`interleaved_ms`, for sessions sharing ``feeds``.

    The budget is shared by all rounds and sessions.

    Example:
        >>> ms = interleaved({"before": s0, "after": s1}, feeds)  # doctest: +SKIP
        >>> ratio_noise(ms["before"], ms["after"])  # doctest: +SKIP
    """
    order = list(sessions)
    checked = {k: sessions[k].check_feeds(feeds) for k in order}
    per_call = budget_s / max(rounds, 1) / max(len(order), 1)
    runs = interleaved_ms([lambda k=k: sessions[k].run(checked[k]) for k in order], rounds=rounds, budget_s=per_call)
    return dict(zip(order, runs))


def latency_ms(model: onnx.ModelProto | str | os.PathLike, feeds: Mapping[str, np.ndarray], *,
               warmup: int = 3, min_repeat: int = 10, budget_s: float = 1.0, threads: int | None = None) -> dict:
    """Median, p90, p99, mean and min latency in milliseconds of one run on ``feeds`` (CPU session).

    Example:
        >>> latency_ms("model.onnx", {"x": x})["median_ms"]  # doctest: +SKIP
        0.41
    """
    with Session(model, threads=threads) as s:
        return time_session(s, feeds, warmup=warmup, min_runs=min_repeat, budget_s=budget_s).as_dict()
