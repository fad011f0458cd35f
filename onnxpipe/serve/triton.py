"""Triton model repositories: ``REPO/NAME/1/model.onnx`` and a ``config.pbtxt`` written from the model.

The config names every input and output with its datatype and dims (the batch axis left out
when the model batches), the max batch size and dynamic batching, one instance group per listed
GPU (and one for CPU devices), and for ``tensorrt`` devices the ONNX Runtime backend's TensorRT
accelerator with its precision and engine cache settings.

Example:
    >>> export_triton("model.onnx", "repo", "digits", devices="tensorrt:0[fp16,cache_dir=/trt]")  # doctest: +SKIP
    PosixPath('repo/digits/config.pbtxt')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpipe.core.errors import InputError
from onnxpipe.core.files import atomic_output
from onnxpipe.core.modelio import load_model, save_model
from onnxpipe.core.tensors import TensorInfo
from onnxpipe.runtimes.device_options import CudaOptions, TensorrtOptions
from onnxpipe.runtimes.providers import Device, parse_devices
from onnxpipe.serve.repository import ModelEntry, check_name
from onnxpipe.serve.wire import datatype_of


class Enum(str):
    """A protobuf enum value: written bare in text format (``TYPE_FP32``), as a string in JSON."""


class Map(dict):
    """A protobuf map field: written as repeated ``{ key: ... value: ... }`` entries in text format."""


def config_type(dtype: np.dtype) -> Enum:
    """``float32`` -> ``TYPE_FP32`` (Triton's ``DataType``; BYTES is ``TYPE_STRING``).

    Example:
        >>> config_type(np.dtype("int64"))
        'TYPE_INT64'
    """
    name = datatype_of(dtype)
    return Enum("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}")


def _tensor(info: TensorInfo, batched: bool, model: str) -> dict[str, Any]:
    if info.shape is None:
        raise InputError(f"model {model!r}: {info.name!r} has no known rank, which Triton's config needs",
                         hint="run `onnxpipe optimize` (shape inference) or export the model with output shapes")
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in info.shape]
    dims = dims[1:] if batched else dims
    entry: dict[str, Any] = {"name": info.name, "data_type": config_type(info.dtype), "dims": dims or [1]}
    if not dims:  # Triton needs a dim: a scalar travels as [1] and is reshaped back
        entry["reshape"] = {"shape": []}
    return entry


def _trt_parameters(opts: TensorrtOptions, name: str) -> Map:
    precision = "INT8" if opts.int8 else "FP16" if opts.fp16 else "FP32"
    params = Map(precision_mode=precision)
    cache = opts.cache_dir or f"/tmp/trt-cache/{name}"  # without a cache Triton rebuilds engines on every load
    params.update(trt_engine_cache_enable="1", trt_engine_cache_path=cache,
                  trt_timing_cache_enable="1", trt_timing_cache_path=cache)
    if opts.int8_table:
        params["int8_calibration_table_name"] = opts.int8_table
    if opts.workspace is not None:
        params["max_workspace_size_bytes"] = str(int(opts.workspace))
    if opts.builder_level is not None:
        params["trt_builder_optimization_level"] = str(opts.builder_level)
    for key, shapes in (("min", opts.min_shapes), ("opt", opts.opt_shapes), ("max", opts.max_shapes)):
        if shapes:
            params[f"trt_profile_{key}_shapes"] = ",".join(f"{n}:{'x'.join(map(str, s))}" for n, s in shapes.items())
    return params


def model_config(entry: ModelEntry, devices: list[Device] | None = None, *, max_batch_size: int = 32,
                 max_queue_delay_ms: float = 2.0, instances: int = 1) -> dict[str, Any]:
    """Triton's ``ModelConfig`` for ``entry`` as a dict (JSON field names; see :func:`to_pbtxt`).

    Raises:
        InputError: a tensor of unknown rank, TensorRT devices mixed with other GPUs or with
            different options (Triton sets the accelerator per model, not per instance).

    Example:
        >>> model_config(entry, [Device.parse("cuda:0")])["instance_group"]  # doctest: +SKIP
        [{'count': 1, 'kind': 'KIND_GPU', 'gpus': [0]}]
    """
    devices = devices or [Device.parse("cpu")]
    batched = entry.batch_axis and max_batch_size > 0
    config: dict[str, Any] = {
        "name": entry.name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
        "max_batch_size": max_batch_size if batched else 0,
        "input": [_tensor(i, batched, entry.name) for i in entry.inputs],
        "output": [_tensor(o, batched, entry.name) for o in entry.outputs],
    }
    if batched and max_batch_size > 1 and not entry.cross_sample:  # see ModelEntry.cross_sample
        config["dynamic_batching"] = {"max_queue_delay_microseconds": round(max_queue_delay_ms * 1000)}
    groups: list[dict[str, Any]] = []
    cpus = sum(1 for d in devices if d.kind == "cpu")
    for d in devices:
        if d.is_gpu:
            groups.append({"count": instances, "kind": Enum("KIND_GPU"), "gpus": [d.index]})
    if cpus:
        groups.append({"count": instances * cpus, "kind": Enum("KIND_CPU")})
    config["instance_group"] = groups
    trt = [d for d in devices if d.kind == "tensorrt"]
    if trt:
        others = [d.label for d in devices if d.kind == "cuda"]
        if others:
            raise InputError(f"Triton sets the TensorRT accelerator for every GPU instance, but {', '.join(others)} "
                             "are listed as plain cuda", hint="list only tensorrt devices, or only cuda ones")
        if len({str(Device(d.kind, 0, d.options)) for d in trt}) > 1:
            raise InputError("the tensorrt devices have different options, and Triton takes one set per model",
                             hint="give every tensorrt device the same options")
        assert isinstance(trt[0].options, TensorrtOptions)
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
            {"name": "tensorrt", "parameters": _trt_parameters(trt[0].options, entry.name)}]}}
    gpu = next((d for d in devices if d.is_gpu), None)
    if gpu is not None and isinstance(gpu.options, CudaOptions) and gpu.options.cudnn != "exhaustive":
        algo = {"heuristic": "1", "default": "2"}[gpu.options.cudnn]
        config["parameters"] = Map(cudnn_conv_algo_search={"string_value": algo})
    return config


def _scalar(v: Any) -> str:
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    text = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _fields(msg: dict[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    out: list[str] = []
    for key, v in msg.items():
        if isinstance(v, Map):
            for k, item in v.items():
                value = "{ " + " ".join(_fields(item, 0)) + " }" if isinstance(item, dict) else _scalar(item)
                out.append(f"{pad}{key} {{ key: {_scalar(k)} value: {value} }}")
        elif isinstance(v, dict):
            out += [f"{pad}{key} {{", *_fields(v, indent + 1), f"{pad}}}"]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.append(f"{pad}{key} [")
            for i, x in enumerate(v):
                out += [f"{pad}  {{", *_fields(x, indent + 2), f"{pad}  }}" + ("," if i < len(v) - 1 else "")]
            out.append(f"{pad}]")
        elif isinstance(v, list):
            out.append(f"{pad}{key}: [ {', '.join(_scalar(x) for x in v)} ]")
        else:
            out.append(f"{pad}{key}: {_scalar(v)}")
    return out


def to_pbtxt(config: dict[str, Any]) -> str:
    """Protobuf text format of a :func:`model_config` dict (what Triton reads as ``config.pbtxt``).

    Example:
        >>> print(to_pbtxt({"name": "m", "max_batch_size": 8}))
        name: "m"
        max_batch_size: 8
        <BLANKLINE>
    """
    return "\n".join(_fields(config, 0)) + "\n"


def export_triton(model: str | os.PathLike | onnx.ModelProto, repo: str | os.PathLike, name: str, *,
                  devices: Any = "cpu", max_batch_size: int = 32, max_queue_delay_ms: float = 2.0,
                  version: int = 1, instances: int = 1) -> Path:
    """Write ``repo/name/<version>/model.onnx`` and ``repo/name/config.pbtxt``; return the config's path.

    Output shapes the model leaves undeclared are filled in by ONNX shape inference first.

    Raises:
        InputError: a bad name or version, tensors of unknown rank, device lists Triton cannot express.
    """
    if version < 1:
        raise InputError(f"version must be >= 1, received {version}", hint="use e.g. --version 1")
    if max_batch_size < 0 or instances < 1:
        raise InputError("max batch size must be >= 0 and instances >= 1", hint="e.g. --max-batch-size 32")
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model, load_external_data=False)
    if any(not o.type.tensor_type.HasField("shape") for o in proto.graph.output):
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
        shapes = {o.name: o for o in inferred.graph.output}
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        for o in proto.graph.output:
            if not o.type.tensor_type.HasField("shape") and shapes[o.name].type.tensor_type.HasField("shape"):
                o.CopyFrom(shapes[o.name])
    folder = Path(repo) / check_name(name)
    entry = ModelEntry.from_proto(proto, name, str(version), folder / str(version) / "model.onnx")
    devs = parse_devices(devices)
    config = model_config(entry, devs, max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
                          instances=instances)
    save_model(proto, folder / str(version) / "model.onnx")
    path = folder / "config.pbtxt"
    with atomic_output(path) as tmp:
        (tmp / path.name).write_text(to_pbtxt(config))
    return path
