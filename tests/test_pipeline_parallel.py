"""Pipeline-parallel inference on real worker processes: order, a middle stage killed, resume, the CLI."""

from __future__ import annotations

import os
import signal

import numpy as np
import onnx
import pytest
from conftest import residual_concat_model, run_cli

from onnxpipe.core.errors import InputError
from onnxpipe.core.session import Session
from onnxpipe.partition.split import split_model
from onnxpipe.runtimes.manifest import load_outputs, read_manifest
from onnxpipe.runtimes.pipeline_parallel import PipelineRunner

DEVICES = ["cpu:0[threads=1]", "cpu:1[threads=1]", "cpu:2[threads=1]"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp") / "split"
    split_model(residual_concat_model(), out, parts=3)
    return out


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((240, 8, 8, 8)).astype(np.float32), "scale": np.array(0.5, np.float32)}


@pytest.fixture(scope="module")
def expected(data):
    with Session(residual_concat_model(), threads=1) as s:
        return s.run(data)


@pytest.fixture(scope="module")
def runner(folder):
    with PipelineRunner(folder, DEVICES, batch_size=8, shard_size=64) as r:
        yield r


@pytest.fixture(autouse=True)
def _no_hook(request):
    yield
    if "runner" in request.fixturenames:
        request.getfixturevalue("runner").on_batch = None


def test_outputs_in_input_order_equal_the_whole_model(runner, data, expected):
    result = runner.run(data)
    assert not result.failed and np.array_equal(result.indices, np.arange(240))
    for name in ("y", "feat"):
        np.testing.assert_allclose(result.outputs[name], expected[name], atol=1e-5, rtol=1e-5)
    assert [d.batches for d in result.devices] == [30, 30, 30]  # every batch went through every stage
    assert all(d.busy_s > 0 for d in result.devices) and 0.0 <= result.bubble < 1.0
    assert "bubble" in result.table().title and result.as_dict()["pipeline"]["parts"][2] == "part2.onnx"


def test_a_worker_killed_in_the_middle_stage_loses_no_output(runner, data, expected):
    killed = []
    middle = runner.pool.workers[1]
    before = middle.restarts

    def kill(ev):
        if killed or not middle.alive or not middle.inflight():
            return
        killed.append((middle.pid, int(middle.current[0])))
        os.kill(middle.pid, signal.SIGKILL)

    runner.on_batch = kill
    for _ in range(5):  # on a loaded machine the stage may finish between events: run again until one is caught
        result = runner.run(data)
        if killed:
            break
    assert killed, "the hook should have found the middle stage holding a batch"
    assert middle.restarts == before + 1 and [w.restarts for w in runner.pool.workers][::2] == [0, 0]
    assert not result.failed and np.array_equal(result.indices, np.arange(240))
    np.testing.assert_allclose(result.outputs["y"], expected["y"], atol=1e-5, rtol=1e-5)


def test_shards_and_resume_keep_the_runners_manifest(runner, data, expected, tmp_path):
    out = tmp_path / "job"

    class Stop(Exception):
        pass

    def stop(ev):
        stop.n += 1
        if stop.n == 40:
            raise Stop

    stop.n = 0
    runner.on_batch = stop
    with pytest.raises(Stop):
        runner.run(data, out)
    done = read_manifest(out)
    assert not done["complete"] and 0 < len(done["shards"]) < 4
    assert done["model"].endswith("pipeline.json")
    runner.on_batch = None
    result = runner.run(data, out, resume=True)
    assert result.skipped == 64 * len(done["shards"]) and result.computed == 240 - result.skipped
    outputs = load_outputs(out)
    assert np.array_equal(outputs["_index"], np.arange(240))
    np.testing.assert_allclose(outputs["y"], expected["y"], atol=1e-5, rtol=1e-5)


def test_device_count_must_match_the_stages(folder):
    with pytest.raises(InputError, match="has 3 stages: expected 3 devices, received 2"):
        PipelineRunner(folder, ["cpu:0", "cpu:1"])
    assert len(PipelineRunner(folder, "cpu").devices) == 3  # one device serves every stage


def test_cli_infer_runs_a_split_folder(tmp_path, data, expected):
    model = tmp_path / "m.onnx"
    onnx.save(residual_concat_model(), model)
    assert run_cli("split", str(model), "-o", str(tmp_path / "split"), "--parts", "2").returncode == 0
    np.savez(tmp_path / "in.npz", x=data["x"][:40], scale=data["scale"])
    proc = run_cli("infer", str(tmp_path / "split"), "--devices", "cpu:0,cpu:1", "--data", str(tmp_path / "in.npz"),
                   "-o", str(tmp_path / "out"), "-b", "8")
    assert proc.returncode == 0, proc.stderr
    assert "bubble" in proc.stdout and "part1.onnx" in proc.stdout
    np.testing.assert_allclose(load_outputs(tmp_path / "out")["y"], expected["y"][:40], atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # a local Ray takes 6-15 s to start
def test_ray_backend_runs_each_stage_as_an_actor(folder, data, expected):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        with PipelineRunner(folder, DEVICES, batch_size=16, backend="ray") as r:
            result = r.run({"x": data["x"][:64], "scale": data["scale"]})
            pids = {w.pid for w in r.pool.workers}
    finally:
        ray.shutdown()
    assert len(pids) == 3 and [d.batches for d in result.devices] == [4, 4, 4]
    np.testing.assert_allclose(result.outputs["y"], expected["y"][:64], atol=1e-5, rtol=1e-5)
