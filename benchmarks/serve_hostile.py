"""Hostile clients against ``onnxpipe serve``: malformed requests, slow clients, clients that hang up.

Loopback only, bounded loops. Sends ``--requests`` requests drawn in turn from :func:`hostile_requests`
(deep JSON nesting, 5000-digit numbers, a list as datatype, parameters as a string, > 64 dims, a
false Content-Encoding, declared shapes far over the limit, JSON bodies that would cost more than
the limit to decode, truncated bodies, clients that disconnect mid-body) from ``--clients``
threads, then opens ``--slow`` connections that drip their headers, and reports:

- the count of answers per status (the outcome: 0 HTTP 500, 0 unanswered);
- the server's peak RSS against the bound ``idle RSS + max_body_bytes x concurrent requests``;
- how long the slow connections were held (the header timeout) and whether a good request is
  served afterwards; the server's log must hold no traceback.

    python benchmarks/serve_hostile.py [--requests 1000] [--clients 8] [--slow 50] [--limit-mb 1] [--big] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODEL_PATH = "/v2/models/m/infer"


def good_body() -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()


def hostile_requests(limit: int) -> list[tuple[str, dict[str, str], bytes, str]]:
    """``(label, headers, body, how)`` cases; ``how`` is ``send`` (whole request) or ``hangup`` (half a body, then close)."""
    deep = b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}"
    deep_obj = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "parameters": ' \
        + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}]}"
    deep_data = (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": '
                 + b"[" * 70 + b"1" + b"]" * 70 + b"}]}")
    digits = b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [' + b"9" * 5000 + b', 1, 2, 3]}]}'
    def js(doc):
        return json.dumps(doc).encode()
    x = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    many_commas = b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [' \
        + b"0," * (limit // 2 - 64) + b"0]}]}"
    cases = [
        ("deep array nesting", {}, deep, "send"),
        ("deep object nesting", {}, deep_obj, "send"),
        ("data nested 70 deep", {}, deep_data, "send"),
        ("5000-digit number", {}, digits, "send"),
        ("list as datatype", {}, js({"inputs": [{**x, "datatype": ["FP32"]}]}), "send"),
        ("object as datatype", {}, js({"inputs": [{**x, "datatype": {"a": 1}}]}), "send"),
        ("parameters as a string", {}, js({"inputs": [x], "parameters": "binary_data_output"}), "send"),
        ("input parameters as a string", {}, js({"inputs": [{**x, "parameters": "x"}]}), "send"),
        ("output parameters as a list", {}, js({"inputs": [x], "outputs": [{"name": "y", "parameters": [1]}]}), "send"),
        ("id as an object", {}, js({"inputs": [x], "id": {"a": [1]}}), "send"),
        ("65 dims", {}, js({"inputs": [{**x, "shape": [1] * 65, "data": [1]}]}), "send"),
        ("1000 dims", {}, js({"inputs": [{**x, "shape": [1] * 1000, "data": [1]}]}), "send"),
        ("shape of floats", {}, js({"inputs": [{**x, "shape": [1.5, 4]}]}), "send"),
        ("shape as a string", {}, js({"inputs": [{**x, "shape": "1x4"}]}), "send"),
        ("negative dim", {}, js({"inputs": [{**x, "shape": [-1, 4]}]}), "send"),
        ("huge declared shape", {}, js({"inputs": [{**x, "shape": [1 << 40, 4]}]}), "send"),
        ("huge declared binary", {"Inference-Header-Content-Length": "90"},
         js({"inputs": [{**{k: v for k, v in x.items() if k != "data"}, "shape": [1 << 30, 4],
                         "parameters": {"binary_data_size": 16}}]}).ljust(90) + b"\0" * 16, "send"),
        ("JSON too costly to decode", {}, many_commas, "send"),
        ("name as a number", {}, js({"inputs": [{**x, "name": 5}]}), "send"),
        ("inputs as an object", {}, js({"inputs": {"x": 1}}), "send"),
        ("strings as FP32 data", {}, js({"inputs": [{**x, "data": ["a", "b", "c", "d"]}]}), "send"),
        ("null data", {}, js({"inputs": [{**x, "data": None}]}), "send"),
        ("NaN literal", {}, b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [NaN, 1, 2, 3]}]}', "send"),
        ("binary size negative", {"Inference-Header-Content-Length": "10"}, b"{}".ljust(10) + b"x", "send"),
        ("header length not a number", {"Inference-Header-Content-Length": "abc"}, good_body(), "send"),
        ("header length past the body", {"Inference-Header-Content-Length": "99999"}, good_body(), "send"),
        ("false gzip encoding", {"Content-Encoding": "gzip"}, good_body(), "send"),
        ("false deflate encoding", {"Content-Encoding": "deflate"}, good_body(), "send"),
        ("unknown encoding", {"Content-Encoding": "br2"}, good_body(), "send"),
        ("truncated deflate", {"Content-Encoding": "deflate"}, zlib.compress(good_body())[:-8], "send"),
        ("not UTF-8", {}, b'{"inputs": "\xff\xfe"}', "send"),
        ("empty body", {}, b"", "send"),
        ("client hangs up mid-body", {}, good_body() * 50, "hangup"),
        ("good request", {}, good_body(), "send"),
    ]
    return cases


def request(port: int, headers: dict[str, str], body: bytes, how: str, path: str = MODEL_PATH,
            timeout: float = 60.0) -> int | None:
    """One HTTP/1.1 request on a raw socket: the status code, or None for a hangup (nothing to read)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", f"Content-Length: {len(body)}",
                "Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items())]
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        if how == "hangup":
            s.sendall(body[: len(body) // 2])
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST on close
            return None
        s.sendall(body)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        line = data.split(b"\r\n", 1)[0].split()
        return int(line[1]) if len(line) >= 2 else -1


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def slow_client(port: int, seconds: float) -> float:
    """Drip a header byte per second; return how long the server kept the connection open."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=seconds + 5) as s:
            s.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n")
            while time.perf_counter() - t0 < seconds:
                s.sendall(b"X")
                time.sleep(0.5)
    except OSError:
        pass
    return time.perf_counter() - t0


def start_server(model: Path, limit: int, header_timeout: float) -> tuple[subprocess.Popen, int, Path]:
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    env = dict(os.environ)
    with open(log, "w") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "onnxpipe", "serve", str(model), "--name", "m", "--port", "0",
                                 "--max-body-mb", str(limit / (1 << 20)), "--devices", "cpu[threads=1]",
                                 "--header-timeout-s", str(header_timeout)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
    for line in proc.stdout:
        if "serving on" in line:
            return proc, int(line.split("serving on ")[1].split()[0].rsplit(":", 1)[1]), log
    raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")


def tiny_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "m",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)


def run(requests: int = 1000, clients: int = 8, slow: int = 50, limit: int = 1 << 20,
        header_timeout: float = 3.0, big: bool = False) -> dict:
    from onnxpipe.core.hardware import cpu

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "m.onnx"
        tiny_model(model)
        proc, port, log = start_server(model, limit, header_timeout)
        try:
            for _ in range(20):  # the idle footprint is a server that has served (lazy imports, the first batch)
                request(port, {}, good_body(), "send")
            time.sleep(0.5)
            idle = rss_mb(proc.pid)
            cases = hostile_requests(limit)
            statuses: Counter = Counter()
            by_case: dict[str, Counter] = {}
            peak = [idle]
            stop = threading.Event()

            def watch() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], rss_mb(proc.pid))
                    time.sleep(0.02)

            lock = threading.Lock()
            counter = iter(range(requests))

            def client() -> None:
                for k in counter:
                    label, headers, body, how = cases[k % len(cases)]
                    try:
                        status = request(port, headers, body, how)
                    except OSError as exc:
                        status = f"no answer ({type(exc).__name__})"
                    with lock:
                        key = "hangup" if status is None else status
                        statuses[key] += 1
                        by_case.setdefault(label, Counter())[key] += 1

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            flood_s = time.perf_counter() - t0
            if big:  # six bodies of 57 MB of JSON at once, under a 64 MB limit: refused before decoding
                huge = b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [' \
                    + b"0.5," * (57 * (1 << 20) // 4) + b"0]}]}"
                with __import__("concurrent.futures").futures.ThreadPoolExecutor(6) as pool:
                    big_statuses = list(pool.map(lambda _: request(port, {}, huge, "send"), range(6)))
                for st in big_statuses:
                    statuses[st] += 1
                    by_case.setdefault("57 MB JSON body", Counter())[st] += 1
            with __import__("concurrent.futures").futures.ThreadPoolExecutor(slow) as pool:
                held = list(pool.map(lambda _: slow_client(port, header_timeout * 4), range(slow)))
            after = request(port, {}, good_body(), "send")
            stop.set()
            watcher.join()
        finally:
            t_stop = time.perf_counter()
            proc.terminate()
            proc.wait(30)
            shutdown_s = time.perf_counter() - t_stop
        text = log.read_text()
        log.unlink()
    return {
        "cpu": f"{cpu().model} ({cpu().cores} cores)", "requests": requests, "clients": clients, "statuses": dict(sorted(statuses.items(), key=str)),
        "http_500": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500),
        "unanswered": sum(v for k, v in statuses.items() if isinstance(k, str) and k != "hangup"),
        "by_case": {k: dict(v) for k, v in by_case.items()}, "flood_s": round(flood_s, 2),
        "idle_rss_mb": round(idle, 1), "peak_rss_mb": round(peak[0], 1),
        "rss_bound_mb": round(idle + limit / (1 << 20) * (6 if big else clients), 1), "limit_mb": limit / (1 << 20),
        "slow_clients": slow, "slow_held_max_s": round(max(held), 2), "header_timeout_s": header_timeout,
        "served_after": after, "tracebacks_in_log": text.count("Traceback"), "shutdown_s": round(shutdown_s, 2),
        "log_tail": text[-1500:], "log_errors": sorted({ln for ln in text.splitlines() if "Error" in ln})[:20],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--slow", type=int, default=50)
    ap.add_argument("--limit-mb", type=float, default=1.0, help="the server's --max-body-mb")
    ap.add_argument("--big", action="store_true", help="also send six 57 MB JSON bodies at once (use --limit-mb 64)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = run(a.requests, a.clients, a.slow, limit=int(a.limit_mb * (1 << 20)), big=a.big)
    if a.json:
        print(json.dumps(r, indent=2))
        return
    print(f"CPU: {r['cpu']}")
    print(f"{r['requests']} hostile requests from {r['clients']} clients in {r['flood_s']} s: {r['statuses']}")
    for label, c in r["by_case"].items():
        print(f"  {label:32s} {dict(c)}")
    print(f"HTTP 5xx: {r['http_500']} · unanswered: {r['unanswered']} · tracebacks in the log: {r['tracebacks_in_log']}")
    print(f"RSS: idle {r['idle_rss_mb']} MB, peak {r['peak_rss_mb']} MB, bound {r['rss_bound_mb']} MB "
          f"(idle + limit {r['limit_mb']:g} MB x concurrent requests)")
    print(f"{r['slow_clients']} slow clients held at most {r['slow_held_max_s']} s (header timeout "
          f"{r['header_timeout_s']} s); a good request afterwards: {r['served_after']}")
    print(f"shutdown (SIGTERM to exit): {r['shutdown_s']} s")


if __name__ == "__main__":
    main()
