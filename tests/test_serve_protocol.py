"""The Open Inference Protocol codec, request checks, model discovery and Prometheus text, without a server."""

from __future__ import annotations

import json
import struct

import numpy as np
import onnx
import pytest
from conftest import conv_gemm_model
from onnx import helper

from onnxpipe.core.errors import InputError
from onnxpipe.core.tensors import TensorInfo
from onnxpipe.serve.metrics import Metrics
from onnxpipe.serve.protocol import (
    HEADER,
    InferRequest,
    ProtocolError,
    check_inputs,
    decode_request,
    encode_response,
)
from onnxpipe.serve.repository import discover

X = TensorInfo("x", ["N", 3], np.dtype("float32"))
IDS = TensorInfo("ids", ["N", "S"], np.dtype("int64"))


def binary_body(doc: dict, blobs: list[bytes]) -> tuple[bytes, int]:
    head = json.dumps(doc).encode()
    return head + b"".join(blobs), len(head)


def test_json_tensors_nested_or_flat():
    flat = decode_request(json.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32",
                                                  "data": [1, 2, 3, 4, 5, 6]}]}).encode())
    nested = decode_request(json.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32",
                                                    "data": [[1, 2, 3], [4, 5, 6]]}]}).encode())
    np.testing.assert_array_equal(flat.inputs["x"], nested.inputs["x"])
    assert flat.inputs["x"].dtype == np.float32 and flat.inputs["x"].shape == (2, 3)


def test_binary_extension_round_trip_with_bytes_and_json_mixed():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    words = [b"ab", b"", b"\xff\x00z"]
    packed = b"".join(struct.pack("<I", len(w)) + w for w in words)
    doc = {"id": "r1", "inputs": [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}},
        {"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": [7, 8]},
        {"name": "s", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(packed)}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}]}
    body, n = binary_body(doc, [x.tobytes(), packed])
    req = decode_request(body, str(n))
    np.testing.assert_array_equal(req.inputs["x"], x)
    assert req.inputs["ids"].tolist() == [[7, 8]] and req.inputs["s"].tolist() == words
    assert req.outputs == ["y", "z"] and req.wants_binary("y") and not req.wants_binary("z")

    y = rng.standard_normal((2, 4)).astype(np.float16)
    z = np.array([[True, False]])
    out, head = encode_response("m", "1", {"y": y, "z": z}, req)
    meta = json.loads(out[:head])
    assert meta["id"] == "r1" and meta["outputs"][0]["parameters"]["binary_data_size"] == y.nbytes
    np.testing.assert_array_equal(np.frombuffer(out[head:], np.float16).reshape(2, 4), y)
    assert meta["outputs"][1] == {"name": "z", "datatype": "BOOL", "shape": [1, 2], "data": [True, False]}


def test_all_binary_by_request_parameter():
    req = InferRequest({}, binary_default=True)
    out, head = encode_response("m", "1", {"y": np.arange(3, dtype=np.int32)}, req)
    assert head is not None and np.frombuffer(out[head:], np.int32).tolist() == [0, 1, 2]


@pytest.mark.parametrize("body, header, needle", [
    (b"{not json", None, "malformed JSON"),
    (b'{"inputs": []}', None, "non-empty 'inputs'"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}', None, "needs 2 values"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]}', None, "unknown datatype"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [1.5]}]}', None, "must be integers"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}', None, "must be numbers"),
    (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}]}', None, "integers >= 0"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}1234',
     "json", "does not fit"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}1234',
     "json", "needs 8 bytes"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}', "9999", "the body has"),
])
def test_malformed_requests_are_400_with_a_reason(body, header, needle):
    if header == "json":  # the JSON ends where the binary tensor data begins
        header = str(body.rindex(b"}") + 1)
    with pytest.raises(ProtocolError) as err:
        decode_request(body, header)
    assert err.value.status == 400 and needle in err.value.message


def test_binary_header_length_is_checked_against_the_json():
    doc = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}
    body, n = binary_body(doc, [np.float32(3).tobytes() + b"junk"])
    with pytest.raises(ProtocolError, match="belong to no input"):
        decode_request(body, n)
    assert HEADER == "Inference-Header-Content-Length"


@pytest.mark.parametrize("inputs, outputs, needle", [
    ({"x": np.zeros((1, 3), np.float32), "q": np.zeros(1, np.float32)}, None, "has no input 'q'"),
    ({}, None, "missing input 'x'"),
    ({"x": np.zeros((1, 3), np.float64)}, None, "expected datatype FP32, received FP64"),
    ({"x": np.zeros((1, 4), np.float32)}, None, "expected shape [-1, 3], received [1, 4]"),
    ({"x": np.zeros((3,), np.float32)}, None, "expected shape [-1, 3], received [3]"),
    ({"x": np.zeros((1, 3), np.float32)}, ["nope"], "has no output 'nope'"),
])
def test_requests_checked_against_the_model(inputs, outputs, needle):
    with pytest.raises(ProtocolError) as err:
        check_inputs(InferRequest(inputs, outputs=outputs), [X], ["y"], "m")
    assert err.value.status == 400 and needle in err.value.message


def test_dynamic_non_batch_dims_accept_any_size():
    check_inputs(InferRequest({"ids": np.zeros((2, 17), np.int64)}), [IDS], ["y"], "m")


def _fixed_batch_model() -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Relu", ["a"], ["b"])], "g",
                          [helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1, 4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_discover_mixed_layouts(tmp_path):
    onnx.save(conv_gemm_model(), tmp_path / "cnn.onnx")
    (tmp_path / "relu" / "1").mkdir(parents=True)
    (tmp_path / "relu" / "3").mkdir()
    onnx.save(_fixed_batch_model(), tmp_path / "relu" / "1" / "model.onnx")
    onnx.save(_fixed_batch_model(), tmp_path / "relu" / "3" / "model.onnx")
    (tmp_path / "notes").mkdir()
    got = {e.name: e for e in discover(tmp_path)}
    assert sorted(got) == ["cnn", "relu"]
    assert got["relu"].version == "3" and not got["relu"].batch_axis
    assert got["cnn"].batchable and got["cnn"].output_names == ["y"]


def test_discover_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        discover(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="no models"):
        discover(tmp_path)
    onnx.save(conv_gemm_model(), tmp_path / "a.onnx")
    (tmp_path / "a").mkdir()
    onnx.save(conv_gemm_model(), tmp_path / "a" / "model.onnx")
    with pytest.raises(InputError, match="two models are named 'a'"):
        discover(tmp_path)
    with pytest.raises(InputError, match="--name applies to a single"):
        discover(tmp_path, "x")
    with pytest.raises(InputError, match="not allowed in a URL"):
        discover(tmp_path / "a.onnx", "bad/name")


def test_prometheus_text():
    m = Metrics(max_batch=8)
    m.requests.inc(model="m", status="success")
    for size in (1, 3, 8, 9):
        m.batch_size.observe(size, model="m")
    m.queue_depth.set(4, model='we"ird')
    text = m.render()
    assert 'onnxpipe_requests_total{model="m",status="success"} 1' in text
    assert 'onnxpipe_batch_size_bucket{model="m",le="2"} 1' in text
    assert 'onnxpipe_batch_size_bucket{model="m",le="8"} 3' in text
    assert 'onnxpipe_batch_size_bucket{model="m",le="+Inf"} 4' in text
    assert 'onnxpipe_batch_size_sum{model="m"} 21' in text
    assert 'onnxpipe_queue_depth{model="we\\"ird"} 4' in text
    assert "# TYPE onnxpipe_batch_size histogram" in text


@pytest.mark.parametrize("data, datatype, needle", [
    ([300], "INT8", "outside -128..127"),
    ([True, False], "FP32", "must be numbers"),
    ([1, "2"], "FP32", "must be numbers"),
    ([1.0, 0.0], "BOOL", "true or false"),
    ([1 << 70, 1], "INT64", "INT64 data must be integers"),  # orjson reads it as a float
    ([None, 1.0], "FP32", "must be numbers"),
])
def test_json_values_of_the_wrong_kind_are_refused_not_converted(data, datatype, needle):
    body = json.dumps({"inputs": [{"name": "x", "shape": [len(data)], "datatype": datatype, "data": data}]}).encode()
    with pytest.raises(ProtocolError) as err:
        decode_request(body)
    assert err.value.status == 400 and needle in err.value.message


def test_json_ragged_nesting_nan_and_round_trip():
    body = b'{"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [[1, 2], [3], NaN]}]}'
    x = decode_request(body).inputs["x"]  # row-major nesting of any shape; NaN as Python's json writes it
    assert x.dtype == np.float32 and x[:3].tolist() == [1, 2, 3] and np.isnan(x[3])
    out, head = encode_response("m", "1", {"y": np.array([[0.1, np.nan]], np.float32),
                                           "k": np.arange(3, dtype=np.int8)}, InferRequest({}))
    assert head is None and b"NaN" in out
    doc = json.loads(out)
    assert doc["outputs"][0]["data"][0] == pytest.approx(0.1) and doc["outputs"][1]["data"] == [0, 1, 2]
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    out, _ = encode_response("m", "1", {"y": x}, InferRequest({}))
    np.testing.assert_array_equal(np.array(json.loads(out)["outputs"][0]["data"], np.float32), x)  # exact in float32


def test_grpc_typed_contents_and_raw_contents_decode_alike():
    pytest.importorskip("grpc")
    from onnxpipe.serve.grpc_proto import oip_pb2 as pb
    from onnxpipe.serve.grpc_server import decode_infer, encode_infer

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids = np.array([[7, 8]], np.int64)
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP32", shape=[2, 3]).contents.fp32_contents.extend(x.reshape(-1).tolist())
    typed.inputs.add(name="ids", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([7, 8])
    raw = pb.ModelInferRequest(model_name="m", raw_input_contents=[x.tobytes(), ids.tobytes()])
    raw.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    raw.inputs.add(name="ids", datatype="INT64", shape=[1, 2])
    for msg in (typed, raw):
        req = decode_infer(msg, 1 << 20)
        np.testing.assert_array_equal(req.inputs["x"], x)
        np.testing.assert_array_equal(req.inputs["ids"], ids)
    huge = pb.ModelInferRequest(model_name="m", raw_input_contents=[x.tobytes()])
    huge.inputs.add(name="x", datatype="FP32", shape=[1 << 20, 1 << 20])
    with pytest.raises(ProtocolError) as err:
        decode_infer(huge, 1 << 20)
    assert err.value.status == 413
    resp = encode_infer("m", "1", {"y": x}, "r")
    assert resp.id == "r" and np.frombuffer(resp.raw_output_contents[0], np.float32).tolist() == x.reshape(-1).tolist()
