"""Honest timing for tuning: interleaved A/B rounds, their noise, batch curves and memory estimates.

Two setups are never timed minutes apart on a shared machine: :func:`duel` alternates rounds of
A and B (ABBAAB...), so drift from other processes hits both, and judges B by the per-round
ratios: their median, their spread (the noise), and how many rounds B won.

Example:
    >>> import time
    >>> d = duel(lambda: time.sleep(0.002), lambda: time.sleep(0.001), runs=2, min_rounds=5, max_rounds=5)
    >>> d.faster(0.05)
    True
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpipe.core.modelio import tensor_bytes
from onnxpipe.core.tensors import onnx_elem_to_numpy
from onnxpipe.core.timing import ratio_noise, time_calls
from onnxpipe.runtimes.providers import Device


def median_ms(fn: Callable[[], object], runs: int) -> float:
    """Median milliseconds of ``runs`` calls of ``fn``.

    Example:
        >>> median_ms(lambda: None, 3) >= 0
        True
    """
    n = max(1, runs)
    return time_calls(fn, warmup=0, min_runs=n, budget_s=0, max_runs=n).median_ms


@dataclass
class Duel:
    """Per-round medians of A and B and B/A ratios; why it stopped early, if it did."""

    a_ms: list[float] = field(default_factory=list)
    b_ms: list[float] = field(default_factory=list)
    stopped: str | None = None

    @property
    def ratios(self) -> list[float]:
        return [b / a if a > 0 else float("inf") for a, b in zip(self.a_ms, self.b_ms)]

    @property
    def ratio(self) -> float:
        """Median of B/A per round: below 1 means B is faster."""
        return statistics.median(self.ratios) if self.a_ms else float("nan")

    @property
    def noise(self) -> float:
        """Standard error of that median ratio, from the rounds' spread (robust: 1.4826 MAD)."""
        return ratio_noise(self.a_ms, self.b_ms)[1]

    @property
    def wins(self) -> float:
        """Share of rounds in which B was faster."""
        r = self.ratios
        return sum(x < 1 for x in r) / len(r) if r else 0.0

    @property
    def a_median(self) -> float:
        return statistics.median(self.a_ms) if self.a_ms else float("nan")

    @property
    def b_median(self) -> float:
        return statistics.median(self.b_ms) if self.b_ms else float("nan")

    def faster(self, min_gain: float) -> bool:
        """B is faster than A by more than ``min_gain`` and by more than twice the noise, most rounds.

        Example:
            >>> Duel([1.0] * 5, [0.99] * 5).faster(0.02)
            False
        """
        if len(self.a_ms) < 3:
            return False
        return self.ratio < 1 - max(min_gain, 2 * self.noise) and self.wins >= 0.75


def duel(a: Callable[[], object], b: Callable[[], object], *, runs: int, min_rounds: int = 3, max_rounds: int = 7,
         deadline: float | None = None, worse: float = 1.15) -> Duel:
    """Time ``a`` and ``b`` in alternating rounds of ``runs`` calls each.

    Stops after ``max_rounds``, at ``deadline`` (``time.perf_counter()`` seconds; ``min_rounds``
    are always run), or early once B is clearly worse: its median ratio above ``worse`` after two
    rounds, or no round won after ``min_rounds``.
    """
    d = Duel()
    for k in range(max_rounds):
        if k >= min_rounds and deadline is not None and time.perf_counter() >= deadline:
            d.stopped = "budget"
            break
        # alternate who goes first so warming and drift favour neither; one untimed call after each
        # switch, so the other session's still-spinning ORT threads and cold caches are not billed
        first, second = (a, b) if k % 2 == 0 else (b, a)
        first()
        t_first = median_ms(first, runs)
        second()
        t_second = median_ms(second, runs)
        am, bm = (t_first, t_second) if k % 2 == 0 else (t_second, t_first)
        d.a_ms.append(am)
        d.b_ms.append(bm)
        if len(d.a_ms) >= 2 and d.ratio > worse:
            d.stopped = f"clearly slower ({d.ratio:.2f}x after {len(d.a_ms)} rounds)"
            break
        if len(d.a_ms) >= min_rounds and d.wins == 0:
            d.stopped = f"won no round of {len(d.a_ms)}"
            break
    return d


def batch_curve(run: Callable[[dict[str, np.ndarray]], object], feeds_at: Callable[[int], dict[str, np.ndarray]],
                sizes: Sequence[int], deadline: float) -> list[tuple[int, float]]:
    """Median ms per batch size; stops at ``deadline`` or once doubling the batch stops paying.

    Example:
        >>> batch_curve(lambda f: None, lambda b: {}, [1, 2], time.perf_counter() + 1)[0][0]
        1
    """
    curve: list[tuple[int, float]] = []
    flat = 0
    for b in sizes:
        if curve and time.perf_counter() >= deadline:
            break
        feeds = feeds_at(b)
        t_first = time.perf_counter()
        run(feeds)
        first = time.perf_counter() - t_first
        if curve and time.perf_counter() + 3 * first > deadline:
            break
        ms = median_ms(lambda f=feeds: run(f), max(3, min(20, math.ceil(0.1 / max(first, 1e-4)))))
        if curve:
            gain = (b / ms) / (curve[-1][0] / curve[-1][1]) - 1
            flat = flat + 1 if gain < 0.03 else 0  # two flat doublings in a row: the curve has levelled off
        curve.append((b, ms))
        if flat >= 2:
            break
    return curve


# batch size ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryModel:
    """Bytes a session needs at batch ``b``: ``fixed + per_sample * b`` (an upper bound: no reuse).

    Example:
        >>> MemoryModel(1000, 100).max_batch(2000)
        10
    """

    fixed: int
    per_sample: int

    def bytes_at(self, batch: int) -> int:
        return self.fixed + self.per_sample * batch

    def max_batch(self, cap: int) -> int:
        if self.per_sample <= 0:
            return 0
        return max(0, (cap - self.fixed) // self.per_sample)


def _with_batch(model: onnx.ModelProto, batch: int, dims: Mapping[str, int]) -> onnx.ModelProto:
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for init in light.graph.initializer:  # inference reads only small (shape-like) constants
        if init.data_type == onnx.TensorProto.FLOAT and (len(init.raw_data) > 4096 or len(init.float_data) > 1024):
            init.ClearField("raw_data")
            init.ClearField("float_data")
    inits = {i.name for i in light.graph.initializer}
    for inp in light.graph.input:
        if inp.name in inits or not inp.type.HasField("tensor_type"):
            continue
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if not d.HasField("dim_value"):
                value = dims.get(d.dim_param, batch if axis == 0 else 1)
                d.Clear()
                d.dim_value = value
    del light.graph.value_info[:]
    return light


def activation_bytes(model: onnx.ModelProto, batch: int, dims: Mapping[str, int] | None = None) -> int | None:
    """Bytes of every tensor the graph computes at ``batch``, or None where shapes stay unknown."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_with_batch(model, batch, dims or {}), data_prop=True)
    except Exception:  # noqa: BLE001 - a model onnx cannot infer: no estimate
        return None
    total = 0
    values = list(inferred.graph.value_info) + list(inferred.graph.output)
    produced = {o for n in model.graph.node for o in n.output if o}
    if len({v.name for v in values} & produced) < len(produced):
        return None
    for v in values:
        tt = v.type.tensor_type
        if not v.type.HasField("tensor_type") or not tt.HasField("shape"):
            return None
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if any(s < 0 for s in shape):
            return None
        try:
            item = onnx_elem_to_numpy(tt.elem_type).itemsize
        except (KeyError, TypeError, ValueError):  # strings and other odd types: count a pointer
            item = 8
        total += int(np.prod(shape, dtype=np.int64)) * item
    return total


def memory_model(model: onnx.ModelProto, dims: Mapping[str, int] | None = None) -> MemoryModel | None:
    """Weights (twice: the model and the session's copy) plus activations, linear in the batch.

    Example:
        >>> memory_model(model).max_batch(8 << 30)  # doctest: +SKIP
        5120
    """
    one, two = activation_bytes(model, 1, dims), activation_bytes(model, 2, dims)
    if one is None or two is None:
        return None
    per = max(0, two - one)
    return MemoryModel(2 * tensor_bytes(model) + one - per, per)


def available_ram() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_gpu_memory(index: int) -> int | None:
    """Free memory of GPU ``index`` in bytes from nvidia-smi (None without one)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return int(out.splitlines()[0]) * 1024 * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def knee(curve: Sequence[tuple[int, float]], share: float = 0.9) -> int | None:
    """Smallest batch whose samples/s reach ``share`` of the best measured.

    Example:
        >>> knee([(1, 100.0), (2, 180.0), (4, 300.0), (8, 320.0)])
        4
    """
    if not curve:
        return None
    best = max(t for _, t in curve)
    return min(b for b, t in curve if t >= share * best)


def doubling(start: int, limit: int) -> list[int]:
    """1, 2, 4, ... up to ``limit`` (``limit`` itself last when it is not a power of two).

    Example:
        >>> doubling(1, 20)
        [1, 2, 4, 8, 16, 20]
    """
    out, b = [], max(1, start)
    while b <= limit:
        out.append(b)
        b *= 2
    if limit >= 1 and (not out or out[-1] != limit):
        out.append(limit)
    return out


# the output check and the memory budget ------------------------------------------------------

def tolerance_for(device: Device, atol: float | None, rtol: float | None) -> Any:
    """Float32 setups: ``atol``/``rtol`` (default 1e-4/1e-3); fp16 and int8 TensorRT: validate's defaults."""
    from onnxpipe.core.compare import Tolerance
    from onnxpipe.runtimes.validate import DEFAULTS

    o = device.options
    precision = "int8" if getattr(o, "int8", False) else "fp16" if getattr(o, "fp16", False) else "fp32"
    base = DEFAULTS[precision]
    if precision != "fp32":
        return base
    return Tolerance(base.atol if atol is None else atol, base.rtol if rtol is None else rtol)


def output_mismatch(session: Any, batches: Sequence[Mapping[str, np.ndarray]], reference: list[dict[str, np.ndarray]],
              tol: Any) -> str | None:
    """Why ``session``'s outputs on ``batches`` differ from ``reference``, or None when they agree."""
    from onnxpipe.core.compare import check_output

    got = [session.run(b) for b in batches]
    for name in reference[0]:
        if name not in got[0]:
            return f"output {name} is missing"
        c = check_output(name, [g[name] for g in got], [r[name] for r in reference], tol)
        if not c.ok:
            return (f"outputs differ from the default: {name} max abs diff {c.max_abs:.3g} "
                    f"(atol={tol.atol:g}, rtol={tol.rtol:g})" + (f"; {c.detail}" if c.detail else ""))
    return None


def memory_cap_for(device: Device, memory_cap: int | None) -> tuple[int | None, str]:
    """Bytes a session on ``device`` may use, and where that figure comes from."""
    if memory_cap is not None:
        return memory_cap, "--memory-cap"
    if device.is_gpu:
        free = free_gpu_memory(device.index)
        return (int(free * 0.9), "90% of the GPU's free memory") if free else (None, "no GPU memory reading")
    ram = available_ram()
    return (ram // 2, "half the available RAM") if ram else (None, "no RAM reading")
