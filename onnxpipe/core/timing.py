"""The one timing loop: warm-up runs, then timed runs until a count and a time budget are both met."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping

import numpy as np
import onnx

from onnxpipe.core.session import Session


def latency_ms(model: onnx.ModelProto | str | os.PathLike, feeds: Mapping[str, np.ndarray], *,
               warmup: int = 3, min_repeat: int = 10, budget_s: float = 1.0, threads: int | None = None) -> dict:
    """Median, p90 and min latency in milliseconds of one ``run`` on ``feeds``.

    Example:
        >>> latency_ms("model.onnx", {"x": x})["median_ms"]  # doctest: +SKIP
        0.41
    """
    with Session(model, threads=threads) as s:
        checked = s.check_feeds(feeds)
        for _ in range(warmup):
            s.session.run(None, checked)
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < min_repeat or time.perf_counter() < deadline:
            start = time.perf_counter()
            s.session.run(None, checked)
            times.append((time.perf_counter() - start) * 1e3)
            if len(times) >= 10_000:
                break
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))],
            "min_ms": times[0], "runs": len(times)}
