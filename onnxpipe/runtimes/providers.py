"""Devices (``cpu``, ``cuda:0``, ``tensorrt:0[fp16]``) as typed values that become ORT providers and options.

One form everywhere: the CLI (``--devices 'cpu:0,tensorrt:0[fp16,cache_dir=trt]'``), a recipe's
``validate.providers`` (the same strings) and the API (those strings, ``{device: tensorrt:0, fp16:
true}`` mappings, or keywords) all go through :meth:`Device.parse`, whose options are validated by
a pydantic model per device kind (:mod:`onnxpipe.runtimes.device_options`; unknown keys are
rejected with the list of known ones).

Example:
    >>> d = Device.parse("cuda:1[cudnn=heuristic]")
    >>> d.kind, d.index, d.options.cudnn
    ('cuda', 1, 'heuristic')
    >>> str(d)
    'cuda:1[cudnn=heuristic]'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from onnxpipe.core.deps import require
from onnxpipe.core.errors import InputError
from onnxpipe.runtimes.device_options import (
    OPTIONS,
    CpuOptions,
    CudaOptions,
    DeviceOptions,
    TensorrtOptions,
    option_rows,
    parse_shapes,
)

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["OPTIONS", "CpuOptions", "CudaOptions", "Device", "DeviceOptions", "TensorrtOptions", "available",
           "option_rows", "parse_devices", "parse_shapes", "resolve", "split_devices"]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
# accepted spellings -> kind
ALIASES = {"cpu": "cpu", "cuda": "cuda", "gpu": "cuda", "tensorrt": "tensorrt", "trt": "tensorrt"}
OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
GPU_HINT = "install 'onnxpipe[gpu]' (onnxruntime-gpu, never beside onnxruntime) on a machine with CUDA"
TRT_HINT = ("install 'onnxpipe[gpu]' and TensorRT 10 (pip install tensorrt-cu12, or NVIDIA's packages) "
            "so libnvinfer is on LD_LIBRARY_PATH")


def _flag(value: bool) -> str:
    return "1" if value else "0"  # ORT parses provider booleans from "0"/"1"


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("", "true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    return int(low) if re.fullmatch(r"-?\d+", low) else text.strip()


def split_devices(text: str) -> list[str]:
    """Split ``"cpu:0,tensorrt:0[fp16,cache_dir=x]"`` at the commas outside brackets.

    Example:
        >>> split_devices("cpu:0, trt:0[fp16,workspace=2GiB]")
        ['cpu:0', 'trt:0[fp16,workspace=2GiB]']
    """
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return [p for p in parts if p]


@dataclass(frozen=True)
class Device:
    """One execution target: its kind, index and validated options.

    Example:
        >>> Device.parse({"device": "tensorrt:0", "fp16": True}) == Device.parse("trt:0[fp16]")
        True
    """

    kind: str
    index: int = 0
    options: DeviceOptions = field(default_factory=CpuOptions, hash=False)

    _SPEC = re.compile(r"^\s*(?P<kind>[A-Za-z]+)(?::(?P<index>[^\[\]]*))?\s*(?:\[(?P<opts>.*)\])?\s*$")

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | Device, **overrides: Any) -> Device:
        """A device from ``kind[:index][[key=value,...]]``, a mapping with a ``device`` key, or a Device.

        ``overrides`` are options on top of those in ``spec`` (the API's keyword form).
        """
        if isinstance(spec, Device):
            if not overrides:
                return spec
            opts = {**spec.options.model_dump(exclude_defaults=True), **overrides}
            return cls._build(spec.kind, spec.index, opts, str(spec))
        if isinstance(spec, Mapping):
            rest = dict(spec)
            name = rest.pop("device", None)
            if not isinstance(name, str):
                raise InputError(f"device mapping {dict(spec)!r} has no 'device' key",
                                 hint="write it as {device: cuda:0, <option>: <value>, ...}")
            base = cls.parse(name)
            return cls._build(base.kind, base.index,
                              {**base.options.model_dump(exclude_defaults=True), **rest, **overrides}, name)
        m = cls._SPEC.match(str(spec))
        if not m:
            raise InputError(f"cannot read device {spec!r}",
                             hint="write it as cpu, cuda:0 or tensorrt:0[fp16,cache_dir=trt]")
        kind = ALIASES.get(m.group("kind").lower())
        if kind is None:
            raise InputError(f"unknown device {m.group('kind')!r} in {spec!r}",
                             hint=f"use one of {', '.join(sorted(ALIASES))}, e.g. cuda:0")
        index_text = (m.group("index") or "0").strip()
        if not index_text.isdigit():
            raise InputError(f"bad device index {index_text!r} in {spec!r}", hint=f"write it as {kind}:0")
        opts: dict[str, Any] = {}
        for item in filter(None, (o.strip() for o in (m.group("opts") or "").split(","))):
            key, _, value = item.partition("=")
            opts[key.strip().replace("-", "_")] = _value(value)
        return cls._build(kind, int(index_text), {**opts, **overrides}, str(spec))

    @classmethod
    def _build(cls, kind: str, index: int, opts: dict[str, Any], spec: str) -> Device:
        model = OPTIONS[kind]
        try:
            options = model.model_validate(opts)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                raise InputError(f"unknown option {key!r} for a {kind} device in {spec!r}",
                                 hint=f"{kind} options: {', '.join(model.model_fields)}") from None
            where = f"option {key!r}" if key else "options"
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise InputError(f"{spec}: {where}: {msg}", hint=f"see `onnxpipe providers` for the {kind} options") from None
        return cls(kind, index, options)

    def __repr__(self) -> str:
        return f"Device({str(self)!r})"

    def __str__(self) -> str:
        opts = []
        for k, v in self.options.model_dump(exclude_defaults=True).items():
            if isinstance(v, dict):
                v = ";".join(f"{n}:{'x'.join(map(str, s))}" for n, s in v.items())
            opts.append(k if v is True else f"{k}={str(v).lower() if isinstance(v, bool) else v}")
        return f"{self.kind}:{self.index}" + (f"[{','.join(opts)}]" if opts else "")

    @property
    def label(self) -> str:
        """``cpu:0``, ``cuda:1``: the name in tables."""
        return f"{self.kind}:{self.index}"

    @property
    def is_gpu(self) -> bool:
        return self.kind != "cpu"

    @property
    def provider(self) -> str:
        """The ORT provider that must run this device's nodes."""
        return PROVIDERS[self.kind]

    def check_available(self) -> None:
        """Raise naming the extra to install when this onnxruntime build lacks the provider."""
        have = available()
        if self.provider not in have:
            hint = TRT_HINT if self.kind == "tensorrt" else GPU_HINT
            raise InputError(f"{self}: this onnxruntime build has no {self.provider} (it has {', '.join(have)})",
                             hint=hint)

    def providers(self, *, device_id: int | None = None, check: bool = True) -> list[str | tuple[str, dict[str, str]]]:
        """ORT's provider list with options, most preferred first.

        ``device_id`` overrides the index (a Ray actor sees its one GPU as device 0); ``check``
        first makes sure this onnxruntime build has the provider.

        Example:
            >>> Device.parse("cpu").providers()
            ['CPUExecutionProvider']
        """
        if check:
            self.check_available()
        o = self.options
        dev = str(self.index if device_id is None else device_id)
        if self.kind == "cpu":
            return [PROVIDERS["cpu"]]
        assert isinstance(o, CudaOptions)
        cuda = {"device_id": dev, "arena_extend_strategy": "kNextPowerOfTwo" if o.arena == "next_power_of_two"
                else "kSameAsRequested", "cudnn_conv_algo_search": o.cudnn.upper(),
                "do_copy_in_default_stream": "1", "use_tf32": _flag(o.tf32), "enable_cuda_graph": _flag(o.cuda_graph)}
        if o.mem_limit is not None:
            cuda["gpu_mem_limit"] = str(int(o.mem_limit))
        out: list[str | tuple[str, dict[str, str]]] = []
        if isinstance(o, TensorrtOptions):
            trt = {"device_id": dev, "trt_fp16_enable": _flag(o.fp16), "trt_int8_enable": _flag(o.int8)}
            if o.int8_table:
                trt["trt_int8_calibration_table_name"] = o.int8_table
            if o.cache_dir:
                trt.update(trt_engine_cache_enable="1", trt_engine_cache_path=o.cache_dir,
                           trt_timing_cache_enable="1", trt_timing_cache_path=o.cache_dir)
            if o.workspace is not None:
                trt["trt_max_workspace_size"] = str(int(o.workspace))
            if o.builder_level is not None:
                trt["trt_builder_optimization_level"] = str(o.builder_level)
            for key, shapes in (("min", o.min_shapes), ("opt", o.opt_shapes), ("max", o.max_shapes)):
                if shapes:
                    trt[f"trt_profile_{key}_shapes"] = ",".join(f"{n}:{'x'.join(map(str, s))}" for n, s in shapes.items())
            out.append((PROVIDERS["tensorrt"], trt))
            if o.cuda_fallback:  # onnxruntime-gpu always ships CUDA beside TensorRT
                out.append((PROVIDERS["cuda"], cuda))
        else:
            out.append((PROVIDERS["cuda"], cuda))
        if o.cpu_fallback:
            out.append(PROVIDERS["cpu"])
        return out

    def session_options(self, *, threads: int | None = None) -> ort.SessionOptions:
        """ORT session options for this device; ``threads`` is the default when the device sets none.

        Everything comes from the device's options (threads, execution mode, optimization level,
        memory pattern, spinning, arena), so a worker process that rebuilds the device from its
        spec string gets the same session. Node placement is recorded (see
        :mod:`onnxpipe.runtimes.device_session`), and a GPU device without ``cpu_fallback``
        makes ORT refuse models with nodes it cannot place.

        Example:
            >>> o = Device.parse("cpu[threads=1,inter_threads=2,spinning=false]").session_options()
            >>> o.execution_mode.name, o.inter_op_num_threads, o.get_session_config_entry("session.intra_op.allow_spinning")
            ('ORT_PARALLEL', 2, '0')
        """
        ort_mod = require("onnxruntime")
        o = self.options
        opts = ort_mod.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = getattr(ort_mod.GraphOptimizationLevel, OPT_LEVELS[o.optimization])
        opts.execution_mode = (ort_mod.ExecutionMode.ORT_PARALLEL if o.execution_mode == "parallel"
                               else ort_mod.ExecutionMode.ORT_SEQUENTIAL)
        n = o.threads or threads
        if n:
            opts.intra_op_num_threads = n
            opts.inter_op_num_threads = o.inter_threads or 1  # a worker's core share is not doubled by a 2nd pool
        elif o.inter_threads:
            opts.inter_op_num_threads = o.inter_threads
        opts.enable_mem_pattern = o.mem_pattern
        spin = _flag(o.spinning)
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if isinstance(o, CpuOptions):
            opts.enable_cpu_mem_arena = o.arena
        opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        if isinstance(o, CudaOptions) and not o.cpu_fallback:
            opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return opts


def parse_devices(spec: str | Mapping[str, Any] | Device | list[Any] | tuple[Any, ...]) -> list[Device]:
    """A list of devices from ``"cpu:0,cpu:1"``, a list of specs/mappings, or one device.

    Example:
        >>> [d.label for d in parse_devices("cpu:0,cpu:1")]
        ['cpu:0', 'cpu:1']
    """
    items = split_devices(spec) if isinstance(spec, str) else [spec] if isinstance(spec, (Mapping, Device)) else list(spec)
    devices = [Device.parse(s) for s in items]
    if not devices:
        raise InputError("no devices given", hint="give at least one, e.g. --devices cpu")
    return devices


def available() -> list[str]:
    """ORT provider names this build offers.

    Example:
        >>> "CPUExecutionProvider" in available()
        True
    """
    return list(require("onnxruntime").get_available_providers())


def resolve(device: str | Device) -> list[str | tuple[str, dict]]:
    """``cuda:1`` -> [("CUDAExecutionProvider", {"device_id": "1", ...}), "CPUExecutionProvider"].

    A provider this onnxruntime build lacks is an error naming the extra to install; there is
    no silent fallback to CPU.

    Example:
        >>> resolve("cpu")
        ['CPUExecutionProvider']
    """
    return Device.parse(device).providers()
