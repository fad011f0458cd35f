"""Search the fastest session setup and batch size per device, measured side by side with the default.

Per device, within its share of the time budget:

1. open the default setup (the device as given), record its outputs on two input batches;
2. estimate the largest batch that fits memory; for ``throughput``, measure samples/s over
   doubling batches and take the knee (the smallest batch within 10% of the best);
3. walk the option dimensions of :mod:`onnxpipe.runtimes.tune_space` from the best setup so far:
   each candidate must give the default's outputs (else it is rejected), then is timed in
   alternating rounds against the incumbent and replaces it only when faster beyond the noise;
   clearly slower ones stop early;
4. time the winner against the default once more, side by side; unless it is faster beyond the
   noise, the default is kept and reported as such.

Example:
    >>> report = tune("model.onnx", ["cpu"], budget_s=30)  # doctest: +SKIP
    >>> report.to_file().entries[0].speedup  # doctest: +SKIP
    1.18
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx

from onnxpipe.core.errors import InputError
from onnxpipe.runtimes.providers import Device
from onnxpipe.runtimes.tune_search import (
    MIN_GAIN,
    ROUND_S,
    DeviceTuning,
    Opener,
    Trial,
    open_session,
    tune_device,
    tune_feeds,
)
from onnxpipe.runtimes.tune_space import ModelFacts
from onnxpipe.runtimes.tuned import TunedFile

__all__ = ["MIN_GAIN", "ROUND_S", "DeviceTuning", "Opener", "Trial", "TuneReport", "open_session", "tune", "tune_feeds"]


@dataclass
class TuneReport:
    """The tuning of every device, ready to become ``tuned.json``."""

    model: str
    objective: str
    budget_s: float
    elapsed_s: float
    devices: list[DeviceTuning]

    def to_file(self) -> TunedFile:
        from onnxpipe.core.hardware import cpu

        info = cpu()
        return TunedFile(model=self.model, objective=self.objective, budget_s=self.budget_s,  # type: ignore[arg-type]
                         elapsed_s=round(self.elapsed_s, 3),
                         machine={"cpu": info.model, "cores": info.cores, "simd": info.simd},
                         entries=[d.entry() for d in self.devices])


def tune(model: onnx.ModelProto | str | os.PathLike, devices: Sequence[Any], *,
         objective: Literal["latency", "throughput"] = "latency", batch_sizes: Sequence[int] | None = None,
         budget_s: float = 120.0, memory_cap: int | None = None, max_batch: int = 4096,
         dims: Mapping[str, int] | None = None, atol: float | None = None, rtol: float | None = None,
         cache_dir: str | os.PathLike | None = None, extra: Sequence[Any] = (), seed: int = 0,
         on_event: Callable[[str], None] | None = None, open_session: Opener = open_session,
         inputs: Mapping[str, np.ndarray] | None = None) -> TuneReport:
    """Tune every device in ``devices`` for ``model`` within ``budget_s`` seconds in all.

    Args:
        model: the model (path or proto).
        devices: device specs (``cpu``, ``cuda:0``, ``tensorrt:0``); options given on them are kept.
        objective: ``latency`` (batch: the smallest of ``batch_sizes``, else 1) or ``throughput``
            (batch: the knee of samples/s over ``batch_sizes``, else over doubling batches).
        batch_sizes: batch sizes to consider.
        budget_s: seconds for everything, split evenly over the devices.
        memory_cap: bytes a session may use (default: half the available RAM, 90% of a GPU's free memory).
        max_batch: never consider batches above this.
        dims: sizes of named symbolic dims other than the batch.
        atol, rtol: how close a candidate's outputs must be to the default's (float32 setups).
        cache_dir: TensorRT engine and timing caches (default: none).
        extra: more setups to try, before the search (specs or :class:`Device`).
        seed: of the generated inputs.
        on_event: called with a line of progress.
        inputs: a batch of real inputs, cut or repeated to each batch size (default: generated ones).
        open_session: how a setup's session is opened (:data:`~onnxpipe.runtimes.tune_search.Opener`).

    Example:
        >>> tune(conv_gemm_model(), ["cpu"], budget_s=3).devices[0].chosen  # doctest: +SKIP
        Device('cpu:0[threads=1,spinning=false]')
    """
    from onnxpipe.core.hardware import cpu
    from onnxpipe.core.modelio import load_model

    if objective not in ("latency", "throughput"):
        raise InputError(f"unknown objective {objective!r}", hint="use latency or throughput")
    if budget_s <= 0:
        raise InputError(f"the budget must be positive, received {budget_s}", hint="e.g. --budget-s 60")
    if batch_sizes is not None and (not batch_sizes or any(b < 1 for b in batch_sizes)):
        raise InputError(f"batch sizes must be >= 1, received {list(batch_sizes)}", hint="e.g. --batch-sizes 1,8,32")
    start = time.perf_counter()
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model, load_external_data=False)
    parsed = [Device.parse(d) for d in devices]
    if not parsed:
        raise InputError("no devices to tune", hint="give at least one, e.g. --devices cpu")
    for d in parsed:
        d.check_available()
    facts = ModelFacts.of(proto)
    notify = on_event or (lambda line: None)
    results = []
    for k, device in enumerate(parsed):
        share = (budget_s - (time.perf_counter() - start)) / (len(parsed) - k)
        extras = [Device.parse(e) for e in extra]
        results.append(tune_device(proto, device, facts, objective=objective, batch_sizes=batch_sizes,
                                   budget_s=max(share, 0.0), memory_cap=memory_cap, max_batch=max_batch, dims=dims or {},
                                   atol=atol, rtol=rtol, cache_dir=cache_dir, cores=cpu().cores,
                                   extra=[e for e in extras if e.label == device.label], seed=seed, notify=notify,
                                   opener=open_session, inputs=inputs))
    name = str(model) if not isinstance(model, onnx.ModelProto) else (proto.graph.name or "model")
    return TuneReport(name, objective, budget_s, time.perf_counter() - start, results)
