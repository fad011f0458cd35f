"""Runtime tuning: option spaces per provider, the output check, honest timing, tuned.json and --config."""

from __future__ import annotations

import json
import time

import numpy as np
import onnx
import pytest
from conftest import conv_gemm_model, run_cli

from onnxpipe.core.errors import InputError
from onnxpipe.runtimes.providers import Device
from onnxpipe.runtimes.tune import open_session, tune
from onnxpipe.runtimes.tune_measure import activation_bytes, duel, knee, memory_model
from onnxpipe.runtimes.tune_space import ModelFacts, space, with_options
from onnxpipe.runtimes.tuned import TunedEntry, TunedFile, load_tuned, save_tuned

BRANCHY = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,16] x) => (float[N,16] y) {
  a = Relu(x)
  b = Sigmoid(x)
  c = Tanh(x)
  ab = Add(a, b)
  y = Add(ab, c)
}"""


def _qdq_static() -> onnx.ModelProto:
    return onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] x) => (float[2,4] y) <float s = {0.1}, uint8 z = {128}> {
  q = QuantizeLinear(x, s, z)
  y = DequantizeLinear(q, s, z)
}""")


def _values(dims, name):
    return [v.label for d in dims if d.name == name for v in d.values]


def test_cpu_space_skips_what_cannot_apply_and_keeps_user_options():
    plain = ModelFacts.of(conv_gemm_model())
    assert plain.width == 1 and not plain.static_inputs
    dims, skipped = space(Device.parse("cpu"), plain, cores=4)
    assert [d.name for d in dims] == ["threads", "spinning", "optimization", "arena", "mem_pattern"]
    assert _values(dims, "threads") == ["threads=auto", "threads=1", "threads=2", "threads=4"]
    assert any(s.label == "parallel" and "no parallel branches" in s.why for s in skipped)
    branchy = ModelFacts.of(onnx.parser.parse_model(BRANCHY))
    assert branchy.width == 3
    dims, _ = space(Device.parse("cpu"), branchy, cores=4)
    # inter-op threads appear only together with parallel mode
    assert _values(dims, "execution") == ["sequential", "parallel, inter_threads=2", "parallel, inter_threads=3"]
    par = next(v for d in dims if d.name == "execution" for v in d.values if v.options.get("execution_mode") == "parallel")
    chosen = par.apply(Device.parse("cpu[threads=1]"))
    assert chosen.options.inter_threads == 2 and chosen.options.execution_mode == "parallel"
    default_pattern = next(v for d in dims if d.name == "mem_pattern" for v in d.values if v.label == "mem_pattern=on")
    assert str(default_pattern.apply(chosen)) == "cpu:0[threads=1,inter_threads=2,execution_mode=parallel]"
    back = next(v for d in dims if d.name == "execution" for v in d.values if v.label == "sequential").apply(chosen)
    assert str(back) == "cpu:0[threads=1]"  # sequential drops the inter-op threads that only parallel uses
    # settings the user gave on the device are kept, not searched
    dims, skipped = space(Device.parse("cpu[spinning=false,inter_threads=2]"), branchy, cores=4)
    assert not {"spinning", "execution"} & {d.name for d in dims}
    assert {"spinning", "execution"} <= {s.dimension for s in skipped}
    dims, skipped = space(Device.parse("cpu[threads=1]"), plain, cores=4)
    assert "threads" not in [d.name for d in dims] and any(s.dimension == "threads" for s in skipped)


def test_gpu_option_dictionaries_and_skips_without_a_gpu():
    dynamic = ModelFacts.of(conv_gemm_model())
    dims, skipped = space(Device.parse("cuda:1"), dynamic, cores=8)
    assert [d.name for d in dims] == ["cudnn", "binding", "arena", "optimization"]
    assert any("dynamic input shapes" in s.why for s in skipped if s.label == "io_binding+cuda_graph")
    base = Device.parse("cuda:1")
    algos = [dict(v.apply(base).providers(check=False)[0][1])["cudnn_conv_algo_search"] for v in dims[0].values]
    assert algos == ["EXHAUSTIVE", "HEURISTIC", "DEFAULT"]
    static = ModelFacts.of(_qdq_static())
    assert static.static_inputs and static.qdq
    dims, skipped = space(base, static, cores=8)
    graph = next(v for d in dims if d.name == "binding" for v in d.values if v.label == "io_binding+cuda_graph")
    dev = graph.apply(base)
    cuda = dev.providers(check=False)[0][1]
    assert dev.options.io_binding and cuda["enable_cuda_graph"] == "1" and cuda["device_id"] == "1"
    dims, skipped = space(Device.parse("tensorrt:0"), dynamic, cores=8)
    assert _values(dims, "precision") == ["fp32", "fp16"] and any(s.label == "int8" for s in skipped)
    level = next(v for d in dims if d.name == "builder_level" for v in d.values if v.label == "builder_level=5")
    fp16 = next(v for d in dims if d.name == "precision" for v in d.values if v.label == "fp16")
    trt = fp16.apply(level.apply(Device.parse("tensorrt:0"))).providers(check=False)
    assert trt[0][0] == "TensorrtExecutionProvider"
    assert trt[0][1]["trt_fp16_enable"] == "1" and trt[0][1]["trt_builder_optimization_level"] == "5"
    dims, _ = space(Device.parse("tensorrt:0"), static, cores=8)
    assert "int8" in _values(dims, "precision")


def test_tuned_settings_are_device_options_that_reach_the_session():
    from onnxpipe.runtimes.device_session import DeviceSession

    dev = with_options(Device.parse("cpu[threads=1]"), {"inter_threads": 2, "execution_mode": "parallel",
                                                         "mem_pattern": False, "spinning": False})
    assert Device.parse(str(dev)) == dev  # the spec string carries every setting
    with DeviceSession(conv_gemm_model(), str(dev)) as s:
        opts = s.session.get_session_options()
        assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 2
        assert str(opts.execution_mode).endswith("PARALLEL") and not opts.enable_mem_pattern
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        y = s.run({"x": np.ones((2, 3, 8, 8), np.float32)})["y"]
    assert y.shape == (2, 10)


def test_files_with_separate_session_settings_still_load(tmp_path):
    doc = TunedFile(model="m", entries=[TunedEntry(device="cpu:0[threads=1]", batch_size=2)]).model_dump(mode="json")
    doc["entries"][0]["session"] = {"execution_mode": "sequential", "spinning": False, "mem_pattern": False}
    (tmp_path / "old.json").write_text(json.dumps(doc))
    assert [str(d) for d in load_tuned(tmp_path / "old.json").devices()] == ["cpu:0[threads=1,mem_pattern=false,spinning=false]"]
    doc["entries"][0]["session"] = {"spinning": "sometimes"}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="option 'spinning'"):
        load_tuned(tmp_path / "bad.json")


def test_duel_and_knee():
    fast = duel(lambda: time.sleep(0.002), lambda: time.sleep(0.0005), runs=2, min_rounds=5, max_rounds=5)
    assert fast.faster(0.05) and fast.wins == 1.0 and fast.ratio < 0.5
    slow = duel(lambda: time.sleep(0.0005), lambda: time.sleep(0.003), runs=1, max_rounds=7)
    assert not slow.faster(0.02) and slow.stopped and slow.stopped.startswith("clearly") and len(slow.a_ms) == 2
    assert knee([(1, 10.0), (2, 19.0), (4, 30.0), (8, 31.0)]) == 4


def test_memory_model_counts_activations_per_sample():
    model = conv_gemm_model()
    # Conv out, Relu out, Flatten out: 4x8x8 float32 each; y: 10 float32
    assert activation_bytes(model, 1) == 3 * 256 * 4 + 40
    mem = memory_model(model)
    assert mem.per_sample == 3 * 256 * 4 + 40
    assert mem.max_batch(mem.fixed + 10 * mem.per_sample) == 10


def test_a_candidate_that_changes_results_is_rejected():
    class Wrong:  # "faster" because it does nothing, and wrong
        def __init__(self, session):
            self.inner = session

        def run(self, feeds):
            return {k: v + 1.0 for k, v in self.inner.run(feeds).items()}

        def close(self):
            self.inner.close()

    def fake_open(model, device):
        s = open_session(model, device)
        return Wrong(s) if device.options.optimization in ("basic", "extended") else s

    report = tune(conv_gemm_model(), ["cpu"], budget_s=3, extra=["cpu[optimization=basic,threads=1]"],
                  open_session=fake_open)
    d = report.devices[0]
    bad = [t for t in d.trials if t.device.options.optimization != "all"]
    assert bad[0].change == "cpu:0[threads=1,optimization=basic]"  # asked-for setups go first
    assert all(t.status == "rejected" and "outputs differ" in t.reason for t in bad)
    assert d.chosen.options.optimization == "all"
    assert len(d.entry().rejected) == len(bad)


def test_a_few_seconds_of_budget_still_yield_a_valid_file(tmp_path):
    start = time.perf_counter()
    report = tune(conv_gemm_model(), ["cpu"], budget_s=1.5, objective="throughput", batch_sizes=[1, 4, 16])
    assert time.perf_counter() - start < 1.5 + 1.0  # one round or session past the deadline at most
    d = report.devices[0]
    assert d.batch in (1, 4, 16) and d.knee_batch == d.batch and [b for b, _ in d.curve] == [1, 4, 16][:len(d.curve)]
    assert d.default_ms > 0 and d.tuned_ms > 0
    # never reported faster than the default unless the final side-by-side showed it beyond noise
    assert d.speedup == 1.0 or (d.significant and d.confirm.faster(0.02))
    path = save_tuned(report.to_file(), tmp_path / "tuned.json")
    loaded = load_tuned(path)
    assert loaded.entries[0].batch_size == d.batch and loaded.devices()[0] == d.chosen


def test_memory_cap_bounds_the_batch():
    per = 3 * 256 * 4 + 40
    mem = memory_model(conv_gemm_model())
    report = tune(conv_gemm_model(), ["cpu"], budget_s=1.0, objective="throughput", memory_cap=mem.fixed + 6 * per)
    d = report.devices[0]
    assert d.max_batch == 6 and max(b for b, _ in d.curve) <= 6 and d.batch <= 6
    with pytest.raises(InputError, match="even batch 1"):
        tune(conv_gemm_model(), ["cpu"], budget_s=1.0, memory_cap=1)


def test_tuned_file_errors(tmp_path):
    with pytest.raises(InputError, match="no such tuned config"):
        load_tuned(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InputError, match="not a tuned config"):
        load_tuned(tmp_path / "x.json")
    doc = TunedFile(model="m", entries=[TunedEntry(device="cpu:0[threads=1]")]).model_dump(mode="json")
    doc["entries"][0]["device"] = "cpu:0[wings=2]"
    (tmp_path / "y.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="unknown option 'wings'"):
        load_tuned(tmp_path / "y.json")


def _write_tuned(path, device="cpu:0[threads=1]", batch=3):
    save_tuned(TunedFile(model="m.onnx", entries=[TunedEntry(device=device, batch_size=batch)]), path)


def test_recipe_runtime_key_selects_the_tuned_devices(tmp_path):
    from onnxpipe.pipeline.recipe import load_recipe

    onnx.save(conv_gemm_model(), tmp_path / "m.onnx")
    _write_tuned(tmp_path / "tuned.json", "cpu:0[threads=1,optimization=extended]")
    r = load_recipe({"model": str(tmp_path / "m.onnx"), "runtime": str(tmp_path / "tuned.json")})
    assert r.validate_.providers == ["cpu:0[threads=1,optimization=extended]"]
    r = load_recipe({"model": str(tmp_path / "m.onnx"), "runtime": str(tmp_path / "tuned.json"),
                     "validate": {"providers": ["cpu"]}})
    assert r.validate_.providers == ["cpu"]
    with pytest.raises(InputError, match="runtime: no such tuned config"):
        load_recipe({"model": str(tmp_path / "m.onnx"), "runtime": str(tmp_path / "missing.json")})


def test_recipe_runtime_times_stages_in_the_tuned_cpu_setup(tmp_path, monkeypatch):
    from onnxpipe import pipeline

    onnx.save(conv_gemm_model(), tmp_path / "m.onnx")
    _write_tuned(tmp_path / "tuned.json", "cpu:0[threads=1,spinning=false,mem_pattern=false]")
    real, seen = pipeline.stage_latency_ms, []

    def spy(model, feeds, device, *, budget_s):
        seen.append(str(device))
        return real(model, feeds, device, budget_s=0.05)

    monkeypatch.setattr(pipeline, "stage_latency_ms", spy)
    result = pipeline.run({"model": str(tmp_path / "m.onnx"), "runtime": str(tmp_path / "tuned.json"),
                           "passes": ["simplify"]}, tmp_path / "out")
    assert seen and set(seen) == {"cpu:0[threads=1,mem_pattern=false,spinning=false]"}
    assert all(st.latency_ms > 0 for st in result.pipeline.stages if st.kept)
    assert [row["provider"] for row in result.validation] == ["cpu:0[threads=1,mem_pattern=false,spinning=false]"]


def test_cli_tune_writes_config_chart_and_bench_infer_honour_it(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(conv_gemm_model(), model)
    r = run_cli("tune", str(model), "--budget-s", "2", "-o", str(tmp_path / "tuned.json"), "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["format"] == "onnxpipe.tuned/1" and doc["entries"][0]["default"]["latency_ms"] > 0
    assert (tmp_path / "tune.png").stat().st_size > 0 and load_tuned(tmp_path / "tuned.json").entries
    # a distinctive config: bench and infer must run exactly it
    _write_tuned(tmp_path / "mine.json", "cpu:0[threads=1,spinning=false]", batch=3)
    b = run_cli("bench", str(model), "--config", str(tmp_path / "mine.json"), "--runs", "3", "--budget", "0.02",
                "--json", timeout=120)
    assert b.returncode == 0, b.stderr
    rows = json.loads(b.stdout)["rows"]
    assert [(row["threads"], row["batch"]) for row in rows] == [(1, 3)]
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).standard_normal((7, 3, 8, 8)).astype(np.float32))
    i = run_cli("infer", str(model), "--data", str(tmp_path / "data.npz"), "-o", str(tmp_path / "out"),
                "--config", str(tmp_path / "mine.json"), "--json", timeout=180)
    assert i.returncode == 0, i.stderr
    res = json.loads(i.stdout)
    # the workers rebuild the device from this spec: every tuned setting travels with it
    assert res["samples"] == 7 and res["devices"][0]["spec"] == "cpu:0[threads=1,spinning=false]"
    assert res["devices"][0]["batches"] == 3  # 3 + 3 + 1: the tuned batch size
    assert "session settings" not in i.stderr  # no more "the workers cannot apply" note
    bad = run_cli("tune", str(model), "--objective", "fast", timeout=60)
    assert bad.returncode == 2 and "--objective" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("bench", str(model), "--config", str(tmp_path / "none.json"), timeout=60)
    assert bad.returncode == 2 and "no such tuned config" in bad.stderr


def _serve_banner(args: list[str]) -> str:
    """Start ``onnxpipe serve ARGS``, return what it printed up to its 'serving on' line, stop it."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "onnxpipe", "serve", *args, "--port", "0"], cwd=ROOT,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving on "):
                break
        assert lines and lines[-1].startswith("serving on "), proc.stderr.read() if proc.poll() is not None else lines
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    return "".join(lines)


def test_serve_takes_the_tuned_devices_and_batch_size(tmp_path):
    pytest.importorskip("aiohttp")
    onnx.save(conv_gemm_model(), tmp_path / "m.onnx")
    _write_tuned(tmp_path / "tuned.json", "cpu:1[threads=1,spinning=false]", batch=3)
    # the tuned devices replace --devices; the tuned batch is the largest batch unless given
    out = _serve_banner([str(tmp_path / "m.onnx"), "--devices", "cpu:0,cpu:2", "--config", str(tmp_path / "tuned.json")])
    assert "models on cpu:1" in out and "up to 3" in out
    out = _serve_banner([str(tmp_path / "m.onnx"), "--config", str(tmp_path / "tuned.json"), "--max-batch-size", "5"])
    assert "models on cpu:1" in out and "up to 5" in out
    bad = run_cli("serve", str(tmp_path / "m.onnx"), "--config", str(tmp_path / "none.json"), timeout=60)
    assert bad.returncode == 2 and "no such tuned config" in bad.stderr and "Traceback" not in bad.stderr
