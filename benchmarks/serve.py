"""Serving under load, side by side in one run: dynamic batching vs one request at a time vs ORT in-process.

A bounded load (``--requests`` per variant, ``--clients`` concurrent, one sample per request,
loopback only) is sent with the real ``tritonclient[http]`` client to ``onnxpipe serve`` in a
subprocess, once with dynamic batching (``--max-batch-size 32``) and once without
(``--max-batch-size 1``). The same samples also go straight to an ONNX Runtime session in this
process from ``--clients`` threads (no HTTP, no batching): the floor of what serving costs.
Rounds are interleaved and the median round is reported, so background load hits every
variant alike. The outcome to reach: batching's throughput clearly above one-at-a-time.

    python benchmarks/serve.py [--requests 300] [--clients 16] [--rounds 2] [--model m.onnx] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx



ROOT = Path(__file__).resolve().parent.parent

def mlp(width: int = 1024, layers: int = 4, features: int = 256, classes: int = 10) -> onnx.ModelProto:
    """x[N,256] -> layers x (MatMul + Add + Relu) -> MatMul(10): ~4M weights, so one sample is a GEMV
    that reads every weight (memory bound) while a batch reuses them (as in transformer serving)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev, width_in = [], [], "x", features
    for k in range(layers):
        inits += [numpy_helper.from_array((rng.standard_normal((width_in, width)) / np.sqrt(width_in)).astype(np.float32), f"w{k}"),
                  numpy_helper.from_array(np.zeros(width, np.float32), f"b{k}")]
        nodes += [helper.make_node("MatMul", [prev, f"w{k}"], [f"m{k}"]),
                  helper.make_node("Add", [f"m{k}", f"b{k}"], [f"a{k}"]), helper.make_node("Relu", [f"a{k}"], [f"r{k}"])]
        prev, width_in = f"r{k}", width
    inits.append(numpy_helper.from_array((rng.standard_normal((width_in, classes)) / np.sqrt(width_in)).astype(np.float32), "wo"))
    nodes.append(helper.make_node("MatMul", [prev, "wo"], ["y"]))
    graph = helper.make_graph(nodes, "bench_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def start_server(model: Path, max_batch: int, delay_ms: float) -> tuple[subprocess.Popen, str]:
    """``onnxpipe serve`` on a free loopback port; returns the process and its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "onnxpipe", "serve", str(model), "--name", "m", "--port", "0",
                             "--max-batch-size", str(max_batch), "--max-queue-delay-ms", str(delay_ms)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("serving on "):
            return proc, line.split()[2]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"the server did not start: {proc.stderr.read()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def http_load(url: str, samples: list[np.ndarray], clients: int) -> tuple[float, list[float]]:
    """Send every sample as its own request, ``clients`` in flight; returns (seconds, latencies in s)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
    lat: list[float] = []
    lock = threading.Lock()
    it = iter(enumerate(samples))

    def worker() -> None:
        c = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
        while True:
            with lock:
                nxt = next(it, None)
            if nxt is None:
                break
            x = nxt[1]
            inp = httpclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            t0 = time.perf_counter()
            c.infer("m", [inp])
            lat.append(time.perf_counter() - t0)
        c.close()

    # warm-up outside the clock: sessions, connection pools
    for x in samples[:4]:
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        client.infer("m", [inp])
    client.close()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, lat


def ort_load(model: Path, samples: list[np.ndarray], clients: int) -> tuple[float, list[float]]:
    """The same samples through one in-process ORT session from ``clients`` threads."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    lat: list[float] = []
    lock = threading.Lock()
    it = iter(samples)
    for x in samples[:4]:
        sess.run(None, {"x": x})

    def worker() -> None:
        while True:
            with lock:
                x = next(it, None)
            if x is None:
                break
            t0 = time.perf_counter()
            sess.run(None, {"x": x})
            lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300, help="requests per variant and round (bounded load)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--delay-ms", type=float, default=2.0, help="--max-queue-delay-ms of the batching server")
    ap.add_argument("--model", type=Path, help="an .onnx with one float input 'x' (default: a small CNN)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.requests <= 20000 or not 1 <= args.clients <= 128:
        ap.error("keep the load bounded: --requests 1..20000, --clients 1..128")

    from rich.console import Console
    from rich.table import Table
    from runner import cnn

    tmp = tempfile.TemporaryDirectory(prefix="onnxpipe-bench-serve-")
    if args.model is not None:
        models = {args.model.stem: args.model}
    else:  # the CNN costs less than HTTP per request; the MLP's batch-1 GEMV costs more
        models = {"cnn 32ch": Path(tmp.name) / "cnn.onnx", "mlp 4x1024": Path(tmp.name) / "mlp.onnx"}
        onnx.save(cnn(channels=32), models["cnn 32ch"])
        onnx.save(mlp(), models["mlp 4x1024"])
    variants = {"serve, dynamic batching": 32, "serve, one request at a time": 1}
    rows: dict[str, dict[str, float]] = {}
    try:
        for label, model in models.items():
            shape = [d.dim_value or 1 for d in onnx.load(model, load_external_data=False).graph.input[0].type.tensor_type.shape.dim]
            rng = np.random.default_rng(0)
            samples = [rng.standard_normal([1, *shape[1:]]).astype(np.float32) for _ in range(args.requests)]
            results: dict[str, list[tuple[float, list[float]]]] = {k: [] for k in [*variants, "ORT in-process, no HTTP"]}
            servers = {}
            try:
                for name, mb in variants.items():
                    servers[name] = start_server(model, mb, args.delay_ms)
                for _ in range(args.rounds):
                    for name in variants:
                        results[name].append(http_load(servers[name][1], samples, args.clients))
                    results["ORT in-process, no HTTP"].append(ort_load(model, samples, args.clients))
            finally:
                for proc, _ in servers.values():
                    stop_server(proc)
            for name, runs in results.items():
                seconds, lat = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # the median round
                ms = np.array(lat) * 1000
                row = {"requests_per_s": len(lat) / seconds, "p50_ms": float(np.percentile(ms, 50)),
                       "p99_ms": float(np.percentile(ms, 99)), "requests": len(lat)}
                rows[f"{label} | {name}"] = row
            base = rows[f"{label} | serve, one request at a time"]["requests_per_s"]
            for key, row in rows.items():
                if key.startswith(f"{label} |"):
                    row["vs_one_at_a_time"] = row["requests_per_s"] / base
    finally:
        tmp.cleanup()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{args.requests} single-sample requests, {args.clients} concurrent clients, loopback "
                        f"(median of {args.rounds} interleaved rounds)")
    for col in ("model", "variant", "requests/s", "p50 ms", "p99 ms", "x one-at-a-time"):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for key, r in rows.items():
        label, name = key.split(" | ")
        table.add_row(label, name, f"{r['requests_per_s']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['vs_one_at_a_time']:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
