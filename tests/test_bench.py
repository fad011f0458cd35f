"""The bench suite: percentiles, throughput, FLOP/s against the CPU's peak, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import conv_gemm_model, run_cli

from onnxpipe.core.analysis import summarize
from onnxpipe.core.timing import latency_ms
from onnxpipe.runtimes.bench import bench
from onnxpipe.runtimes.peak import cpu_peak
from onnxpipe.runtimes.providers import available


def test_rows_per_threads_and_batch_with_flops_and_peak():
    model = conv_gemm_model()
    report = bench(model, ["cpu"], batch_sizes=[1, 4], threads=[1, 2], warmup=2, min_runs=5, budget_s=0.05)
    assert [(r.threads, r.batch) for r in report.rows] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    peak = cpu_peak()
    for r in report.rows:
        assert r.error is None and r.runs >= 5 and r.load_s > 0 and r.first_run_ms > 0
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.samples_per_s == pytest.approx(r.batch / (r.p50_ms / 1e3))
        assert r.flops == summarize(model, batch=r.batch).flops > 0
        assert r.gflops == pytest.approx(r.flops / (r.p50_ms / 1e3) / 1e9)
        assert r.peak_fraction == pytest.approx(r.gflops / peak.gflops)
        assert r.threads_peak_fraction == pytest.approx(r.gflops / peak.for_threads(r.threads))
        assert r.engine_build_s is None and r.placement == "cpu 4"
    assert report.as_dict()["cpu_peak"]["gflops"] == peak.gflops


def test_a_device_thread_option_is_not_multiplied_and_latency_ms_still_works():
    report = bench(conv_gemm_model(), ["cpu[threads=1]"], batch_sizes=[2], threads=[1, 2, 4], min_runs=3, budget_s=0.01)
    assert [(r.threads, r.batch) for r in report.rows] == [(1, 2)]
    x = np.zeros((1, 3, 8, 8), np.float32)
    out = latency_ms(conv_gemm_model(), {"x": x}, warmup=1, min_repeat=3, budget_s=0.01)
    assert out["runs"] >= 3 and out["min_ms"] <= out["median_ms"] <= out["p90_ms"]


def test_cli_bench_json_and_errors(tmp_path):
    import onnx

    onnx.save(conv_gemm_model(), tmp_path / "m.onnx")
    r = run_cli("bench", str(tmp_path / "m.onnx"), "--batch-sizes", "1,2", "--threads", "1", "--runs", "3",
                "--budget", "0.02", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [row["batch"] for row in doc["rows"]] == [1, 2] and doc["cpu_peak"]["gflops"] > 0
    bad = run_cli("bench", str(tmp_path / "m.onnx"), "--batch-sizes", "1,x", timeout=60)
    assert bad.returncode == 2 and "--batch-sizes" in bad.stderr and "Traceback" not in bad.stderr
    if "CUDAExecutionProvider" not in available():
        gpu = run_cli("bench", str(tmp_path / "m.onnx"), "--providers", "cuda", timeout=60)
        assert gpu.returncode == 2 and "onnxpipe[gpu]" in gpu.stderr


@pytest.mark.gpu
def test_bench_on_cuda_has_no_cpu_peak_fraction():
    report = bench(conv_gemm_model(), ["cuda:0"], batch_sizes=[8], min_runs=5, budget_s=0.1)
    (row,) = report.rows
    assert row.error is None and row.gflops > 0 and row.peak_fraction is None
