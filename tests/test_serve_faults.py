"""The server under faults: workers killed under load, a failing batching loop, restart windows,
hostile requests and slow clients, shutdown time and shared memory left behind."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, conv_gemm_model, serving

pytest.importorskip("aiohttp")
ort = pytest.importorskip("onnxruntime")



def _hostile():
    """benchmarks/serve_hostile.py, the request corpus the benchmark sends (imported by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_hostile", ROOT / "benchmarks" / "serve_hostile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shm_segments() -> set[str]:
    """The shared-memory blocks this process created (other processes on the machine have theirs)."""
    from onnxpipe.runtimes.shm import owned_segments

    return owned_segments()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    models = tmp_path_factory.mktemp("faults") / "models"
    models.mkdir()
    onnx.save(conv_gemm_model(), models / "cnn.onnx")
    return models


def post(port: int, body: bytes, timeout: float = 60.0) -> tuple[int, dict, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v2/models/cnn/infer", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}"), dict(r.getheaders())
    finally:
        conn.close()


def body_of(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()


def reference(repo: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(repo / "cnn.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def load_under_kills(repo: Path, kills: int, clients: int = 16, per_client: int = 12) -> dict:
    """``clients`` threads send requests (a 503 is retried after its Retry-After) while a worker is
    killed ``kills`` times; every answer is checked against ONNX Runtime."""
    before = shm_segments()
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1 + k % 3, 3, 8, 8)).astype(np.float32) for k in range(clients * per_client)]
    want = [reference(repo, x) for x in xs]
    results: dict[str, int] = {"ok": 0, "503": 0, "wrong": 0, "other": 0, "retry_after_missing": 0, "requests": 0}
    lock = threading.Lock()
    done = threading.Event()
    with serving(repo, "cpu:0[threads=1],cpu:1[threads=1]", max_batch_size=8, max_queue_delay_ms=2,
                 max_restarts=kills + 5, restart_window_s=60.0) as (url, srv):
        port = int(url.rsplit(":", 1)[1])
        pool = srv.models["cnn"].pool

        def client(c: int) -> None:
            sent = 0
            while sent < per_client or not done.is_set():  # until every kill happened under load
                k = (c + sent * clients) % len(xs)
                sent += 1
                with lock:
                    results["requests"] += 1
                for _attempt in range(200):
                    status, doc, headers = post(port, body_of(xs[k]))
                    if status == 503:
                        with lock:
                            results["503"] += 1
                            results["retry_after_missing"] += "Retry-After" not in headers
                        time.sleep(min(0.2, float(headers.get("Retry-After", 1)) / 10))
                        continue
                    with lock:
                        if status != 200:
                            results["other"] += 1
                        elif np.allclose(np.array(doc["outputs"][0]["data"]).reshape(want[k].shape), want[k],
                                         atol=1e-4, rtol=1e-4):
                            results["ok"] += 1
                        else:
                            results["wrong"] += 1
                    break

        def killer() -> None:
            r = random.Random(5)
            for _ in range(kills):
                deadline = time.monotonic() + 60
                while pool.ready_workers() < 1 and time.monotonic() < deadline and not done.is_set():
                    time.sleep(0.02)  # a worker must be up, or the kill only hits a loading process
                live = [p for p in pool.pids() if p is not None]
                if not live or done.is_set():
                    break
                try:
                    os.kill(r.choice(live), signal.SIGKILL)
                    results.setdefault("kills", 0)
                    results["kills"] += 1
                except ProcessLookupError:
                    pass
                time.sleep(r.uniform(0.05, 0.3))
            done.set()

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        kt = threading.Thread(target=killer)
        for t in threads:
            t.start()
        kt.start()
        kt.join(600)
        done.set()
        for t in threads:
            t.join(600)
        # serving afterwards: both workers back, a request answered
        deadline = time.monotonic() + 60
        while pool.ready_workers() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        results["ready_after"] = pool.ready_workers()
        status, _doc, _ = post(port, body_of(xs[0]))
        results["after"] = status
        results["loop_restarts"] = srv.models["cnn"].batcher.loop_restarts
        t0 = time.perf_counter()
    results["shutdown_s"] = time.perf_counter() - t0
    time.sleep(0.2)
    results["leaked_segments"] = len(shm_segments() - before)
    return results


def check_outcome(r: dict, kills: int) -> None:
    assert r.get("kills", 0) >= kills * 0.8, r  # the killer found a live worker nearly every time
    assert r["ok"] == r["requests"] and r["wrong"] == 0 and r["other"] == 0, r
    assert r["retry_after_missing"] == 0, r
    assert r["ready_after"] == 2 and r["after"] == 200, r
    assert r["shutdown_s"] < 5.0, r
    assert r["leaked_segments"] == 0, r


def test_workers_killed_under_load_every_request_answered(repo):
    r = load_under_kills(repo, kills=3, clients=16, per_client=4)
    check_outcome(r, 3)


@pytest.mark.slow
def test_workers_killed_twenty_times_under_sixteen_clients(repo):
    r = load_under_kills(repo, kills=20, clients=16, per_client=40)
    print(r)
    check_outcome(r, 20)


def test_restart_limit_is_per_window_and_503_says_when_to_retry(repo):
    x = np.ones((1, 3, 8, 8), np.float32)
    with serving(repo, "cpu:0[threads=1]", max_restarts=1, restart_window_s=6.0) as (url, srv):
        port = int(url.rsplit(":", 1)[1])
        pool = srv.models["cnn"].pool
        victim = pool.pids()[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while pool.pids()[0] in (None, victim) and time.monotonic() < deadline:
            time.sleep(0.01)  # restarted at once: the first death is within max_restarts=1
        os.kill(pool.pids()[0], signal.SIGKILL)  # the second death within the window exceeds it
        time.sleep(0.5)
        status, doc, headers = post(port, body_of(x))
        assert status == 503 and "restarting" in doc["error"] and int(headers["Retry-After"]) >= 1, (status, doc)
        deadline = time.monotonic() + 60  # once the window has passed, the worker comes back by itself
        while time.monotonic() < deadline:
            status, doc, _ = post(port, body_of(x))
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200, doc
        np.testing.assert_allclose(np.array(doc["outputs"][0]["data"]).reshape(1, 10), reference(repo, x), atol=1e-4)


def test_batching_loop_survives_its_own_failure(repo, monkeypatch):
    x = np.ones((1, 3, 8, 8), np.float32)
    with serving(repo, "cpu:0[threads=1]") as (url, srv):
        port = int(url.rsplit(":", 1)[1])
        batcher = srv.models["cnn"].batcher
        real = batcher.pool.submit
        calls = {"n": 0}

        def flaky(feeds):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected fault")
            return real(feeds)

        monkeypatch.setattr(batcher.pool, "submit", flaky)
        status, doc, _ = post(port, body_of(x))
        assert status == 500 and "injected fault" in doc["error"]  # answered, not left hanging
        status, doc, _ = post(port, body_of(x))
        assert status == 200 and batcher.loop_restarts == 1


def test_hostile_requests_get_4xx_and_slow_clients_are_cut_off(repo, caplog):
    h = _hostile()
    hostile_requests, request, slow_client = h.hostile_requests, h.request, h.slow_client

    limit = 1 << 20
    with serving(repo, "cpu:0[threads=1]", max_body_bytes=limit, header_timeout_s=1.0) as (url, _srv):
        port = int(url.rsplit(":", 1)[1])
        statuses = {}
        for label, headers, body, how in hostile_requests(limit):
            body = body.replace(b'"shape": [1, 4]', b'"shape": [1, 3, 8, 8]') if label == "good request" else body
            statuses[label] = request(port, headers, body, how, path="/v2/models/cnn/infer")
        bad = {k: v for k, v in statuses.items() if v is not None and v >= 500}
        assert not bad, bad
        assert statuses["deep object nesting"] == 400 and statuses["65 dims"] == 400
        assert statuses["list as datatype"] == 400 and statuses["5000-digit number"] == 400
        assert statuses["huge declared shape"] == 413 and statuses["JSON too costly to decode"] == 413
        assert statuses["false gzip encoding"] == 400
        held = slow_client(port, 4.0)
        assert held < 3.5  # cut off after the 1 s header timeout (plus the loop's granularity)
        x = np.ones((1, 3, 8, 8), np.float32)
        assert post(port, body_of(x))[0] == 200
    assert "Traceback" not in caplog.text


def test_shutdown_is_prompt_with_requests_in_flight(repo):
    """A request stuck on a worker (SIGSTOP) is answered 503 at shutdown, which takes < 5 s."""
    before = shm_segments()
    x = np.ones((1, 3, 8, 8), np.float32)
    answers = []
    with serving(repo, "cpu:0[threads=1]") as (url, srv):
        port = int(url.rsplit(":", 1)[1])
        pid = srv.models["cnn"].pool.pids()[0]
        os.kill(pid, signal.SIGSTOP)
        t = threading.Thread(target=lambda: answers.append(post(port, body_of(x))[0]))
        t.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
    took = time.perf_counter() - t0
    t.join(10)
    assert took < 5.0 and answers == [503]
    assert not shm_segments() - before
