"""What this machine can accelerate: CPU SIMD and int8 dot-product support, GPUs and their int8 units."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's name, cores and the instruction sets that matter for inference.

    ``simd`` is the widest vector level (avx512, avx2, avx, sse4, neon, ...), ``int8_dot`` names
    the int8 dot-product instructions (avx512_vnni, avx_vnni, amx_int8, asimddp, i8mm) or is
    empty when int8 goes through plain SIMD, where it gains little over float32.
    """

    arch: str
    model: str
    cores: int
    simd: str
    int8_dot: tuple[str, ...] = ()
    flags: frozenset[str] = field(default_factory=frozenset, repr=False)

    @property
    def vnni(self) -> bool:
        return any(f in self.int8_dot for f in ("avx512_vnni", "avx_vnni", "amx_int8"))

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("flags")
        d["int8_dot"] = list(self.int8_dot)
        return d


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as ``nvidia-smi`` reports it."""

    index: int
    name: str
    memory_mib: int
    compute_capability: str

    @property
    def int8_tensor_cores(self) -> bool:
        """Turing (7.5) and later have int8 tensor cores; Volta (7.0) does not; Xavier (7.2) does."""
        major, _, minor = self.compute_capability.partition(".")
        try:
            cc = (int(major), int(minor or 0))
        except ValueError:
            return False
        return cc >= (7, 2) and cc != (7, 0)

    def as_dict(self) -> dict:
        return {**asdict(self), "int8_tensor_cores": self.int8_tensor_cores}


def _cpu_flags() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("flags", "features") and not flags:
                    flags = set(value.split())
                elif key in ("model name", "cpu model") and value.strip():
                    model = value.strip()
    except OSError:
        pass
    if not flags and platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-a"], capture_output=True, text=True, timeout=5).stdout
            flags = {line.split(":")[0].rsplit(".", 1)[-1].lower() for line in out.splitlines()
                     if line.startswith("hw.optional.") and line.strip().endswith(": 1")}
        except (OSError, subprocess.SubprocessError):
            pass
    return model, frozenset(flags)


@functools.lru_cache(maxsize=1)
def cpu() -> CpuInfo:
    """This machine's CPU (cached).

    Example:
        >>> cpu().simd in {"avx512", "avx2", "avx", "sse4", "neon", "sve", "generic"}
        True
    """
    arch = platform.machine().lower()
    model, flags = _cpu_flags()
    if arch in ("x86_64", "amd64", "i686", "x86"):
        simd = next((name for name, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx"),
                                              ("sse4", "sse4_2")) if flag in flags), "generic")
        dot = tuple(f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags)
    else:
        simd = "sve" if "sve" in flags else "neon" if ({"asimd", "neon"} & flags or arch in ("arm64", "aarch64")) else "generic"
        dot = tuple(name for name, keys in (("asimddp", ("asimddp", "feat_dotprod")), ("i8mm", ("i8mm", "feat_i8mm")))
                    if any(k in flags for k in keys))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuInfo(arch, model, cores, simd, dot, flags)


def channel_multiple(target: str = "cpu") -> int:
    """The channel count multiple this machine's kernels run fastest at.

    ONNX Runtime's blocked CPU convolutions (NCHWc) use blocks of 16 floats with AVX-512 and of
    8 with AVX/AVX2; GEMM kernels pack panels of the same widths. NEON and SVE kernels work in
    4-float lanes; GPUs' tensor cores want multiples of 8 (fp16) for their tiles.

    Example:
        >>> channel_multiple() in (4, 8, 16)
        True
    """
    if target != "cpu":
        return 8
    simd = cpu().simd
    return 16 if simd == "avx512" else 8 if simd in ("avx2", "avx") else 4


@functools.lru_cache(maxsize=1)
def gpus() -> tuple[GpuInfo, ...]:
    """NVIDIA GPUs visible through ``nvidia-smi``; empty where there is none."""
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    found = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4 and parts[0].isdigit():
            mem = int(parts[2]) if parts[2].isdigit() else 0
            found.append(GpuInfo(int(parts[0]), parts[1], mem, parts[3]))
    return tuple(found)


def int8_advice(target: str = "cpu") -> tuple[bool, str]:
    """Whether int8 is likely to be faster than float32 on ``target`` here, and why.

    Example:
        >>> ok, why = int8_advice("cpu")
    """
    if target == "cpu":
        c = cpu()
        if c.int8_dot:
            return True, f"{c.model}: int8 dot-product instructions ({', '.join(c.int8_dot)})"
        if c.simd in ("avx2", "avx512"):
            return True, (f"{c.model}: {c.simd} without VNNI; int8 helps with uint8 activations (U8S8) "
                          "and MatMul-heavy models, often not with int8 activations (S8S8)")
        return False, f"{c.model}: {c.simd} SIMD only; int8 is likely slower than float32 here"
    gs = gpus()
    if not gs:
        return False, "no NVIDIA GPU visible (nvidia-smi found none)"
    fast = [g for g in gs if g.int8_tensor_cores]
    if fast:
        return True, f"{fast[0].name} (sm {fast[0].compute_capability}): int8 tensor cores"
    return False, f"{gs[0].name} (sm {gs[0].compute_capability}) has no int8 tensor cores"


def int8_activation_type(target: str = "cpu", fmt: str = "qdq") -> tuple[str, str]:
    """The activation type (``"uint8"`` or ``"int8"``) that int8 kernels run fast on ``target`` here, and why.

    TensorRT and CUDA take signed, symmetric int8 only. On x86, ONNX Runtime runs uint8
    activations with int8 weights (U8S8) through plain AVX2/AVX-512; int8 activations (S8S8)
    are as fast only with VNNI and in QDQ form (S8S8 in QOperator form is slow on any x86).
    ARM's dot-product instructions take signed int8 directly.

    Example:
        >>> int8_activation_type("tensorrt")[0]
        'int8'
    """
    if target in ("cuda", "tensorrt"):
        return "int8", f"{target} takes signed symmetric int8 activations"
    c = cpu()
    if c.arch in ("x86_64", "amd64", "i686", "x86"):
        if c.vnni and fmt == "qdq":
            return "int8", f"{c.model}: VNNI ({', '.join(c.int8_dot)}) runs int8 activations (S8S8) at full speed"
        why = "without VNNI, S8S8 runs about as slow as float32" if not c.vnni else "S8S8 QOperator kernels are slow on x86"
        return "uint8", f"{c.model}: {c.simd}, uint8 activations (U8S8) use the fast kernels ({why})"
    if c.simd in ("neon", "sve"):
        dot = f"dot-product instructions ({', '.join(c.int8_dot)})" if c.int8_dot else "no int8 dot-product instructions"
        return "int8", f"{c.model}: ARM with {dot}; int8 activations (S8S8) are the native form"
    return "uint8", f"{c.model}: {c.simd} SIMD; uint8 activations (U8S8) are ONNX Runtime's default kernels"


def u8s8_saturates() -> bool:
    """Whether uint8 x int8 products can saturate in ONNX Runtime's int8 kernels on this CPU.

    x86 without VNNI multiplies uint8 activations by int8 weights with ``vpmaddubsw``, which
    adds pairs of products in int16: two products of 255 x 127 overflow it. Weights limited to
    7 bits (``reduce_range``) cannot. VNNI and ARM dot-product instructions accumulate in int32.

    Example:
        >>> isinstance(u8s8_saturates(), bool)
        True
    """
    c = cpu()
    return c.arch in ("x86_64", "amd64", "i686", "x86") and not c.vnni


def weight_only_advice(bits: int = 4) -> tuple[int, bool, str]:
    """The MatMulNBits ``accuracy_level`` this CPU computes fast, whether the blocked kernels are fast here, and why.

    ONNX Runtime's blocked int4/int8 GEMM kernels (MLAS) exist for x86 with AVX2 or AVX-512 and
    for 64-bit ARM. Level 4 quantizes activations to int8 per block and multiplies in int8 (VNNI or
    ARM dot-product instructions make it fastest); level 0 computes in float32 and has no 8-bit
    kernel at all: 8-bit weights then dequantize on every run, far slower than float32.
    Elsewhere every block is dequantized to float32 at each run.

    Example:
        >>> level, fast, why = weight_only_advice(4)
        >>> level in (0, 4)
        True
    """
    c = cpu()
    x86 = c.arch in ("x86_64", "amd64", "i686", "x86")
    dot = f" with {', '.join(c.int8_dot)}" if c.int8_dot else ""
    if x86 and c.simd in ("avx2", "avx512"):
        return 4, True, (f"{c.model}: {c.simd}{dot}: ONNX Runtime's blocked int{bits} kernels compute in int8 "
                         "(accuracy_level 4) fastest here")
    if c.arch in ("arm64", "aarch64"):
        why = "int8 dot-product instructions" if c.int8_dot else "NEON (no int8 dot product: int8 compute is slower)"
        return (4 if c.int8_dot else 0), True, f"{c.model}: ARM with {why}"
    return 0, False, (f"{c.model}: {c.simd} only: ONNX Runtime has no blocked int{bits} kernel for it; each weight "
                      "block is dequantized at every run (likely slower than float32)")
