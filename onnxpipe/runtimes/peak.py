"""This CPU's peak float32 FLOP/s: physical cores x clock x SIMD lanes x FMA units x 2.

The clock comes from ``cpuinfo_max_freq`` (sysfs), else the highest ``cpu MHz`` in
/proc/cpuinfo, else the ``@ 2.20GHz`` in the model name, else it is backed out of a measured
single-thread matmul (which then counts as running at peak). Lanes and FMA units follow the
widest SIMD level: avx512 16 lanes x 2 FMA units (AMD Zen 4 splits 512-bit ops over its two
256-bit units: 16 x 1), avx2 8 x 2, avx 8 x 1 (separate add and multiply units), sse4 4 x 1,
neon/sve 4 x 2. It is an upper bound real kernels approach, not a promise.
"""

from __future__ import annotations

import functools
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from onnxpipe.core.hardware import cpu

# simd level -> (fp32 lanes per vector, FMA units per core)
SIMD = {"avx512": (16, 2), "avx2": (8, 2), "avx": (8, 1), "sse4": (4, 1), "neon": (4, 2), "sve": (4, 2),
        "generic": (1, 1)}


@dataclass(frozen=True)
class Peak:
    """A peak float32 FLOP/s estimate and what it was made of.

    Example:
        >>> Peak(2, 2.5, 8, 2, "cpuinfo").gflops
        160.0
    """

    cores: int
    ghz: float
    lanes: int
    fma_units: int
    clock_source: str

    @property
    def per_core_gflops(self) -> float:
        return self.ghz * self.lanes * self.fma_units * 2  # an FMA is two FLOPs

    @property
    def gflops(self) -> float:
        return self.cores * self.per_core_gflops

    def for_threads(self, threads: int | None) -> float:
        """Peak GFLOP/s of ``threads`` cores (all of them when None)."""
        n = self.cores if not threads else min(threads, self.cores)
        return n * self.per_core_gflops

    def explain(self) -> str:
        return (f"{self.cores} cores x {self.ghz:.2f} GHz ({self.clock_source}) x {self.lanes} lanes "
                f"x {self.fma_units} FMA x 2")

    def as_dict(self) -> dict:
        return {**asdict(self), "gflops": self.gflops}


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (hyperthreads share FMA units).

    Example:
        >>> physical_cores() >= 1
        True
    """
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    seen = set()
    for n in allowed:
        topo = Path(f"/sys/devices/system/cpu/cpu{n}/topology")
        try:
            package = topo.joinpath("physical_package_id").read_text().strip()
            seen.add((package, topo.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(allowed)
    return max(1, len(seen))


def _clock_ghz() -> tuple[float, str] | None:
    freqs = []
    for f in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/cpuinfo_max_freq"):
        try:
            freqs.append(int(f.read_text()) / 1e6)
        except (OSError, ValueError):
            pass
    if freqs:
        return max(freqs), "cpuinfo_max_freq"
    mhz, name = [], ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() == "cpu mhz":
                mhz.append(float(value))
            elif key.strip().lower() == "model name":
                name = value
    except (OSError, ValueError):
        pass
    if mhz:
        return max(mhz) / 1e3, "cpu MHz"
    m = re.search(r"@\s*([\d.]+)\s*GHz", name)
    return (float(m.group(1)), "model name") if m else None


def _amd_family() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if "AuthenticAMD" not in text:
        return None
    m = re.search(r"^cpu family\s*:\s*(\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def measured_matmul_gflops(n: int = 384, seconds: float = 0.3) -> float:
    """Single-thread float32 matmul GFLOP/s through ONNX Runtime (one core at work)."""
    import onnx
    from onnx import TensorProto, helper

    from onnxpipe.core.session import Session

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    with Session(model, threads=1) as s:
        s.session.run(None, feeds)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or runs < 3:
            s.session.run(None, feeds)
            runs += 1
        elapsed = time.perf_counter() - start
    return 2 * n ** 3 * runs / elapsed / 1e9


@functools.lru_cache(maxsize=1)
def cpu_peak() -> Peak:
    """This machine's CPU peak (cached).

    Example:
        >>> cpu_peak().gflops > 0
        True
    """
    info = cpu()
    lanes, units = SIMD.get(info.simd, (1, 1))
    if info.simd == "avx512" and _amd_family() == 25:  # Zen 4: two 256-bit FMA pipes
        units = 1
    clock = _clock_ghz()
    if clock is None:
        per_core = measured_matmul_gflops()
        clock = (per_core / (lanes * units * 2), "measured matmul")
    return Peak(physical_cores(), round(clock[0], 3), lanes, units, clock[1])
