"""The options each kind of device takes, validated by pydantic (unknown keys are rejected).

Example:
    >>> TensorrtOptions(fp16=True, workspace="2GiB").workspace
    2147483648
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)


class DeviceOptions(BaseModel):
    """Options every device takes.

    ``threads`` defaults to this worker's share of the cores in the batch runner (cores //
    workers) and to ONNX Runtime's choice elsewhere. ``inter_threads`` above 1 on a CPU device
    turns on parallel execution unless ``execution_mode`` says otherwise (it does nothing in
    sequential mode, so asking for both is an error).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    parallel_ok: ClassVar[bool] = True  # ORT runs sessions with the CUDA provider sequentially whatever it is told

    threads: int | None = Field(None, ge=1)
    """Intra-op threads (for GPU devices: the threads of nodes that run on CPU)."""
    inter_threads: int | None = Field(None, ge=1)
    """Inter-op threads of parallel execution (above 1 on a CPU turns it on; 1 when threads is set)."""
    optimization: Literal["disable", "basic", "extended", "all"] = "all"
    """ORT graph optimization level."""
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    """Parallel runs independent branches at once on the inter-op threads (CPU devices only)."""
    mem_pattern: bool = True
    """Plan memory from the first run's allocations (pays off when input shapes repeat)."""
    spinning: bool = True
    """Idle pool threads spin instead of sleeping: faster wake-up, but they burn cores others need."""

    @model_validator(mode="before")
    @classmethod
    def _parallel_from_inter_threads(cls, data: Any) -> Any:
        inter = data.get("inter_threads") if isinstance(data, dict) else None
        if cls.parallel_ok and isinstance(inter, int) and inter > 1 and data.get("execution_mode") is None:
            data = {**data, "execution_mode": "parallel"}
        return data

    @model_validator(mode="after")
    def _parallel_applies(self) -> DeviceOptions:
        if self.execution_mode == "parallel" and not self.parallel_ok:
            raise ValueError("parallel execution applies to CPU devices only (ONNX Runtime runs CUDA sessions "
                             "sequentially): drop execution_mode and inter_threads")
        if (self.inter_threads or 1) > 1 and self.execution_mode == "sequential":
            raise ValueError(f"inter_threads={self.inter_threads} needs execution_mode=parallel "
                             "(sequential execution runs one node at a time)"
                             + ("" if self.parallel_ok else ", which applies to CPU devices only"))
        return self


class CpuOptions(DeviceOptions):
    """Options of a ``cpu`` device.

    Example:
        >>> CpuOptions(threads=2).threads
        2
    """

    arena: bool = True
    """Memory arena: CPU (true/false) or how the GPU arena grows (next_power_of_two, same_as_requested)."""
    pin: bool = False
    """Batch runner: pin each CPU worker to its own cores."""


class CudaOptions(DeviceOptions):
    """Options of a ``cuda`` device (CUDA execution provider).

    Example:
        >>> CudaOptions(mem_limit="1GiB").mem_limit
        1073741824
    """

    parallel_ok: ClassVar[bool] = False

    arena: Literal["next_power_of_two", "same_as_requested"] = "next_power_of_two"
    """How the GPU arena grows."""
    mem_limit: ByteSize | None = None
    """GPU memory limit of the arena, e.g. 8GiB."""
    cudnn: Literal["exhaustive", "heuristic", "default"] = "exhaustive"
    """cuDNN convolution algorithm search."""
    io_binding: bool = False
    """Bind outputs to GPU memory and copy them back once (fewer synchronisations)."""
    tf32: bool = True
    """Allow TF32 math in matmuls and convolutions (Ampere and later)."""
    cuda_graph: bool = False
    """Capture the run as a CUDA graph (static shapes only)."""
    cpu_fallback: bool = True
    """Allow nodes CUDA cannot run to go to CPU; false makes such a model an error."""


class TensorrtOptions(CudaOptions):
    """Options of a ``tensorrt`` device (TensorRT, with CUDA then CPU behind it for what it rejects).

    Example:
        >>> TensorrtOptions(fp16=True, min_shapes="x:1x8", opt_shapes="x:8x8", max_shapes="x:32x8").opt_shapes
        {'x': (8, 8)}
    """

    fp16: bool = False
    """Let TensorRT pick float16 kernels."""
    int8: bool = False
    """Let TensorRT pick int8 kernels (needs a Q/DQ model or ``int8_table``)."""
    int8_table: str | None = None
    """Calibration table file name for int8 without Q/DQ nodes."""
    cache_dir: str | None = None
    """Directory for the engine cache and the timing cache (reused across runs)."""
    workspace: ByteSize | None = None
    """TensorRT builder workspace, e.g. 4GiB."""
    builder_level: int | None = Field(None, ge=0, le=5)
    """TensorRT builder optimization level (0-5; higher builds longer)."""
    min_shapes: dict[str, tuple[int, ...]] | None = None
    """Optimization profile for dynamic inputs: smallest shapes, e.g. x:1x3x224x224."""
    opt_shapes: dict[str, tuple[int, ...]] | None = None
    """Shapes TensorRT tunes for."""
    max_shapes: dict[str, tuple[int, ...]] | None = None
    """Largest shapes."""
    cuda_fallback: bool = True
    """Run nodes TensorRT rejects on CUDA (else on CPU)."""

    @field_validator("min_shapes", "opt_shapes", "max_shapes", mode="before")
    @classmethod
    def _shapes(cls, v: Any) -> Any:
        return parse_shapes(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _profile_complete(self) -> TensorrtOptions:
        given = [n for n in ("min_shapes", "opt_shapes", "max_shapes") if getattr(self, n) is not None]
        if given and len(given) != 3:
            raise ValueError("min_shapes, opt_shapes and max_shapes go together: give all three")
        if given and not (set(self.min_shapes) == set(self.opt_shapes) == set(self.max_shapes)):  # type: ignore[arg-type]
            raise ValueError("min_shapes, opt_shapes and max_shapes must name the same inputs")
        return self


OPTIONS: dict[str, type[DeviceOptions]] = {"cpu": CpuOptions, "cuda": CudaOptions, "tensorrt": TensorrtOptions}


def parse_shapes(text: str) -> dict[str, tuple[int, ...]]:
    """``"x:1x3x8x8;mask:1x8"`` -> ``{"x": (1, 3, 8, 8), "mask": (1, 8)}``.

    Example:
        >>> parse_shapes("x:1x3x8x8;m:1x8")
        {'x': (1, 3, 8, 8), 'm': (1, 8)}
    """
    out = {}
    for item in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, dims = item.rpartition(":")
        try:
            out[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise ValueError(f"cannot read shape {item!r}; write NAME:1x3x224x224, several joined by ';'") from None
        if not sep or not name:
            raise ValueError(f"cannot read shape {item!r}; write NAME:1x3x224x224, several joined by ';'")
    return out


def option_rows() -> list[tuple[str, str, str, str]]:
    """``(option, device kinds, default, what it does)`` for every device option, for help screens.

    Example:
        >>> next(r for r in option_rows() if r[0] == "fp16")[:3]
        ('fp16', 'tensorrt', 'false')
    """
    rows: dict[str, list[Any]] = {}
    for kind, model in OPTIONS.items():
        for name, f in model.model_fields.items():
            default = "-" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
            if name not in rows:
                rows[name] = [name, [], [], (f.description or "").strip()]
            rows[name][1].append(kind)
            if default not in rows[name][2]:
                rows[name][2].append(default)
    return [(n, ",".join(k), " / ".join(d), w) for n, k, d, w in rows.values()]
