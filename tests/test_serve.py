"""The server through the real ``tritonclient[http]`` client: health, metadata, infer, batching, errors, recovery."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import numpy as np
import onnx
import pytest
from conftest import conv_gemm_model, run_cli, serving, triton_client
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("aiohttp")
httpclient = pytest.importorskip("tritonclient.http")
ort = pytest.importorskip("onnxruntime")


ATOL = 1e-5


def pair_model() -> onnx.ModelProto:
    """Two inputs with a dynamic sequence axis, two outputs: s = sum(x * mask, axis 1), m = x + mask."""
    g = helper.make_graph(
        [helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "mf"], ["xm"]),
         helper.make_node("ReduceSum", ["xm", "axes"], ["s"], keepdims=0),
         helper.make_node("Add", ["x", "mf"], ["m"])],
        "pair",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S"]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", "S"])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", "S"])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def int8_model(path_fp32, path_int8) -> None:
    """A two-layer MatMul net, dynamically quantized to int8 by ONNX Runtime."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(1)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((64, 8)).astype(np.float32), "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path_fp32)
    quantize_dynamic(str(path_fp32), str(path_int8), weight_type=QuantType.QInt8)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    models = root / "models"
    models.mkdir()
    onnx.save(conv_gemm_model(), models / "cnn.onnx")
    onnx.save(pair_model(), models / "pair.onnx")
    int8_model(root / "mlp_fp32.onnx", models / "int8.onnx")
    return models


@pytest.fixture(scope="module")
def server(repo):
    with serving(repo, "cpu:0[threads=1],cpu:1[threads=1]", max_batch_size=16, max_queue_delay_ms=20,
                 max_body_bytes=1 << 20) as running:
        yield running


@pytest.fixture
def client(server):
    with triton_client(server[0]) as c:
        yield c


def ort_run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def infer_input(name, arr, binary=True):
    i = httpclient.InferInput(name, list(arr.shape), {np.float32: "FP32", np.int64: "INT64"}[arr.dtype.type])
    i.set_data_from_numpy(arr, binary_data=binary)
    return i


def http(url, path, body=None, headers=None):
    req = urllib.request.Request(url + path, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_health_metadata_index_and_config(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "onnxpipe"
    assert all(client.is_model_ready(m) for m in ("cnn", "pair", "int8"))
    meta = client.get_model_metadata("pair")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, -1]},
                              {"name": "mask", "datatype": "INT64", "shape": [-1, -1]}]
    assert [o["name"] for o in meta["outputs"]] == ["s", "m"]
    assert client.get_model_metadata("cnn", "1")["versions"] == ["1"]
    index = client.get_model_repository_index()
    assert {m["name"]: m["state"] for m in index} == {"cnn": "READY", "int8": "READY", "pair": "READY"}
    config = client.get_model_config("cnn")
    assert config["max_batch_size"] == 16 and config["input"][0]["dims"] == [3, 8, 8]


@pytest.mark.parametrize("binary", [True, False])
def test_infer_matches_onnx_runtime(client, repo, binary):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    got = client.infer("cnn", [infer_input("x", x, binary)],
                       outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)], request_id="r7")
    assert got.get_response()["id"] == "r7"
    np.testing.assert_allclose(got.as_numpy("y"), ort_run(repo / "cnn.onnx", {"x": x})["y"], atol=ATOL, rtol=0)
    for seq in (5, 11):  # several inputs and outputs, a dynamic non-batch axis
        feeds = {"x": rng.standard_normal((2, seq)).astype(np.float32), "mask": rng.integers(0, 2, (2, seq))}
        res = client.infer("pair", [infer_input(k, v, binary) for k, v in feeds.items()])
        ref = ort_run(repo / "pair.onnx", feeds)
        for name in ("s", "m"):
            np.testing.assert_allclose(res.as_numpy(name), ref[name], atol=ATOL, rtol=0)
    only = client.infer("pair", [infer_input(k, v) for k, v in feeds.items()],
                        outputs=[httpclient.InferRequestedOutput("m")])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["m"]


def test_infer_matches_onnxpipe_infer(client, repo, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    r = run_cli("infer", str(repo / "cnn.onnx"), "--data", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out"),
                "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    from onnxpipe.runtimes.manifest import load_outputs

    expected = load_outputs(tmp_path / "out")["y"]
    served = np.concatenate([client.infer("cnn", [infer_input("x", x[i:i + 2])]).as_numpy("y") for i in (0, 2, 4)])
    np.testing.assert_allclose(served, expected, atol=ATOL, rtol=0)


def batch_stats(srv, model):
    h = srv.metrics.batch_requests
    return h.count(model=model), h.total(model=model)


def test_dynamic_batching_stacks_concurrent_requests_and_splits_back(client, server, repo):
    srv = server[1]
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((int(rng.integers(1, 4)), 3, 8, 8)).astype(np.float32) for _ in range(40)]
    before = batch_stats(srv, "cnn")
    pending = [client.async_infer("cnn", [infer_input("x", x)]) for x in xs]
    results = [p.get_result(timeout=60).as_numpy("y") for p in pending]
    for x, y in zip(xs, results):
        np.testing.assert_allclose(y, ort_run(repo / "cnn.onnx", {"x": x})["y"], atol=ATOL, rtol=0)
    batches, requests = (a - b for a, b in zip(batch_stats(srv, "cnn"), before))
    assert requests == 40 and batches < 40, f"{requests} requests ran in {batches} batches: nothing was batched"
    assert srv.metrics.batch_size.total(model="cnn") >= sum(len(x) for x in xs)


def test_int8_model_serves_and_each_request_gets_its_own_quantization(client, server, repo):
    srv = server[1]
    rng = np.random.default_rng(6)
    # very different scales: stacked together, dynamic quantization would share one scale
    xs = [(rng.standard_normal((2, 64)) * 10.0 ** (k % 3)).astype(np.float32) for k in range(12)]
    before = batch_stats(srv, "int8")
    pending = [client.async_infer("int8", [infer_input("x", x)]) for x in xs]
    for x, p in zip(xs, pending):
        ref = ort_run(repo / "int8.onnx", {"x": x})["y"]
        np.testing.assert_allclose(p.get_result(timeout=60).as_numpy("y"), ref, rtol=1e-5, atol=1e-4)
    batches, requests = (a - b for a, b in zip(batch_stats(srv, "int8"), before))
    assert batches == requests == 12
    ops = {n.op_type for n in onnx.load(repo / "int8.onnx").graph.node}
    assert "DynamicQuantizeLinear" in ops


def test_bad_requests_get_protocol_errors_and_the_server_keeps_serving(client, server):
    url = server[0]
    x = np.zeros((1, 3, 8, 8), np.float32)
    cases = [
        (lambda: client.infer("nope", [infer_input("x", x)]), "unknown model 'nope'"),
        (lambda: client.infer("cnn", [infer_input("x", x)], model_version="9"), "no version '9'"),
        (lambda: client.infer("cnn", [infer_input("z", x)]), "has no input 'z'"),
        (lambda: client.infer("cnn", [infer_input("x", np.zeros((1, 3, 8, 9), np.float32))]),
         "expected shape [-1, 3, 8, 8], received [1, 3, 8, 9]"),
        (lambda: client.infer("cnn", [infer_input("x", x.astype(np.int64))]), "expected datatype FP32, received INT64"),
    ]
    for call, needle in cases:
        with pytest.raises(Exception) as err:
            call()
        assert needle in str(err.value)
    status, body = http(url, "/v2/models/cnn/infer", b'{"inputs": [', {"Content-Type": "application/json"})
    assert status == 400 and "malformed JSON" in json.loads(body)["error"]
    big = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.0] * 300_000}]}).encode()
    status, body = http(url, "/v2/models/cnn/infer", big)
    assert status == 413 and "over the limit" in json.loads(body)["error"]
    status, body = http(url, "/v2/nothing/here")
    assert status == 404 and "error" in json.loads(body)
    assert client.is_server_ready()
    np.testing.assert_allclose(client.infer("cnn", [infer_input("x", x)]).as_numpy("y").shape, (1, 10))
    status, text = http(url, "/metrics")
    assert status == 200 and 'onnxpipe_request_errors_total{model="cnn",status="400"}' in text.decode()


def test_a_killed_worker_is_restarted_while_the_other_serves(client, server, repo):
    srv = server[1]
    pool = srv.models["cnn"].pool
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGKILL)
    rng = np.random.default_rng(8)
    xs = [rng.standard_normal((2, 3, 8, 8)).astype(np.float32) for _ in range(10)]
    pending = [client.async_infer("cnn", [infer_input("x", x)]) for x in xs]
    for x, p in zip(xs, pending):
        np.testing.assert_allclose(p.get_result(timeout=60).as_numpy("y"),
                                   ort_run(repo / "cnn.onnx", {"x": x})["y"], atol=ATOL, rtol=0)
    deadline = time.monotonic() + 60
    while pool.ready_workers() < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool.ready_workers() == 2 and pool.pids()[0] != victim
    assert srv.metrics.restarts.value(model="cnn", device="cpu:0") >= 1
    assert client.is_server_ready()
