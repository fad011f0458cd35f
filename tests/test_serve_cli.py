"""``onnxpipe serve`` as a user runs it: starts on a free loopback port, answers, stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, conv_gemm_model, run_cli

pytest.importorskip("aiohttp")
httpclient = pytest.importorskip("tritonclient.http")


def children(pid: int) -> set[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.add(int(entry.name))
    return out


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited, only its parent has not read its status yet


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads child processes from /proc")
def test_serve_command_round_trip_and_clean_shutdown(tmp_path):
    onnx.save(conv_gemm_model(), tmp_path / "m.onnx")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "onnxpipe", "serve", str(tmp_path / "m.onnx"), "--name", "digits",
                             "--port", "0", "--devices", "cpu:0,cpu:1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("serving on "):
                url = line.split()[2]
        assert url is not None, proc.stderr.read() if proc.poll() is not None else "no 'serving on' line"
        assert url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
        workers = children(proc.pid)
        assert len(workers) >= 2
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))
        assert client.is_server_ready()
        x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        import onnxruntime as ort

        ref = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(client.infer("digits", [inp]).as_numpy("y"), ref, atol=1e-5, rtol=0)
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        time.sleep(0.2)
        assert not [p for p in workers if running(p)], "worker processes outlived the server"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_serve_errors_are_one_line(tmp_path):
    r = run_cli("serve", str(tmp_path / "missing.onnx"), "--port", "0")
    assert r.returncode == 2 and r.stderr.startswith("error: no such file or directory") and "Traceback" not in r.stderr
    onnx.save(conv_gemm_model(), tmp_path / "m.onnx")
    r = run_cli("serve", str(tmp_path / "m.onnx"), "--devices", "cpu[bogus=1]")
    assert r.returncode == 2 and "unknown option 'bogus'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("serve", str(tmp_path / "m.onnx"), "--max-batch-size", "0")
    assert r.returncode == 2 and "--max-batch-size" in r.stderr
