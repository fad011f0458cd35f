"""What this machine can run on: the ONNX Runtime build, its providers, TensorRT, GPUs and the CPU."""

from __future__ import annotations

import ctypes.util
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxpipe.core.deps import require
from onnxpipe.core.hardware import CpuInfo, GpuInfo, cpu, gpus
from onnxpipe.runtimes.providers import GPU_HINT, PROVIDERS, TRT_HINT


@dataclass
class Machine:
    """The ORT build, its providers (ours first, with the device names that reach them) and the hardware.

    Example:
        >>> m = machine()
        >>> "CPUExecutionProvider" in m.providers
        True
    """

    ort_version: str
    ort_build: str
    providers: list[str]
    tensorrt: str | None
    cpu: CpuInfo
    gpus: tuple[GpuInfo, ...]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        from onnxpipe.runtimes.peak import cpu_peak

        return {"onnxruntime": {"version": self.ort_version, "build": self.ort_build, "providers": self.providers},
                "devices": {kind: PROVIDERS[kind] in self.providers for kind in PROVIDERS},
                "tensorrt": self.tensorrt, "cpu": {**self.cpu.as_dict(), "peak": cpu_peak().as_dict()},
                "gpus": [g.as_dict() for g in self.gpus], "notes": self.notes}

    def render(self, console: Console) -> None:
        """Print the providers table, the GPU table and the CPU line."""
        from onnxpipe.runtimes.peak import cpu_peak

        console.print(f"onnxruntime {self.ort_version} · {escape(self.ort_build)}"
                      + (f" · TensorRT {escape(self.tensorrt)}" if self.tensorrt else " · TensorRT: not found"))
        t = Table(title="execution providers")
        for col in ("device", "provider", "in this build", "to get it"):
            t.add_column(col)
        for kind, name in PROVIDERS.items():
            have = name in self.providers
            how = "" if have else (TRT_HINT if kind == "tensorrt" else GPU_HINT)
            if kind == "tensorrt" and have and self.tensorrt is None:
                have, how = False, "the provider is built in but TensorRT's libraries are missing: " + TRT_HINT
            t.add_row(f"{kind}:N" if kind != "cpu" else "cpu", name, "[green]yes[/]" if have else "[red]no[/]", escape(how))
        for name in self.providers:
            if name not in PROVIDERS.values():
                t.add_row("-", name, "[green]yes[/]", "not used by onnxpipe")
        console.print(t)
        if self.gpus:
            g = Table(title="GPUs")
            for col in ("index", "name", "memory", "compute capability", "int8 tensor cores"):
                g.add_column(col)
            for gpu in self.gpus:
                g.add_row(str(gpu.index), gpu.name, f"{gpu.memory_mib / 1024:.0f} GiB", gpu.compute_capability,
                          "yes" if gpu.int8_tensor_cores else "no")
            console.print(g)
        else:
            console.print("GPUs: none visible (nvidia-smi found none)")
        c, peak = self.cpu, cpu_peak()
        console.print(f"CPU: {c.model} · {c.cores} cores · {c.simd}"
                      + (f" · int8 dot: {', '.join(c.int8_dot)}" if c.int8_dot else " · no int8 dot-product")
                      + f" · peak ~{peak.gflops:.0f} GFLOP/s fp32 ({peak.explain()})")
        for note in self.notes:
            console.print(f"[dim]note: {escape(note)}[/]")


def tensorrt_version() -> str | None:
    """TensorRT's version where its Python package or its library can be found, else None.

    Example:
        >>> tensorrt_version()  # doctest: +SKIP
        '10.3.0'
    """
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import tensorrt

            return str(tensorrt.__version__)
        except Exception:  # a broken install is as good as none here
            pass
    lib = ctypes.util.find_library("nvinfer")
    return f"library {lib}" if lib else None


def machine() -> Machine:
    """Probe this machine (ORT import, nvidia-smi, /proc/cpuinfo).

    Example:
        >>> machine().cpu.simd  # doctest: +SKIP
        'avx512'
    """
    ort = require("onnxruntime")
    build = ort.get_build_info() if hasattr(ort, "get_build_info") else ""
    build = build.replace("ORT Build Info:", "").strip() or f"device {ort.get_device()}"
    providers = list(ort.get_available_providers())
    notes = []
    found = gpus()
    if found and PROVIDERS["cuda"] not in providers:
        notes.append(f"{len(found)} GPU(s) present but this onnxruntime build cannot use them: {GPU_HINT}")
    return Machine(ort.__version__, build, providers, tensorrt_version(), cpu(), found, notes)
