"""``export-triton``: the repository layout, and config.pbtxt parsed back with Triton's own protobuf schema."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import conv_gemm_model, run_cli
from onnx import TensorProto, helper

from onnxpipe.core.errors import InputError
from onnxpipe.serve.triton import export_triton

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def fixed_model() -> onnx.ModelProto:
    """Fixed batch of 1, an int64 input and a scalar output with no declared shape."""
    g = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT), helper.make_node("ReduceSum", ["f"], ["total"], keepdims=0)],
        "fixed", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 16])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, None)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_gpu_instances_and_batching_match_the_model(tmp_path):
    src = tmp_path / "cnn.onnx"
    onnx.save(conv_gemm_model(), src)
    path = export_triton(src, tmp_path / "repo", "digits", devices="cuda:0,cuda:1", max_batch_size=64,
                         max_queue_delay_ms=1.5, version=2)
    assert path == tmp_path / "repo" / "digits" / "config.pbtxt"
    served = onnx.load(tmp_path / "repo" / "digits" / "2" / "model.onnx")
    assert served.graph == conv_gemm_model().graph
    cfg = parse(path)
    assert cfg.name == "digits" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    [x] = cfg.input
    [y] = cfg.output
    assert (x.name, x.data_type, list(x.dims)) == ("x", model_config_pb2.TYPE_FP32, [3, 8, 8])
    assert (y.name, y.data_type, list(y.dims)) == ("y", model_config_pb2.TYPE_FP32, [10])
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 1500
    assert [(g.kind, list(g.gpus), g.count) for g in cfg.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, [0], 1), (model_config_pb2.ModelInstanceGroup.KIND_GPU, [1], 1)]
    assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator


def test_tensorrt_accelerator_with_precision_and_engine_cache(tmp_path):
    src = tmp_path / "cnn.onnx"
    onnx.save(conv_gemm_model(), src)
    devices = "trt:0[fp16,cache_dir=/cache/trt,workspace=2GiB],trt:1[fp16,cache_dir=/cache/trt,workspace=2GiB]"
    cfg = parse(export_triton(src, tmp_path / "repo", "cnn", devices=devices, instances=2))
    [acc] = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt"
    assert dict(acc.parameters) == {
        "precision_mode": "FP16", "max_workspace_size_bytes": str(2 << 30),
        "trt_engine_cache_enable": "1", "trt_engine_cache_path": "/cache/trt",
        "trt_timing_cache_enable": "1", "trt_timing_cache_path": "/cache/trt"}
    assert [(list(g.gpus), g.count) for g in cfg.instance_group] == [([0], 2), ([1], 2)]
    int8 = parse(export_triton(src, tmp_path / "repo", "cnn8", devices="tensorrt:0[int8,int8_table=calib.flatbuffers]"))
    params = dict(int8.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters)
    assert params["precision_mode"] == "INT8" and params["int8_calibration_table_name"] == "calib.flatbuffers"
    assert params["trt_engine_cache_path"] == "/tmp/trt-cache/cnn8"


def test_fixed_batch_model_gets_full_dims_and_inferred_scalar_output(tmp_path):
    src = tmp_path / "fixed.onnx"
    onnx.save(fixed_model(), src)
    cfg = parse(export_triton(src, tmp_path / "repo", "fixed", devices="cpu:0,cpu:1"))
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [1, 16] and cfg.input[0].data_type == model_config_pb2.TYPE_INT64
    assert list(cfg.output[0].dims) == [1] and list(cfg.output[0].reshape.shape) == []
    [group] = cfg.instance_group
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU and group.count == 2


def test_devices_triton_cannot_express_are_refused(tmp_path):
    src = tmp_path / "cnn.onnx"
    onnx.save(conv_gemm_model(), src)
    with pytest.raises(InputError, match="only tensorrt devices, or only cuda"):
        export_triton(src, tmp_path / "r", "m", devices="tensorrt:0,cuda:1")
    with pytest.raises(InputError, match="different options"):
        export_triton(src, tmp_path / "r", "m", devices="tensorrt:0[fp16],tensorrt:1")
    with pytest.raises(InputError, match="not allowed in a URL"):
        export_triton(src, tmp_path / "r", "a b")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*.onnx"))


def test_export_triton_command(tmp_path):
    src = tmp_path / "cnn.onnx"
    onnx.save(conv_gemm_model(), src)
    r = run_cli("export-triton", str(src), "-o", str(tmp_path / "repo"), "--name", "digits", "--devices", "cuda:0[cudnn=heuristic]",
                "--max-batch-size", "8")
    assert r.returncode == 0, r.stderr
    cfg = parse(tmp_path / "repo" / "digits" / "config.pbtxt")
    assert cfg.max_batch_size == 8 and cfg.parameters["cudnn_conv_algo_search"].string_value == "1"
    assert np.array_equal(list(cfg.input[0].dims), [3, 8, 8])
    r = run_cli("export-triton", str(src), "-o", str(tmp_path / "repo"), "--name", "x", "--devices", "tensorrt:0,cuda:0")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
