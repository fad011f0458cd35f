"""``onnxpipe infer`` end to end: shards and manifest, --resume, failed samples, the per-device table."""

from __future__ import annotations

import json

import numpy as np
import onnx
from conftest import conv_gemm_model, gather_model, run_cli

from onnxpipe.core.session import Session
from onnxpipe.runtimes.manifest import load_outputs, read_manifest


def test_infer_writes_shards_in_order_and_resumes(tmp_path):
    onnx.save(conv_gemm_model(), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((300, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    args = ["infer", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out"),
            "--devices", "cpu:0[threads=1],cpu:1[threads=1]", "--batch-size", "16", "--shard-size", "64"]
    r = run_cli(*args, "--json", timeout=180)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["computed"] == 300 and [d["device"] for d in doc["devices"]] == ["cpu:0", "cpu:1"]
    assert "samples/s" in r.stderr and "cpu:1" in r.stderr  # the table (and progress) go to stderr with --json
    manifest = read_manifest(tmp_path / "out")
    assert manifest["complete"] and len(manifest["shards"]) == 5 and manifest["shards"][-1]["count"] == 44
    got = load_outputs(tmp_path / "out")
    with Session(conv_gemm_model(), threads=1) as s:
        np.testing.assert_allclose(got["y"], s.run({"x": x})["y"], rtol=1e-6, atol=1e-6)
    assert np.array_equal(got["_index"], np.arange(300))

    again = run_cli(*args, timeout=120)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    resumed = run_cli(*args, "--resume", timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "300 already done" in " ".join(resumed.stdout.split())


def test_infer_reports_failed_samples_and_exits_1(tmp_path):
    onnx.save(gather_model(), tmp_path / "g.onnx")
    idx = np.arange(50) % 10
    idx[7] = 1000
    np.savez(tmp_path / "idx.npz", idx=idx)
    r = run_cli("infer", str(tmp_path / "g.onnx"), "--data", str(tmp_path / "idx.npz"), "-o", str(tmp_path / "o"),
                "--devices", "cpu", "--batch-size", "8", timeout=180)
    assert r.returncode == 1, r.stderr
    assert "sample 7 failed" in r.stdout and "1 sample(s) failed" in r.stderr
    manifest = read_manifest(tmp_path / "o")
    assert [f["index"] for f in manifest["failed"]] == [7] and manifest["complete"]
    assert load_outputs(tmp_path / "o")["_index"].tolist() == [i for i in range(50) if i != 7]
