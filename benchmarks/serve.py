"""Serving under load, side by side in one run: binary vs JSON tensors, batched vs one at a time, HTTP vs gRPC, ORT.

Two ``onnxpipe serve`` subprocesses on loopback (HTTP and gRPC): one with dynamic batching
(``--max-batch-size 32``), one without (``--max-batch-size 1``). ``--clients`` concurrent
clients send one sample per request for ``--seconds`` per variant; the variants take turns
within a round, and the median of ``--rounds`` rounds is reported, so background load hits
every variant alike; ratios are the median of each round's ratio. Request bodies are encoded
once up front (the clients are one asyncio loop: plain keep-alive HTTP/1.1 connections, and
grpc.aio), so what is measured is the server: parsing, batching, running, answering. The same samples also run through ONNX Runtime in this process from ``--clients``
threads on one session (no server at all).

Models: ``cnn``, a small convolutional net on one 3x64x64 image per request (12,288 floats: the
request's encoding costs more than the model), and ``mlp``, 4 MatMul layers 2048 wide (64 MiB of
weights: one sample is a GEMV that streams every weight from memory, a batch reuses them, as in
transformer serving). With ``--mlp-width 1024`` the weights (18 MiB) stay in this CPU's cache,
one sample costs about as much as its HTTP round trip, and batching gains less. Before the load, the real
``tritonclient.grpc`` and ``tritonclient.http`` clients check the answers against ONNX Runtime
(1e-5) for both, the mlp quantized to int8, and the mlp split in two stages.

The worker pool: two more batching servers serve cnn and mlp on ``--pool-cores`` cores (default:
all of them), one as ONE wide worker (``--devices cpu[threads=C]``: its threads do not spin), one
as C single-thread workers (``--workers C --devices cpu[threads=1]``), and a third as the wide worker
with spinning threads (``spinning=true``, what a wide worker was before), in the same rounds; beside them, the layout the
server's own load-time measurement picks for C cores (:func:`onnxpipe.runtimes.cpu_pool.choose_layout`),
to see whether it agrees with the load. The default server (``--devices cpu``) sizes its pool itself
from the cores less one; its startup lines are printed.

Outcomes to reach (printed with the ratios): JSON >= 0.3x binary (cnn); batched >= 1.8x one at
a time (mlp, binary); batched >= 0.6x ORT in-process with 16 threads (mlp).

    python benchmarks/serve.py [--clients 16] [--seconds 3] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
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


def build_repo(root: Path, width: int) -> Path:
    """cnn, mlp, mlp quantized to int8 and mlp split in two stages, in one model directory."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from runner import cnn

    from onnxpipe.partition.split import split_model

    repo = root / "models"
    repo.mkdir()
    onnx.save(cnn(channels=8, size=64), repo / "cnn.onnx")
    model = mlp(width)
    onnx.save(model, repo / "mlp.onnx")
    quantize_dynamic(str(repo / "mlp.onnx"), str(repo / "int8.onnx"), weight_type=QuantType.QInt8)
    result = split_model(model, repo / "split", cuts=["r1"])
    if not result.ok:
        raise RuntimeError("the mlp did not split at r1")
    return repo


POOL_LINES: list[str] = []  # the servers' "NAME: CPU pool of ..." startup lines


def start_server(repo: Path, max_batch: int, delay_ms: float, devices: str,
                 *extra: str) -> tuple[subprocess.Popen, str, str]:
    """``onnxpipe serve`` on free loopback ports; returns the process, its URL and its gRPC address."""
    proc = subprocess.Popen([sys.executable, "-m", "onnxpipe", "serve", str(repo), "--port", "0", "--grpc-port", "0",
                             "--max-batch-size", str(max_batch), "--max-queue-delay-ms", str(delay_ms),
                             "--devices", devices, *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + 180
    grpc_at = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("grpc on "):
            grpc_at = line.split()[2]
        if ": CPU pool of " in line:
            POOL_LINES.append(f"{' '.join(['--devices', devices, *extra])}: {line.strip()}")
        if line.startswith("serving on "):
            return proc, line.split()[2], grpc_at
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


# correctness through the real clients ---------------------------------------------------------
def check_answers(repo: Path, url: str, grpc_at: str) -> dict[str, float]:
    """Largest |served - ORT| over tritonclient.grpc and .http (binary and JSON), per model."""
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    h = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
    g = grpcclient.InferenceServerClient(grpc_at)
    rng = np.random.default_rng(7)
    out = {}
    for name, path in (("cnn", repo / "cnn.onnx"), ("mlp", repo / "mlp.onnx"), ("int8", repo / "int8.onnx"),
                       ("split", repo / "mlp.onnx")):
        shape = (3, 3, 64, 64) if name == "cnn" else (3, 256)
        x = rng.standard_normal(shape).astype(np.float32)
        ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        worst = 0.0
        for module, client, binary in ((grpcclient, g, True), (httpclient, h, True), (httpclient, h, False)):
            i = module.InferInput("x", list(x.shape), "FP32")
            if module is httpclient:
                i.set_data_from_numpy(x, binary_data=binary)
            else:
                i.set_data_from_numpy(x)
            worst = max(worst, float(np.abs(client.infer(name, [i]).as_numpy("y") - ref).max()))
        out[name] = worst
    h.close()
    g.close()
    return out


# load -----------------------------------------------------------------------------------------
def http_bodies(samples: list[np.ndarray], binary: bool) -> list[tuple[bytes, dict]]:
    out = []
    for x in samples:
        if binary:
            head = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                           "parameters": {"binary_data_size": x.nbytes}}],
                               "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
            out.append((head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                             "Content-Type": "application/octet-stream"}))
        else:
            body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                           "data": x.reshape(-1).tolist()}]}).encode()
            out.append((body, {"Content-Type": "application/json"}))
    return out


async def _http_load(url: str, model: str, bodies: list, clients: int, seconds: float) -> float:
    """``clients`` keep-alive HTTP/1.1 connections, each sending pre-built requests back to back.

    A few lines over asyncio streams instead of an HTTP client library: on a small machine the
    client shares the cores with the server, and what it spends is not the server's speed.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    wire = []
    for body, headers in bodies:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        wire.append(f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
                    f"{head}\r\n".encode() + body)
    done = [0]

    async def client(k: int, until: float) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        n = k
        try:
            while time.perf_counter() < until:
                writer.write(wire[n % len(wire)])
                status = await reader.readline()
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                if b" 200 " not in status:
                    raise RuntimeError(f"{model}: {status.decode().strip()}: {body[:200]!r}")
                done[0] += 1
                n += clients
        finally:
            writer.close()

    await asyncio.gather(*(client(k, time.perf_counter() + 0.3) for k in range(clients)))  # warm-up
    done[0] = 0
    t0 = time.perf_counter()
    await asyncio.gather(*(client(k, t0 + seconds) for k in range(clients)))
    return done[0] / (time.perf_counter() - t0)


async def _grpc_load(address: str, model: str, samples: list[np.ndarray], clients: int, seconds: float) -> float:
    import grpc

    from onnxpipe.serve.grpc_proto import grpc_service_pb2_grpc as service
    from onnxpipe.serve.grpc_proto import oip_pb2 as pb

    requests = []
    for x in samples:
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        req.raw_input_contents.append(x.tobytes())
        requests.append(req)
    done = [0]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service.GRPCInferenceServiceStub(channel)

        async def client(k: int, until: float) -> None:
            n = k
            while time.perf_counter() < until:
                await stub.ModelInfer(requests[n % len(requests)])
                done[0] += 1
                n += clients

        await asyncio.gather(*(client(k, time.perf_counter() + 0.3) for k in range(clients)))
        done[0] = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k, t0 + seconds) for k in range(clients)))
        return done[0] / (time.perf_counter() - t0)


def ort_load(path: Path, samples: list[np.ndarray], clients: int, seconds: float) -> float:
    """The same samples through one in-process ORT session from ``clients`` threads, one sample per run."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in samples[:4]:
        sess.run(None, {"x": x})
    counts = [0] * clients
    t0 = time.perf_counter()

    def worker(k: int) -> None:
        n = k
        while time.perf_counter() < t0 + seconds:
            sess.run(None, {"x": samples[n % len(samples)]})
            counts[k] += 1
            n += clients

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def load_time_choice(repo: Path, cores: int, batch: int) -> dict:
    """The layout :func:`choose_layout` picks per model on ``cores`` cores (measured here, in this process)."""
    from onnxpipe.runtimes.cpu_pool import choose_layout, probe_feeds

    return {name: choose_layout(repo / f"{name}.onnx", probe_feeds(repo / f"{name}.onnx", batch), budget=cores,
                                cores=cores) for name in ("cnn", "mlp")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--seconds", type=float, default=3.0, help="load per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--delay-ms", type=float, default=2.0, help="--max-queue-delay-ms of the batching server")
    ap.add_argument("--devices", default="cpu", help="--devices of both servers")
    ap.add_argument("--mlp-width", type=int, default=2048,
                    help="width of the mlp's 4 layers (2048: 64 MiB of weights, more than a CPU cache holds)")
    ap.add_argument("--pool-cores", type=int, default=0,
                    help="cores of the wide-worker vs worker-pool comparison (default: all of this machine's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 0.2 <= args.seconds <= 60 or not 1 <= args.clients <= 128 or not 1 <= args.rounds <= 20:
        ap.error("keep the load bounded: --seconds 0.2..60, --clients 1..128, --rounds 1..20")

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from onnxpipe.core.hardware import cpu

    info = cpu()
    pc = args.pool_cores or info.cores
    console = Console(stderr=args.json)
    tmp = tempfile.TemporaryDirectory(prefix="onnxpipe-bench-serve-")
    servers = {}
    try:
        with console.status("building models and starting two servers"):
            repo = build_repo(Path(tmp.name), args.mlp_width)
            servers["batched"] = start_server(repo, 32, args.delay_ms, args.devices)
            servers["unbatched"] = start_server(repo, 1, args.delay_ms, args.devices)
            pair = Path(tmp.name) / "pair"  # the pool comparison serves only cnn and mlp
            pair.mkdir()
            for name in ("cnn", "mlp"):
                os.link(repo / f"{name}.onnx", pair / f"{name}.onnx")
            servers["wide"] = start_server(pair, 32, args.delay_ms, f"cpu[threads={pc}]")
            servers["pool"] = start_server(pair, 32, args.delay_ms, "cpu[threads=1]", "--workers", str(pc))
            servers["spin"] = start_server(pair, 32, args.delay_ms, f"cpu[threads={pc},spinning=true]")
        with console.status("the load-time measurement of each layout"):
            chosen = load_time_choice(pair, pc, 32)
        b_url, b_grpc = servers["batched"][1:]
        u_url = servers["unbatched"][1]
        w_url, p_url, sp_url = servers["wide"][1], servers["pool"][1], servers["spin"][1]
        wide_v, pool_v = f"HTTP binary, batched, 1 worker x {pc} threads", f"HTTP binary, batched, {pc} workers x 1 thread"
        spin_v = f"{wide_v}, spinning"
        with console.status("checking answers through tritonclient.grpc and .http"):
            errors = check_answers(repo, b_url, b_grpc)
        rng = np.random.default_rng(0)
        cnn_x = [rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for _ in range(32)]
        mlp_x = [rng.standard_normal((1, 256)).astype(np.float32) for _ in range(32)]
        cnn_bin, cnn_json, mlp_bin = http_bodies(cnn_x, True), http_bodies(cnn_x, False), http_bodies(mlp_x, True)
        c, s = args.clients, args.seconds
        variants = {
            ("cnn", "HTTP binary, batched"): lambda: asyncio.run(_http_load(b_url, "cnn", cnn_bin, c, s)),
            ("cnn", "HTTP JSON, batched"): lambda: asyncio.run(_http_load(b_url, "cnn", cnn_json, c, s)),
            ("cnn", "gRPC raw, batched"): lambda: asyncio.run(_grpc_load(b_grpc, "cnn", cnn_x, c, s)),
            ("cnn", f"ORT in-process, {c} threads"): lambda: ort_load(repo / "cnn.onnx", cnn_x, c, s),
            ("cnn", wide_v): lambda: asyncio.run(_http_load(w_url, "cnn", cnn_bin, c, s)),
            ("cnn", pool_v): lambda: asyncio.run(_http_load(p_url, "cnn", cnn_bin, c, s)),
            ("cnn", spin_v): lambda: asyncio.run(_http_load(sp_url, "cnn", cnn_bin, c, s)),
            ("mlp", wide_v): lambda: asyncio.run(_http_load(w_url, "mlp", mlp_bin, c, s)),
            ("mlp", pool_v): lambda: asyncio.run(_http_load(p_url, "mlp", mlp_bin, c, s)),
            ("mlp", spin_v): lambda: asyncio.run(_http_load(sp_url, "mlp", mlp_bin, c, s)),
            ("mlp", "HTTP binary, batched"): lambda: asyncio.run(_http_load(b_url, "mlp", mlp_bin, c, s)),
            ("mlp", "HTTP binary, one at a time"): lambda: asyncio.run(_http_load(u_url, "mlp", mlp_bin, c, s)),
            ("mlp", "gRPC raw, batched"): lambda: asyncio.run(_grpc_load(b_grpc, "mlp", mlp_x, c, s)),
            ("mlp", f"ORT in-process, {c} threads"): lambda: ort_load(repo / "mlp.onnx", mlp_x, c, s),
        }
        runs: dict[tuple[str, str], list[float]] = {k: [] for k in variants}
        with console.status("load") as status:
            for r in range(args.rounds):
                for key, fn in variants.items():
                    status.update(f"round {r + 1}/{args.rounds}: {key[0]} {key[1]}")
                    runs[key].append(fn())
    finally:
        for proc, *_ in servers.values():
            stop_server(proc)
        tmp.cleanup()
    rps = {k: statistics.median(v) for k, v in runs.items()}
    ort_key = f"ORT in-process, {args.clients} threads"

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float:
        # the median of per-round ratios: the two ran minutes apart at most, under the same background load
        return statistics.median(x / y for x, y in zip(runs[a], runs[b]))

    ratios = {
        "cnn: JSON / binary (HTTP)": (ratio(("cnn", "HTTP JSON, batched"), ("cnn", "HTTP binary, batched")), 0.3),
        "cnn: gRPC / HTTP binary": (ratio(("cnn", "gRPC raw, batched"), ("cnn", "HTTP binary, batched")), None),
        "mlp: batched / one at a time (HTTP binary)": (ratio(("mlp", "HTTP binary, batched"),
                                                             ("mlp", "HTTP binary, one at a time")), 1.8),
        f"mlp: batched HTTP / {ort_key}": (ratio(("mlp", "HTTP binary, batched"), ("mlp", ort_key)), 0.6),
        f"mlp: batched gRPC / {ort_key}": (ratio(("mlp", "gRPC raw, batched"), ("mlp", ort_key)), 0.6),
        "mlp: gRPC / HTTP binary": (ratio(("mlp", "gRPC raw, batched"), ("mlp", "HTTP binary, batched")), None),
        f"cnn: {pc} workers x 1 thread / 1 worker x {pc} threads": (ratio(("cnn", pool_v), ("cnn", wide_v)), None),
        f"mlp: {pc} workers x 1 thread / 1 worker x {pc} threads": (ratio(("mlp", pool_v), ("mlp", wide_v)), None),
        f"cnn: 1 worker x {pc} threads, spinning / not": (ratio(("cnn", spin_v), ("cnn", wide_v)), None),
        f"mlp: 1 worker x {pc} threads, spinning / not": (ratio(("mlp", spin_v), ("mlp", wide_v)), None),
    }
    cpu_name = f"{info.model} ({info.cores} cores, {info.simd})"
    if args.json:
        print(json.dumps({"cpu": cpu_name, "requests_per_s": {f"{m} | {v}": x for (m, v), x in rps.items()},
                          "rounds": {f"{m} | {v}": x for (m, v), x in runs.items()},
                          "ratios": {k: {"value": v, "target": t} for k, (v, t) in ratios.items()},
                          "max_abs_error_vs_ort": errors, "server_pools": POOL_LINES,
                          "load_time_choice": {k: v.as_dict() for k, v in chosen.items()}}, indent=2))
        return
    table = Table(title=f"one sample per request, {args.clients} concurrent clients, loopback, median of "
                        f"{args.rounds} interleaved rounds of {args.seconds:g} s, on {cpu_name}")
    for col in ("model", "variant", "requests/s", "rounds"):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for (m, v), x in rps.items():
        table.add_row(m, v, f"{x:.0f}", " ".join(f"{r:.0f}" for r in runs[(m, v)]))
    console.print(table)
    t2 = Table(title="ratios (median over rounds of each round's ratio)")
    for col in ("comparison", "ratio", "target", "met"):
        t2.add_column(col, justify="left" if col == "comparison" else "right")
    for k, (v, target) in ratios.items():
        t2.add_row(k, f"{v:.2f}", "" if target is None else f">= {target}",
                   "" if target is None else ("yes" if v >= target else "[red]no[/]"))
    console.print(t2)
    t3 = Table(title="answers through tritonclient.grpc and .http (binary, JSON) vs ONNX Runtime")
    for col in ("model", "max |error|", "within 1e-5"):
        t3.add_column(col)
    for k, v in errors.items():
        t3.add_row(k, f"{v:.2e}", "yes" if v <= 1e-5 else "[red]no[/]")
    console.print(t3)
    t4 = Table(title=f"the load-time measurement on {pc} cores (batch of 32, what `onnxpipe serve` runs at load)")
    for col in ("model", "chosen", "served: pool / wide"):
        t4.add_column(col)
    for k, v in chosen.items():
        served = ratios[f"{k}: {pc} workers x 1 thread / 1 worker x {pc} threads"][0]
        t4.add_row(k, escape(v.describe()), f"{served:.2f}")
    console.print(t4)
    for line in POOL_LINES:
        console.print(escape(line))


if __name__ == "__main__":
    main()
