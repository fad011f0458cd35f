"""Devices, provider options, node placement and the machine report; GPU paths run where CUDA is."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import conv_gemm_model, run_cli

from onnxpipe.core.errors import InputError, OnnxpipeError
from onnxpipe.core.session import Session
from onnxpipe.runtimes.device_session import (
    DeviceSession,
    Placement,
    profiled_placement,
)
from onnxpipe.runtimes.peak import SIMD, Peak, cpu_peak, physical_cores
from onnxpipe.runtimes.providers import (
    Device,
    available,
    option_rows,
    parse_devices,
    resolve,
    split_devices,
)

HAS_CUDA = "CUDAExecutionProvider" in available()


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return conv_gemm_model()


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)


# parsing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, kind, index", [
    ("cpu", "cpu", 0), ("cpu:1", "cpu", 1), ("CUDA:2", "cuda", 2), ("gpu", "cuda", 0),
    ("trt:3", "tensorrt", 3), ("tensorrt", "tensorrt", 0), (" cuda:1 [cudnn=heuristic] ", "cuda", 1),
])
def test_parse_kind_and_index(spec, kind, index):
    d = Device.parse(spec)
    assert (d.kind, d.index) == (kind, index)
    assert Device.parse(str(d)) == d


def test_options_one_form_string_mapping_and_keywords():
    s = Device.parse("tensorrt:0[fp16,cache_dir=trt,workspace=2GiB,min_shapes=x:1x3x8x8,"
                     "opt_shapes=x:4x3x8x8,max_shapes=x:8x3x8x8]")
    m = Device.parse({"device": "tensorrt:0", "fp16": True, "cache_dir": "trt", "workspace": "2GiB",
                      "min_shapes": {"x": [1, 3, 8, 8]}, "opt_shapes": "x:4x3x8x8", "max_shapes": "x:8x3x8x8"})
    k = Device.parse("tensorrt:0", fp16=True, cache_dir="trt", workspace=2 * 1024 ** 3,
                     min_shapes={"x": (1, 3, 8, 8)}, opt_shapes={"x": (4, 3, 8, 8)}, max_shapes={"x": (8, 3, 8, 8)})
    assert s == m == k
    assert s.options.workspace == 2 * 1024 ** 3 and s.options.min_shapes == {"x": (1, 3, 8, 8)}
    assert Device.parse(str(s)) == s  # the canonical string reads back
    assert Device.parse(Device.parse("cpu:1"), threads=2).options.threads == 2


@pytest.mark.parametrize("spec, needle, hint", [
    ("tpu:0", "unknown device 'tpu'", "cuda:0"),
    ("cuda:x", "bad device index 'x'", "cuda:0"),
    ("cpu[fp16]", "unknown option 'fp16' for a cpu device", "threads"),
    ("cuda[cudnn=fastest]", "option 'cudnn'", "providers"),
    ("cpu[threads=0]", "option 'threads'", "providers"),
    ("trt[min_shapes=x:1x3]", "give all three", "providers"),
    ("trt[min_shapes=x:1;y:2,opt_shapes=x:1,max_shapes=x:1]", "same inputs", "providers"),
    ("trt[min_shapes=x:1xa,opt_shapes=x:1,max_shapes=x:1]", "NAME:1x3x224x224", "providers"),
    ("cuda[pin]", "unknown option 'pin' for a cuda device", "cudnn"),
    ("cpu[execution_mode=fast]", "option 'execution_mode'", "providers"),
    ("cpu[spinning=sometimes]", "option 'spinning'", "providers"),
    ("cpu[inter_threads=2,execution_mode=sequential]", "needs execution_mode=parallel", "providers"),
    ("cuda[execution_mode=parallel]", "CPU devices only", "providers"),
    ("cuda[inter_threads=2]", "CPU devices only", "providers"),
])
def test_parse_errors_name_the_problem_and_fix(spec, needle, hint):
    with pytest.raises(InputError) as err:
        Device.parse(spec)
    assert needle in err.value.message and hint in (err.value.hint or "")


def test_device_lists_split_outside_brackets():
    assert split_devices("cpu:0, trt:0[fp16,workspace=1GiB],cuda:1") == ["cpu:0", "trt:0[fp16,workspace=1GiB]", "cuda:1"]
    assert [d.label for d in parse_devices(["cpu:0", {"device": "cpu:1", "threads": 1}])] == ["cpu:0", "cpu:1"]
    with pytest.raises(InputError, match="no devices"):
        parse_devices("")


# mapping to ONNX Runtime ---------------------------------------------------------------------

def test_cuda_options_map_to_provider_options():
    d = Device.parse("cuda:1[cudnn=heuristic,mem_limit=4GiB,arena=same_as_requested,tf32=false,cuda_graph]")
    (name, opts), cpu = d.providers(check=False)
    assert name == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert opts == {"device_id": "1", "arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "HEURISTIC",
                    "do_copy_in_default_stream": "1", "use_tf32": "0", "enable_cuda_graph": "1",
                    "gpu_mem_limit": str(4 * 1024 ** 3)}
    assert d.providers(check=False, device_id=0)[0][1]["device_id"] == "0"  # a Ray actor's own GPU


def test_tensorrt_options_map_to_provider_options(tmp_path):
    d = Device.parse(f"trt:2[fp16,int8,int8_table=calib.flatbuffers,cache_dir={tmp_path},workspace=1GiB,builder_level=4,"
                     "min_shapes=x:1x3x8x8;m:1x8,opt_shapes=x:4x3x8x8;m:4x8,max_shapes=x:8x3x8x8;m:8x8]")
    providers = d.providers(check=False)
    assert [p if isinstance(p, str) else p[0] for p in providers] == \
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = providers[0][1]
    assert trt["device_id"] == "2" and trt["trt_fp16_enable"] == "1" and trt["trt_int8_enable"] == "1"
    assert trt["trt_int8_calibration_table_name"] == "calib.flatbuffers"
    assert trt["trt_engine_cache_enable"] == "1" and trt["trt_engine_cache_path"] == str(tmp_path)
    assert trt["trt_timing_cache_enable"] == "1" and trt["trt_timing_cache_path"] == str(tmp_path)
    assert trt["trt_max_workspace_size"] == str(1024 ** 3) and trt["trt_builder_optimization_level"] == "4"
    assert trt["trt_profile_min_shapes"] == "x:1x3x8x8,m:1x8" and trt["trt_profile_max_shapes"] == "x:8x3x8x8,m:8x8"
    bare = Device.parse("trt[cuda_fallback=false,cpu_fallback=false]").providers(check=False)
    assert [p[0] for p in bare] == ["TensorrtExecutionProvider"]


@pytest.mark.parametrize("spec", [
    "cpu[threads=2,inter_threads=2]", "cpu:1[execution_mode=parallel,mem_pattern=false,spinning=false]",
    "cpu[threads=1,inter_threads=3,execution_mode=parallel,spinning=off,arena=false,pin]",
    "cuda:1[spinning=false,mem_pattern=false,cudnn=heuristic]", "trt:0[fp16,mem_pattern=false]",
])
def test_session_settings_round_trip_through_the_spec_string(spec):
    d = Device.parse(spec)
    again = Device.parse(str(d))  # what a worker process rebuilds
    assert again == d and str(again) == str(d)
    assert again.options.model_dump() == d.options.model_dump()


def test_inter_threads_above_one_turn_on_parallel_execution():
    d = Device.parse("cpu[threads=2,inter_threads=2]")
    assert d.options.execution_mode == "parallel" and str(d) == "cpu:0[threads=2,inter_threads=2,execution_mode=parallel]"
    o = d.session_options()
    assert o.execution_mode.name == "ORT_PARALLEL" and (o.intra_op_num_threads, o.inter_op_num_threads) == (2, 2)
    assert Device.parse("cpu[inter_threads=1]").options.execution_mode == "sequential"
    plain = Device.parse("cpu").session_options(threads=2)  # ORT's defaults: sequential, memory pattern, spinning
    assert plain.execution_mode.name == "ORT_SEQUENTIAL" and plain.enable_mem_pattern
    assert plain.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    quiet = Device.parse("cpu[mem_pattern=false,spinning=false]").session_options()
    assert not quiet.enable_mem_pattern
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert quiet.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    gpu = Device.parse("cuda[spinning=false,mem_pattern=false]").session_options()
    assert gpu.get_session_config_entry("session.intra_op.allow_spinning") == "0" and not gpu.enable_mem_pattern


SPY = """
import json, os

from onnxpipe.runtimes import providers

_real = providers.Device.session_options


def _spy(self, **kw):
    o = _real(self, **kw)
    with open(os.path.join(os.environ["ONNXPIPE_TEST_SPY"], f"{os.getpid()}.json"), "w") as f:
        json.dump({"device": str(self), "execution_mode": o.execution_mode.name, "intra": o.intra_op_num_threads,
                   "inter": o.inter_op_num_threads, "mem_pattern": o.enable_mem_pattern,
                   "spin": o.get_session_config_entry("session.intra_op.allow_spinning")}, f)
    return o


providers.Device.session_options = _spy
"""


def test_batch_runner_workers_apply_the_session_settings(model, x, tmp_path, monkeypatch):
    import os

    from onnxpipe.runtimes.batch import BatchRunner

    # a sitecustomize that only the runner's freshly spawned worker interpreters import: it records
    # the session options each worker builds from the spec string it was sent
    hook, spy = tmp_path / "hook", tmp_path / "spy"
    hook.mkdir()
    spy.mkdir()
    (hook / "sitecustomize.py").write_text(SPY)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("ONNXPIPE_TEST_SPY", str(spy))
    spec = "cpu[threads=1,inter_threads=2,mem_pattern=false,spinning=false]"
    with BatchRunner(model, [spec], batch_size=2) as runner:
        got = runner.run({"x": x}).outputs["y"]
    with Session(model) as s:
        np.testing.assert_allclose(got, s.run({"x": x})["y"], atol=1e-5, rtol=1e-5)
    seen = [json.loads(p.read_text()) for p in spy.iterdir()]
    assert len(seen) == 1 and int(next(spy.iterdir()).stem) != os.getpid()  # built in the worker process
    assert seen[0] == {"device": str(Device.parse(spec)), "execution_mode": "ORT_PARALLEL", "intra": 1, "inter": 2,
                       "mem_pattern": False, "spin": "0"}


def test_session_options_threads_optimization_and_strict_placement():
    o = Device.parse("cpu[threads=3,optimization=basic,arena=false]").session_options()
    assert o.intra_op_num_threads == 3 and o.inter_op_num_threads == 1 and not o.enable_cpu_mem_arena
    assert str(o.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
    assert o.get_session_config_entry("session.record_ep_graph_assignment_info") == "1"
    assert Device.parse("cpu").session_options(threads=2).intra_op_num_threads == 2  # the runner's share
    strict = Device.parse("cuda[cpu_fallback=false]")
    assert strict.session_options().get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    assert "CPUExecutionProvider" not in strict.providers(check=False)


@pytest.mark.skipif(HAS_CUDA, reason="this build has CUDA")
@pytest.mark.parametrize("spec, words", [("cuda:0", ["CUDAExecutionProvider", "onnxpipe[gpu]"]),
                                         ("tensorrt:0", ["TensorrtExecutionProvider", "onnxpipe[gpu]", "TensorRT"])])
def test_missing_provider_names_the_extra_never_falls_back(model, spec, words):
    with pytest.raises(InputError) as err:
        DeviceSession(model, spec)
    text = str(err.value)
    assert all(w in text for w in words)
    with pytest.raises(InputError):
        resolve(spec)


def test_resolve_keeps_working_for_existing_callers():
    assert resolve("cpu") == ["CPUExecutionProvider"]
    assert resolve(Device.parse("cpu:1")) == ["CPUExecutionProvider"]


def test_a_provider_ort_drops_is_an_error_not_a_cpu_run(model, monkeypatch):
    # ORT drops a provider whose libraries fail to load and runs on CPU; the session must refuse
    monkeypatch.setattr(Device, "check_available", lambda self: None)
    monkeypatch.setattr(Device, "providers", lambda self, **kw: ["CPUExecutionProvider"])
    with pytest.raises(OnnxpipeError, match="could not start CUDAExecutionProvider"):
        DeviceSession(model, "cuda:0")


# sessions and placement ----------------------------------------------------------------------

def test_device_session_runs_like_session_and_reports_placement(model, x):
    with DeviceSession(model, "cpu[threads=1]") as s, Session(model) as ref:
        np.testing.assert_allclose(s.run({"x": x})["y"], ref.run({"x": x})["y"], rtol=1e-5, atol=1e-6)
        assert s.placement.counts == {"CPUExecutionProvider": 4} and s.placement.method == "assignment"
        assert s.placement.on_cpu == 4
    with DeviceSession(model, "cpu") as s, pytest.raises(InputError, match="expected dtype float32"):
        s.run({"x": x.astype(np.float64)})


def test_profiled_placement_reads_ort_profiles(model, x, tmp_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "p")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": x})
    p = profiled_placement(sess.end_profiling())
    assert p.method == "profiling" and set(p.counts) == {"CPUExecutionProvider"}
    assert p.counts["CPUExecutionProvider"] >= 2  # kernels after ORT's fusions (Conv+Relu is one)


def test_placement_summary_names_cpu_nodes_in_gpu_sessions():
    p = Placement({"CUDAExecutionProvider": 40, "CPUExecutionProvider": 2}, ("Shape", "NonZero"))
    assert p.summary() == "cuda 40, cpu 2 (Shape, NonZero)" and p.on_cpu == 2
    assert Placement({"CPUExecutionProvider": 3}, ("A", "B", "C")).summary() == "cpu 3"


# the machine -------------------------------------------------------------------------------

def test_peak_is_cores_clock_lanes_fma():
    p = Peak(cores=4, ghz=3.0, lanes=8, fma_units=2, clock_source="test")
    assert p.per_core_gflops == 96.0 and p.gflops == 384.0 and p.for_threads(1) == 96.0 and p.for_threads(99) == 384.0
    peak = cpu_peak()
    assert peak.gflops > 0 and 1 <= peak.cores <= physical_cores() and (peak.lanes, peak.fma_units) in SIMD.values()


def test_option_rows_document_every_option():
    rows = {r[0]: r for r in option_rows()}
    assert {"threads", "cudnn", "fp16", "cache_dir", "min_shapes", "cpu_fallback"} <= set(rows)
    assert rows["fp16"][1] == "tensorrt" and all(r[3] for r in rows.values())
    assert rows["execution_mode"][1:3] == ("cpu,cuda,tensorrt", "sequential")
    assert rows["mem_pattern"][2] == rows["spinning"][2] == "true"


def test_providers_command_lists_build_devices_and_cpu():
    r = run_cli("providers", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["devices"]["cpu"] is True and "CPUExecutionProvider" in doc["onnxruntime"]["providers"]
    assert doc["cpu"]["simd"] and doc["cpu"]["peak"]["gflops"] > 0 and isinstance(doc["gpus"], list)
    table = run_cli("providers", timeout=120)
    assert table.returncode == 0, table.stderr
    assert all(name in table.stdout for name in ("execution_mode", "mem_pattern", "spinning", "inter_threads"))


# GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_session_matches_cpu_and_reports_placement(model, x):
    with DeviceSession(model, "cuda:0[cudnn=heuristic]") as s, Session(model) as ref:
        np.testing.assert_allclose(s.run({"x": x})["y"], ref.run({"x": x})["y"], rtol=1e-3, atol=1e-4)
        assert s.placement is not None and s.placement.counts.get("CUDAExecutionProvider", 0) >= 1


@pytest.mark.gpu
def test_cuda_io_binding_matches(model, x):
    with DeviceSession(model, "cuda:0[io_binding]") as s, Session(model) as ref:
        np.testing.assert_allclose(s.run({"x": x})["y"], ref.run({"x": x})["y"], rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_tensorrt_runs_or_says_tensorrt_is_missing(model, x, tmp_path):
    if "TensorrtExecutionProvider" not in available():
        pytest.skip("this onnxruntime build has no TensorRT provider")
    try:
        s = DeviceSession(model, f"tensorrt:0[fp16,cache_dir={tmp_path}]")
    except OnnxpipeError as exc:
        assert "TensorRT" in str(exc)  # libraries absent: said plainly
        return
    with s, Session(model) as ref:
        np.testing.assert_allclose(s.run({"x": x})["y"], ref.run({"x": x})["y"], rtol=2e-2, atol=2e-2)
        assert "TensorrtExecutionProvider" in s.placement.counts


def test_recipe_validation_takes_device_specs_and_reports_placement(model, x):
    from onnxpipe.pipeline import validate_providers

    rows = validate_providers(model, ["cpu", "cpu:1[threads=1,optimization=basic]"], [{"x": x}], atol=1e-5, rtol=1e-4)
    assert [r["provider"] for r in rows] == ["cpu", "cpu:1[threads=1,optimization=basic]"] and all(r["ok"] for r in rows)
    assert rows[1]["placement"]["counts"] == {"CPUExecutionProvider": 4}
    if not HAS_CUDA:
        with pytest.raises(InputError, match="onnxpipe\\[gpu\\]"):
            validate_providers(model, ["cpu", "cuda"], [{"x": x}], atol=1e-5, rtol=1e-4)
