"""A session on one :class:`Device`: its providers and options, no silent CPU fallback, and where nodes went.

Where nodes run is read from ONNX Runtime itself, two ways:

1. ``session.get_provider_graph_assignment_info()`` (ORT >= 1.23, with the session config entry
   ``session.record_ep_graph_assignment_info=1`` that :meth:`Device.session_options` sets): the
   graph's nodes per provider right after session creation, before any run. This is the main
   way: exact, cheap, and it counts the nodes of the (ORT-optimized) graph.
2. Older builds: one profiled run (``SessionOptions.enable_profiling``); every kernel event in the
   profile carries ``args.provider``. ``end_profiling()`` stops profiling, so later runs pay
   nothing. It counts kernels as they ran, after fusion (a TensorRT engine is one kernel).

Either way a GPU session whose nodes partly went to CPU says so: :attr:`DeviceSession.placement`
holds the counts and :meth:`Placement.summary` the line the runners print.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpipe.core.deps import require
from onnxpipe.core.errors import OnnxpipeError
from onnxpipe.core.session import Session, release_source, session_source
from onnxpipe.runtimes.providers import (
    GPU_HINT,
    PROVIDERS,
    TRT_HINT,
    CudaOptions,
    Device,
)

SHORT = {v: k for k, v in PROVIDERS.items()}


@dataclass(frozen=True)
class Placement:
    """How many nodes each provider runs, and which ones went to CPU in a GPU session.

    Example:
        >>> Placement({"CUDAExecutionProvider": 40, "CPUExecutionProvider": 2}, ("Shape", "Gather")).summary()
        'cuda 40, cpu 2 (Shape, Gather)'
    """

    counts: Mapping[str, int]
    cpu_nodes: tuple[str, ...] = ()
    method: str = "assignment"

    def summary(self) -> str:
        text = ", ".join(f"{SHORT.get(p, p)} {n}" for p, n in self.counts.items())
        if self.cpu_nodes and any(p != PROVIDERS["cpu"] for p in self.counts):
            shown = ", ".join(self.cpu_nodes[:6]) + (", ..." if len(self.cpu_nodes) > 6 else "")
            text += f" ({shown})"
        return text

    @property
    def on_cpu(self) -> int:
        return int(self.counts.get(PROVIDERS["cpu"], 0))

    def as_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "cpu_nodes": list(self.cpu_nodes), "method": self.method}


def assigned_placement(sess: Any) -> Placement | None:
    """Placement from ORT's graph assignment info, or None where this build does not record it.

    Example:
        >>> assigned_placement(session.session).counts  # doctest: +SKIP
        {'CUDAExecutionProvider': 50, 'CPUExecutionProvider': 2}
    """
    getter = getattr(sess, "get_provider_graph_assignment_info", None)
    if getter is None:
        return None
    try:
        subgraphs = getter()
    except Exception:  # not recorded (option unsupported): use the profiling way
        return None
    counts: Counter[str] = Counter()
    cpu: list[str] = []
    for sg in subgraphs:
        nodes = sg.get_nodes()
        counts[sg.ep_name] += len(nodes)
        if sg.ep_name == PROVIDERS["cpu"]:
            cpu += [n.op_type for n in nodes]
    if not counts:
        return None
    return Placement(dict(counts.most_common()), tuple(cpu), "assignment")


def profiled_placement(profile_path: str | os.PathLike) -> Placement:
    """Placement from an ORT profile: kernel events per ``args.provider``.

    Example:
        >>> profiled_placement(sess.end_profiling()).method  # doctest: +SKIP
        'profiling'
    """
    with open(profile_path) as f:
        events = json.load(f)
    counts: Counter[str] = Counter()
    cpu: list[str] = []
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "provider" in args and str(e.get("name", "")).endswith("_kernel_time"):
            counts[args["provider"]] += 1
            if args["provider"] == PROVIDERS["cpu"]:
                cpu.append(str(args.get("op_name", "?")))
    return Placement(dict(counts.most_common()), tuple(cpu), "profiling")


class DeviceSession(Session):
    """A :class:`Session` on ``device``, with its provider options and session options.

    ORT quietly drops a provider it cannot load (missing CUDA or TensorRT libraries) and runs
    everything on CPU; this session refuses instead, naming what to install.

    Args:
        model: an ``.onnx`` path or a ``ModelProto``.
        device: a :class:`Device` or its spec (``cuda:0``, ``tensorrt:0[fp16]``).
        threads: intra-op threads when the device sets none (the batch runner's core share).
        device_id: the GPU index to use instead of the device's (Ray gives an actor its GPU as 0).

    Example:
        >>> with DeviceSession("model.onnx", "cpu[threads=1]") as s:  # doctest: +SKIP
        ...     y = s.run({"x": x})["y"]
    """

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, device: Device | str = "cpu", *,
                 threads: int | None = None, device_id: int | None = None) -> None:
        ort_mod = require("onnxruntime")
        self.device = Device.parse(device)
        providers = self.device.providers(device_id=device_id)
        opts = self.device.session_options(threads=threads)
        self._tmpdir: tempfile.TemporaryDirectory | None = tempfile.TemporaryDirectory(prefix="onnxpipe-")
        source = session_source(model, lambda: Path(self._tmpdir.name))
        probe = self.device.is_gpu and not hasattr(ort_mod.InferenceSession, "get_provider_graph_assignment_info")
        if probe:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(self._tmpdir.name) / "placement")
        try:
            self.session = ort_mod.InferenceSession(source, opts, providers=providers)
        except Exception as exc:
            raise _load_error(self.device, exc) from exc
        finally:
            if self.device.kind != "tensorrt":  # TensorRT may parse the model (and its weights) again to rebuild
                release_source(source)
        got = list(self.session.get_providers())
        if self.device.provider not in got:
            hint = TRT_HINT if self.device.kind == "tensorrt" else GPU_HINT
            raise OnnxpipeError(f"{self.device.label}: ONNX Runtime could not start {self.device.provider} "
                                f"and would run on {', '.join(got)} instead", hint=hint)
        self.placement: Placement | None = assigned_placement(self.session)
        self._probe = probe and self.placement is None
        self.io_binding = isinstance(self.device.options, CudaOptions) and self.device.options.io_binding
        self._device_id = self.device.index if device_id is None else device_id
        self._describe_io()

    def run(self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run once on the device; returns ``{output name: array}`` (on the host)."""
        names = list(outputs) if outputs is not None else self.output_names
        checked = self.check_feeds(feeds)
        try:
            if self.io_binding:
                binding = self.session.io_binding()
                for name, arr in checked.items():
                    binding.bind_cpu_input(name, np.ascontiguousarray(arr))
                for name in names:
                    binding.bind_output(name, "cuda", self._device_id)
                self.session.run_with_iobinding(binding)
                values = binding.copy_outputs_to_cpu()
            else:
                values = self.session.run(names, checked)
        except Exception as exc:  # ORT raises its own types: one line, not a traceback
            from onnxpipe.core.session import run_failed

            raise run_failed(exc) from exc
        if self._probe:
            self._probe = False
            self.placement = profiled_placement(self.session.end_profiling())
        return dict(zip(names, values))

    def close(self) -> None:
        super().close()  # also removes the temporary directory


def _load_error(device: Device, exc: Exception) -> OnnxpipeError:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if "disable_cpu_ep_fallback" in text or "fallback to the CPU EP" in text or "could not be assigned" in text.lower():
        return OnnxpipeError(f"{device.label}: some nodes cannot run on {device.provider} and cpu_fallback is off ({first})",
                             hint="allow CPU fallback (drop cpu_fallback=false) or change the model")
    if device.kind == "tensorrt" and ("nvinfer" in text or "TensorRT" in text):
        return OnnxpipeError(f"{device.label}: TensorRT cannot be loaded ({first})", hint=TRT_HINT)
    return OnnxpipeError(f"ONNX Runtime cannot load the model on {device.label}: {first}",
                         hint="check the model with `onnxpipe inspect` and the device options")


def placement_of(model: str | os.PathLike | onnx.ModelProto, device: Device | str,
                 feeds: Mapping[str, np.ndarray] | None = None) -> Placement | None:
    """Nodes per provider for ``model`` on ``device`` (a profiled run on ``feeds`` on old ORT builds).

    Example:
        >>> placement_of("model.onnx", "cuda:0").summary()  # doctest: +SKIP
        'cuda 52, cpu 3 (Shape, Gather, Unsqueeze)'
    """
    with DeviceSession(model, device) as s:
        if s.placement is None and feeds is not None:
            s.run(feeds)
        return s.placement
