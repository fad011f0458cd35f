"""How the cores go to CPU workers: the one rule the batch runner and the server size them by.

:func:`cpu_share` splits the cores evenly over workers that set no threads of their own (the
batch runner, split-model stages, several listed ``cpu:N`` devices).

:func:`choose_layout` sizes the pool of ONE ``cpu`` device the server was given without threads:
either one wide worker (all the cores as intra-op threads) or one single-thread worker per core.
Which serves more depends on the model: a batched MatMul-heavy model keeps wide GEMMs busy on every
core at once, while a small model at a batch of a few samples leaves intra-op threads waiting on
each other and does better as independent workers. So it is measured when it is cheap: the model at
the largest batch on both layouts, in this process (one ONNX Runtime session per worker, threads
running them at once: ORT releases the GIL), rounds interleaved with the order reversed each round,
the median samples/s per layout. A worker of several threads does not spin them (ORT's
``allow_spinning``) unless the device says ``spinning=true``: its threads spinning between runs take
the cores the server's own process decodes requests on (benchmarks/serve.py measured a wide worker on
2 cores at about half the requests/s with spinning, on a par with the pool without). The pool wins only when it is at least ``MARGIN`` faster (a pool
costs a process and a copy of the weights per worker). A model too slow to measure in the budget, or
too big to hold once per core in memory, gets one wide worker (the rule). The user forces a layout
with ``threads`` and/or ``workers``; workers x threads never exceeds the cores.

Example:
    >>> cpu_share(3, cores=8, reserve=1)
    2
    >>> choose_layout("m.onnx", {}, budget=1, cores=2).label
    '1 worker x 1 thread'
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxpipe.core.errors import InputError
from onnxpipe.core.hardware import cpu

__all__ = ["MARGIN", "CpuLayout", "choose_layout", "cpu_share", "measure_layouts", "probe_feeds", "worker_options"]

MARGIN = 1.10  # how much faster a pool of workers must be than one wide worker to be chosen
MEASURE_BUDGET_S = 1.5  # the whole measurement, all layouts and rounds
MEMORY_SHARE = 0.5  # a pool may hold the weights once per worker in at most this share of free memory

Measure = Callable[[str, Mapping[str, np.ndarray], list[tuple[int, int]]], "dict[tuple[int, int], float] | None"]


def cpu_share(workers: int, *, cores: int | None = None, reserve: int = 0) -> int:
    """Intra-op threads for each of ``workers`` CPU workers: the cores (less ``reserve``) split evenly, at least 1."""
    cores = cpu().cores if cores is None else cores
    return max(1, (cores - reserve) // max(1, workers))


@dataclass(frozen=True)
class CpuLayout:
    """A CPU worker pool: ``workers`` processes of ``threads`` intra-op threads each.

    ``chosen_by`` is ``user`` (forced), ``measured`` (``rates`` holds samples/s per layout) or ``rule``
    (``reason`` says which).
    """

    workers: int
    threads: int
    chosen_by: str
    reason: str = ""
    rates: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return (f"{self.workers} worker{'s' if self.workers > 1 else ''} x "
                f"{self.threads} thread{'s' if self.threads > 1 else ''}")

    def describe(self) -> str:
        """``2 workers x 1 thread (measured: 1 x 2: 410/s, 2 x 1: 620/s)``: the server's startup line."""
        if self.chosen_by == "measured":
            why = ", ".join(f"{k}: {v:.0f} samples/s" for k, v in self.rates.items())
        else:
            why = self.reason
        return f"{self.label} ({self.chosen_by}{': ' + why if why else ''})"

    def devices(self, base: Any) -> list[Any]:
        """``base`` (a cpu :class:`~onnxpipe.runtimes.providers.Device`) once per worker, with the threads set."""
        from onnxpipe.runtimes.providers import Device

        opts = worker_options(base.options.model_dump(exclude_unset=True), self.threads)
        return [Device.parse(f"cpu:{k}", **opts) for k in range(self.workers)]

    def as_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "threads": self.threads, "chosen_by": self.chosen_by,
                "reason": self.reason, "samples_per_s": dict(self.rates)}


def worker_options(options: Mapping[str, Any], threads: int) -> dict[str, Any]:
    """A serving worker's cpu options: ``options`` with ``threads`` set, and no spinning threads when it
    has several and ``options`` leave spinning unsaid (see the module)."""
    out = {**options, "threads": threads}
    if threads > 1:
        out.setdefault("spinning", False)
    return out


def _key(layout: tuple[int, int]) -> str:
    return f"{layout[0]} x {layout[1]}"


def choose_layout(model: str | os.PathLike, feeds: Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]], *, budget: int,
                  workers: int | None = None, threads: int | None = None, cores: int | None = None,
                  measure: Measure | None = None, free_memory: int | None = None) -> CpuLayout:
    """The pool for one CPU device: forced by ``workers``/``threads``, else measured (see the module).

    Args:
        model: the ``.onnx`` the workers load.
        feeds: one batch at the largest batch size (what the measurement runs), or a function making it.
        budget: cores the workers may use (the server keeps one for its event loop).
        workers, threads: what the user forced (None: free).
        cores: the machine's cores (the bound on workers x threads; default: :func:`cpu`).
        measure: replaces :func:`measure_layouts` (tests).
        free_memory: bytes available (default: read from the system; None when unknown).

    Raises:
        InputError: ``workers`` x ``threads`` over the cores.
    """
    cores = cpu().cores if cores is None else cores
    budget = max(1, min(budget, cores))
    if workers is not None or threads is not None:
        w = workers or 1
        t = threads or max(1, budget // w)
        if w * t > cores:
            raise InputError(f"{w} CPU workers x {t} thread{'s' if t > 1 else ''} is {w * t} threads on {cores} cores",
                             hint=f"keep workers x threads <= {cores} (e.g. --workers {max(1, cores // t)})")
        forced = ([f"--workers {workers}"] if workers is not None else []) + ([f"threads={threads}"] if threads else [])
        return CpuLayout(w, t, "user", ", ".join(forced))
    if budget == 1:
        return CpuLayout(1, 1, "rule", "one core for the workers")
    wide, pool = (1, budget), (budget, 1)
    size = _model_bytes(model)
    free_memory = _free_memory() if free_memory is None else free_memory
    if free_memory and size * budget > MEMORY_SHARE * free_memory:
        return CpuLayout(*wide, "rule", f"{budget} copies of {size >> 20} MiB of weights would not fit in memory")
    rates = (measure or measure_layouts)(str(model), feeds() if callable(feeds) else feeds, [wide, pool])
    if not rates:
        return CpuLayout(*wide, "rule", "too slow to measure at load time")
    named = {_key(k): v for k, v in rates.items()}
    if rates[pool] >= MARGIN * rates[wide]:
        return CpuLayout(*pool, "measured", rates=named)
    return CpuLayout(*wide, "measured", rates=named)


def _model_bytes(model: str | os.PathLike) -> int:
    """The model file and the external data files beside it (an upper bound on a worker's weights)."""
    path = os.fspath(model)
    try:
        size = os.path.getsize(path)
        folder = os.path.dirname(path) or "."
        stem = os.path.basename(path)
        for name in os.listdir(folder):  # onnx's external data: model.onnx.data, model.onnx_data, *.bin
            if name != stem and name.startswith(stem) and os.path.isfile(os.path.join(folder, name)):
                size += os.path.getsize(os.path.join(folder, name))
        return size
    except OSError:
        return 0


def _free_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def probe_feeds(model: str | os.PathLike, batch: int) -> dict[str, np.ndarray]:
    """Random inputs for ``model`` at ``batch`` samples (the measurement's batch)."""
    from onnxpipe.core.inputs import generated_feeds
    from onnxpipe.core.modelio import load_model

    proto = load_model(model, load_external_data=False)
    return generated_feeds(proto, batch, np.random.default_rng(0))


def measure_layouts(model: str, feeds: Mapping[str, np.ndarray], layouts: list[tuple[int, int]], *,
                    budget_s: float = MEASURE_BUDGET_S, rounds: int = 3) -> dict[tuple[int, int], float] | None:
    """Samples/s of ``feeds`` on each ``(workers, threads)`` layout: the median of interleaved rounds.

    Each worker is an ONNX Runtime session of ``threads`` intra-op threads (the options the serving
    workers get); one timed call runs every worker's session once, all at once, from a thread each
    (ORT releases the GIL), so ``workers x batch`` samples per call. The rounds alternate through
    :func:`onnxpipe.core.timing.interleaved_ms`, the one alternating-rounds loop. None when one
    warm-up run takes over a tenth of the budget (the caller falls back to its rule).
    """
    from concurrent.futures import ThreadPoolExecutor

    from onnxpipe.core.timing import interleaved_ms
    from onnxpipe.runtimes.providers import Device

    ort = __import__("onnxruntime")
    batch = max((len(v) for v in feeds.values() if getattr(v, "ndim", 0)), default=1)
    feed = dict(feeds)
    sessions: list[list[Any]] = []
    for w, t in layouts:
        opts = Device.parse("cpu", **worker_options({}, t)).session_options()
        opts.log_severity_level = 4
        sessions.append([ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]) for _ in range(w)])
    for group in sessions:  # the cost of one run decides whether measuring fits the budget
        start = time.perf_counter()
        group[0].run(None, feed)
        if time.perf_counter() - start > budget_s / 10:
            return None
    with ThreadPoolExecutor(max(w for w, _ in layouts)) as runner:
        def call(group: list[Any]) -> Callable[[], None]:
            def run_all() -> None:
                for f in [runner.submit(s.run, None, feed) for s in group]:
                    f.result()
            return run_all

        per_call = budget_s / max(1, rounds * len(layouts))
        ms = interleaved_ms([call(g) for g in sessions], rounds=rounds, budget_s=per_call, min_runs=2,
                            deadline=time.perf_counter() + budget_s)
    return {lay: len(g) * batch * 1e3 / max(statistics.median(m), 1e-9) for lay, g, m in zip(layouts, sessions, ms)}
