"""gRPC beside HTTP, API keys, and the model repository extension, through the real ``tritonclient`` clients."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conv_gemm_model, residual_concat_model, run_cli, serving

pytest.importorskip("aiohttp")
grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
ort = pytest.importorskip("onnxruntime")

from test_serve import int8_model, pair_model

from onnxpipe.core.errors import InputError
from onnxpipe.partition.split import split_model
from onnxpipe.serve.protocol import ProtocolError
from onnxpipe.serve.security import authorized, check_bind, load_api_key
from onnxpipe.serve.server import InferenceServer, ServeOptions

KEY = "test-key-0123456789abcdef"
AUTH = {"authorization": f"Bearer {KEY}"}  # gRPC metadata keys are lower case; HTTP does not care
ATOL = 1e-5


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_grpc")
    models = root / "models"
    models.mkdir()
    onnx.save(conv_gemm_model(), models / "cnn.onnx")
    onnx.save(pair_model(), models / "pair.onnx")
    int8_model(root / "mlp_fp32.onnx", models / "int8.onnx")
    whole = residual_concat_model(batched_side=True)
    onnx.save(whole, root / "whole.onnx")
    assert split_model(whole, models / "net", cuts=["b"]).ok  # a split model: served stage by stage
    return models


@pytest.fixture(scope="module")
def server(repo):
    with serving(repo, "cpu[threads=1]", max_batch_size=8, max_queue_delay_ms=5, max_body_bytes=1 << 20,
                 grpc_port=0, api_key=KEY, model_control="explicit") as running:
        yield running


@pytest.fixture(scope="module")
def clients(server):
    url, srv = server
    h = httpclient.InferenceServerClient(url.removeprefix("http://"), concurrency=4, network_timeout=60)
    g = grpcclient.InferenceServerClient(srv.grpc_address)
    yield h, g
    h.close()
    g.close()


def ort_outputs(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def feeds_for(model: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if model == "cnn":
        return {"x": rng.standard_normal((3, 3, 8, 8)).astype(np.float32)}
    if model == "pair":
        return {"x": rng.standard_normal((2, 5)).astype(np.float32), "mask": rng.integers(0, 2, (2, 5)).astype(np.int64)}
    if model == "int8":
        return {"x": (rng.standard_normal((2, 64)) * 3).astype(np.float32)}
    return {"x": rng.standard_normal((2, 8, 8, 8)).astype(np.float32), "z": rng.standard_normal((2, 3)).astype(np.float32)}


def infer(client, module, model: str, feeds: dict[str, np.ndarray], binary: bool = True, **kw) -> dict[str, np.ndarray]:
    inputs = []
    for name, arr in feeds.items():
        i = module.InferInput(name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT64")
        if module is httpclient:
            i.set_data_from_numpy(arr, binary_data=binary)
        else:
            i.set_data_from_numpy(arr)
        inputs.append(i)
    result = client.infer(model, inputs, headers=dict(AUTH), **kw)  # tritonclient.http writes into the dict it gets
    names = [o["name"] if isinstance(o, dict) else o.name for o in result.get_response(**(
        {"as_json": True} if module is grpcclient else {}))["outputs"]]
    return {n: result.as_numpy(n) for n in names}


@pytest.mark.parametrize("model", ["cnn", "pair", "int8", "net"])
def test_grpc_and_http_give_what_onnx_runtime_gives(clients, repo, model):
    h, g = clients
    rng = np.random.default_rng(hash(model) % 1000)
    feeds = feeds_for(model, rng)
    path = repo / "net" if model == "net" else repo / f"{model}.onnx"
    ref = ort_outputs(repo.parent / "whole.onnx" if model == "net" else path, feeds)
    for got in (infer(g, grpcclient, model, feeds), infer(h, httpclient, model, feeds, binary=True),
                infer(h, httpclient, model, feeds, binary=False)):
        assert set(got) == set(ref)
        for name in ref:  # int8 too: the server runs each int8 request alone, as ORT does here
            np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=ATOL)


def test_grpc_metadata_health_statistics_and_errors(clients):
    _, g = clients
    assert g.is_server_live() and g.is_server_ready()  # health needs no key
    assert g.is_model_ready("cnn", headers=AUTH)
    meta = g.get_model_metadata("pair", headers=AUTH, as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("x", "FP32", ["-1", "-1"]),
                                                                               ("mask", "INT64", ["-1", "-1"])]
    cfg = g.get_model_config("cnn", headers=AUTH, as_json=True)["config"]
    assert cfg["max_batch_size"] == 8 and cfg["input"][0]["data_type"] == "TYPE_FP32"
    assert "model_repository" in g.get_server_metadata(headers=AUTH).extensions
    infer(g, grpcclient, "cnn", feeds_for("cnn", np.random.default_rng(0)))
    stats = g.get_inference_statistics("cnn", headers=AUTH, as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) >= 3 and int(stats["inference_stats"]["success"]["count"]) >= 1
    with pytest.raises(Exception, match="unknown model 'nope'"):
        infer(g, grpcclient, "nope", {"x": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(Exception, match=r"expected shape \[-1, 3, 8, 8\], received \[1, 3, 8, 9\]"):
        infer(g, grpcclient, "cnn", {"x": np.zeros((1, 3, 8, 9), np.float32)})
    assert g.is_server_ready()


def _status(url: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url + path, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_without_the_key_requests_get_401_and_never_reach_a_worker(server, clients):
    url, srv = server
    _, g = clients
    batches = srv.metrics.batch_size.count(model="cnn")
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]}).encode()
    for path, data, headers in [("/v2/models/cnn/infer", body, {}), ("/v2/models/cnn/infer", body, {"Authorization": "Bearer wrong"}),
                                ("/v2/models/cnn", None, {}), ("/metrics", None, {}), ("/v2/repository/index", None, {}),
                                ("/v2/repository/models/cnn/unload", b"{}", {"Authorization": KEY})]:
        status, text = _status(url, path, data, headers)
        assert status == 401 and "API key" in json.loads(text)["error"], path
    assert _status(url, "/v2/health/ready")[0] == 200 and _status(url, "/v2/health/live")[0] == 200
    x = grpcclient.InferInput("x", [1, 3, 8, 8], "FP32")
    x.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    for headers in (None, {"authorization": "Bearer nope"}):
        with pytest.raises(Exception) as err:
            g.infer("cnn", [x], headers=headers)
        assert "UNAUTHENTICATED" in str(err.value)
    assert srv.metrics.batch_size.count(model="cnn") == batches  # nothing ran
    assert "cnn" in srv.models and srv.models["cnn"].batcher.pending() == 0


def test_api_key_sources_and_the_bind_rule(tmp_path):
    (tmp_path / "key").write_text(KEY + "\n")
    assert load_api_key(tmp_path / "key", env={}) == KEY
    assert load_api_key(None, env={"ONNXPIPE_API_KEY": KEY}) == KEY and load_api_key(None, env={}) is None
    (tmp_path / "short").write_text("abc")
    with pytest.raises(InputError, match="at least 16"):
        load_api_key(tmp_path / "short", env={})
    assert authorized(f"bearer {KEY}", KEY) and not authorized(KEY, KEY) and not authorized(None, KEY)
    check_bind("127.0.0.1", None, False)
    check_bind("0.0.0.0", KEY, False)
    check_bind("0.0.0.0", None, True)
    with pytest.raises(InputError, match="no API key is set"):
        check_bind("0.0.0.0", None, False)
    onnx.save(conv_gemm_model(), tmp_path / "m.onnx")
    r = run_cli("serve", str(tmp_path / "m.onnx"), "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 2 and r.stderr.startswith("error: --host 0.0.0.0") and "Traceback" not in r.stderr


def test_load_and_unload_while_other_models_serve(server, clients, repo):
    url, srv = server
    h, g = clients
    rng = np.random.default_rng(11)
    failures, done = [], [0]
    stop = threading.Event()

    def hammer(model: str, module) -> None:
        client = grpcclient.InferenceServerClient(srv.grpc_address) if module is grpcclient else \
            httpclient.InferenceServerClient(url.removeprefix("http://"))
        feeds = feeds_for(model, np.random.default_rng(1))
        for _ in range(2000):  # bounded; stopped long before
            if stop.is_set():
                break
            try:
                infer(client, module, model, feeds)
                done[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is a test failure
                failures.append(f"{model}: {exc}")
        client.close()

    threads = [threading.Thread(target=hammer, args=(m, mod)) for m, mod in
               (("cnn", grpcclient), ("cnn", httpclient), ("net", httpclient))]
    for t in threads:
        t.start()
    try:
        h.unload_model("pair", headers=AUTH)
        index = {r["name"]: r for r in h.get_model_repository_index(headers=AUTH)}
        assert index["pair"]["state"] == "UNAVAILABLE" and index["cnn"]["state"] == "READY"
        with pytest.raises(Exception, match="unknown model 'pair'"):
            infer(h, httpclient, "pair", feeds_for("pair", rng))
        g.load_model("pair", headers=AUTH)
        h.load_model("cnn", headers=AUTH)  # a reload of a model under load: the old copy drains, the new takes over
        g.unload_model("int8", headers=AUTH)
        g.load_model("int8", headers=AUTH)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures[:3]
    assert done[0] > 10
    feeds = feeds_for("pair", rng)
    np.testing.assert_allclose(infer(g, grpcclient, "pair", feeds)["s"], ort_outputs(repo / "pair.onnx", feeds)["s"],
                               atol=ATOL, rtol=0)
    with pytest.raises(Exception, match="no model 'ghost'"):
        h.load_model("ghost", headers=AUTH)
    index = {r.name: r.state for r in g.get_model_repository_index(headers=AUTH).models}
    assert index == {"cnn": "READY", "pair": "READY", "int8": "READY", "net": "READY"}


def test_model_control_none_refuses_load_and_unload(repo):
    srv = InferenceServer([], [], ServeOptions(port=0), source=repo)
    for call in (srv.load_model, srv.unload_model):
        with pytest.raises(ProtocolError, match="--model-control none") as err:
            asyncio.run(call("cnn"))
        assert err.value.status == 400


def test_poll_mode_follows_the_directory(tmp_path):
    onnx.save(conv_gemm_model(), tmp_path / "a.onnx")
    with serving(tmp_path, "cpu[threads=1]", model_control="poll", poll_seconds=0.2) as (url, _):
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))

        def states() -> dict[str, str]:
            return {r["name"]: r["state"] for r in client.get_model_repository_index()}

        def wait(want: dict[str, str]) -> None:
            deadline = time.monotonic() + 60
            while states() != want and time.monotonic() < deadline:
                time.sleep(0.1)
            assert states() == want

        wait({"a": "READY"})
        shutil.copy(tmp_path / "a.onnx", tmp_path / ".b.onnx")  # written aside, then renamed in: never half a file
        os.rename(tmp_path / ".b.onnx", tmp_path / "b.onnx")
        wait({"a": "READY", "b": "READY"})
        x = np.zeros((1, 3, 8, 8), np.float32)
        i = httpclient.InferInput("x", [1, 3, 8, 8], "FP32")
        i.set_data_from_numpy(x)
        assert client.infer("b", [i]).as_numpy("y").shape == (1, 10)
        os.remove(tmp_path / "a.onnx")
        wait({"b": "READY"})
        client.close()


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the resident size from /proc")
@pytest.mark.parametrize("count", [150, pytest.param(1000, marks=pytest.mark.slow)])
def test_hostile_requests_leave_the_server_serving_with_bounded_memory(server, clients, count):
    url, srv = server
    h, g = clients
    head = {"Content-Type": "application/json", **AUTH}

    def doc(**tensor) -> bytes:
        return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", **tensor}]}).encode()

    hostile = [
        ("/v2/models/cnn/infer", doc(shape=[1 << 20, 1 << 20, 1 << 20], data=[0.0]), head),
        ("/v2/models/cnn/infer", doc(shape=[1 << 40], parameters={"binary_data_size": 1 << 40}), head),
        ("/v2/models/cnn/infer", doc(shape=[1, 3, 8, 8], data=[[[[[[[0.0]]]]]]]), head),
        ("/v2/models/cnn/infer", b"[" * 100_000 + b"]" * 100_000, head),
        ("/v2/models/cnn/infer", b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [' +
         b",".join([b'"a"'] * 1000) + b"]}]}", head),
        ("/v2/models/cnn/infer", b"\x00" * (2 << 20), head),  # over the 1 MiB body limit
        ("/v2/models/cnn/infer", doc(shape=[1, 3, 8, 8], data=[0.0] * 192), {**head, "Inference-Header-Content-Length": "99999"}),
        ("/v2/models/..%2F..%2Fetc%2Fpasswd/infer", doc(shape=[1], data=[0.0]), head),
        ("/v2/models/cnn/versions/..%2F..%2F1/infer", doc(shape=[1], data=[0.0]), head),
        ("/v2/repository/models/..%2F..%2Fetc%2Fpasswd/load", b"{}", head),
        ("/v2/repository/models/cnn.onnx/load", b"{}", head),
        ("/v2/models/cnn/infer", doc(shape=[1, 3, 8, 8], data=[0.0] * 192), {}),  # no key
    ]
    x = grpcclient.InferInput("x", [1, 3, 8, 8], "FP32")
    x.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    x.set_shape([1 << 16, 3, 8, 8])  # a shape of 50 MB declared, 768 bytes sent
    before = _rss_mb()
    statuses = set()
    for k in range(count):
        if k % 13 == 0:
            with pytest.raises(Exception, match="RESOURCE_EXHAUSTED|INVALID_ARGUMENT"):
                g.infer("cnn", [x], headers=AUTH)
            continue
        path, body, headers = hostile[k % len(hostile)]
        status, text = _status(url, path, body, headers)
        assert 400 <= status < 500, (path, status, text[:200])
        statuses.add(status)
    assert statuses >= {400, 401, 404, 413}
    grown = _rss_mb() - before
    assert grown < 150, f"the server process grew by {grown:.0f} MiB over {count} hostile requests"
    feeds = feeds_for("cnn", np.random.default_rng(3))
    assert infer(g, grpcclient, "cnn", feeds)["y"].shape == (3, 10) and h.is_server_ready()
    assert all(m.pool.ready_workers() == 1 for m in srv.models.values())


def test_serve_command_with_grpc_and_an_api_key_from_the_environment(tmp_path):
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    onnx.save(conv_gemm_model(), tmp_path / "m.onnx")
    env = dict(os.environ, PYTHONWARNINGS="ignore", ONNXPIPE_API_KEY=KEY)
    proc = subprocess.Popen([sys.executable, "-m", "onnxpipe", "serve", str(tmp_path / "m.onnx"), "--port", "0",
                             "--grpc-port", "0", "--devices", "cpu[threads=1]"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        grpc_at = url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("grpc on "):
                grpc_at = line.split()[2]
            if line.startswith("serving on "):
                url = line.split()[2]
        assert url and grpc_at and grpc_at.startswith("127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else ""
        g = grpcclient.InferenceServerClient(grpc_at)
        x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
        got = infer(g, grpcclient, "m", {"x": x})["y"]
        np.testing.assert_allclose(got, ort_outputs(tmp_path / "m.onnx", {"x": x})["y"], atol=ATOL, rtol=0)
        with pytest.raises(Exception, match="UNAUTHENTICATED"):
            g.get_model_metadata("m")
        g.close()
        assert _status(url, "/v2/models/m")[0] == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
