"""The batch runner with real worker processes: order, a worker killed mid-run, failing samples, shards and resume."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import onnx
import pytest
from conftest import gather_model
from onnx import helper

from onnxpipe.core.errors import InputError, OnnxpipeError
from onnxpipe.core.session import Session
from onnxpipe.runtimes import BatchRunner
from onnxpipe.runtimes.manifest import load_outputs, read_manifest

DEVICES = ["cpu:0[threads=1]", "cpu:1[threads=1]"]


def cnn_model() -> onnx.ModelProto:
    """x[N,3,16,16] -> 2 x (Conv 3x3 + Relu) -> GlobalAveragePool -> Gemm: ~1 ms per batch of 32, so a
    worker is caught mid-batch."""
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return onnx.numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])],
                              [w("w1", 8, 3, 3, 3), w("w2", 8, 8, 3, 3), w("fw", 10, 8)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((600, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def runner():
    """Two CPU workers on the CNN, shared by the tests (spawning costs seconds)."""
    with BatchRunner(cnn_model(), DEVICES, batch_size=32, shard_size=64) as r:
        yield r


@pytest.fixture(scope="module")
def clean(runner, x):
    return runner.run({"x": x}).outputs["y"]


@pytest.fixture(autouse=True)
def _no_hook(request):
    yield
    if "runner" in request.fixturenames:
        request.getfixturevalue("runner").on_batch = None


def test_outputs_in_input_order_match_a_bare_session(runner, x, clean):
    with Session(cnn_model(), threads=1) as s:
        expected = s.run({"x": x})["y"]
    np.testing.assert_allclose(clean, expected, rtol=1e-6, atol=1e-6)
    result = runner.run({"x": x})
    assert np.array_equal(result.indices, np.arange(len(x))) and not result.failed
    assert sum(d.samples for d in result.devices) == len(x) == result.computed
    assert all(d.samples > 0 for d in result.devices)  # both devices took work
    assert all(d.placement["counts"] == {"CPUExecutionProvider": 7} for d in result.devices)


def test_worker_killed_mid_run_loses_nothing(runner, x):
    data = {"x": np.concatenate([x, x[::-1], x])}
    clean = runner.run(data).outputs["y"]
    killed = []
    before = sum(w.restarts for w in runner.pool.workers)

    def kill(ev):
        if killed:
            return
        for w in runner.pool.workers:
            if w.alive and w.current[0] >= 0:  # it is running a batch right now
                killed.append((w.pid, int(w.current[0])))
                os.kill(w.pid, signal.SIGKILL)
                return

    runner.on_batch = kill
    for _ in range(5):  # on a loaded machine the workers may finish between events: run again until one is caught
        result = runner.run(data)
        if killed:
            break
    assert killed, "the hook should have killed a busy worker"
    assert sum(w.restarts for w in runner.pool.workers) == before + 1
    assert not result.failed and np.array_equal(result.indices, np.arange(len(data["x"])))
    assert np.array_equal(result.outputs["y"], clean)  # every output, in order, equal to a clean run


def test_shards_manifest_and_resume_skip_finished_shards(runner, x, clean, tmp_path):
    out = tmp_path / "job"

    class Stop(Exception):
        pass

    def stop_after_five(ev):
        # workers finish out of order: stop once a whole shard is written (after 5 batches at the earliest)
        stop_after_five.n += 1
        if stop_after_five.n >= 5 and (out / "manifest.json").is_file():
            raise Stop

    stop_after_five.n = 0
    runner.on_batch = stop_after_five
    with pytest.raises(Stop):
        runner.run({"x": x}, outdir=out)
    doc = read_manifest(out)
    assert doc["complete"] is False and doc["shard_size"] == 64
    done = {s["index"] for s in doc["shards"]}
    assert done and not list(out.glob(".*.tmp"))  # whole shards only, no temporaries left
    with pytest.raises(InputError, match="--resume"):
        runner.run({"x": x}, outdir=out)

    starts = []
    runner.on_batch = lambda ev: starts.append(ev.start)
    result = runner.run({"x": x}, outdir=out, resume=True)
    assert not {s // 64 for s in starts} & done  # finished shards were not redone
    assert result.skipped == 64 * len(done) and result.computed == len(x) - result.skipped
    doc = read_manifest(out)
    assert doc["complete"] is True and [s["index"] for s in doc["shards"]] == list(range(-(-len(x) // 64)))
    got = load_outputs(out)
    assert np.array_equal(got["_index"], np.arange(len(x))) and np.array_equal(got["y"], clean)


def test_inputs_from_files_and_iterables_stream_in_chunks(runner, x, clean, tmp_path, monkeypatch):
    from onnxpipe.core import sources

    monkeypatch.setattr(sources, "READ_BYTES", 7 * x[0].nbytes)  # force many small reads
    np.savez(tmp_path / "data.npz", x=x, labels=np.zeros(len(x)))  # extra arrays are left out
    assert np.array_equal(runner.run(tmp_path / "data.npz").outputs["y"], clean)
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "x.npy", x)
    assert np.array_equal(runner.run(folder).outputs["y"], clean)
    uneven = [{"x": x[a:b]} for a, b in [(0, 5), (5, 200), (200, 201), (201, len(x))]]
    assert np.array_equal(runner.run(uneven).outputs["y"], clean)
    with pytest.raises(InputError, match="expected dtype float32, received float64"):
        runner.run({"x": x.astype(np.float64)})
    with pytest.raises(InputError, match="has no x: expected inputs x, received z"):
        runner.run({"z": x})


def test_memory_stays_bounded_by_the_window(runner, x):
    pulled = [0]

    def source():
        for i in range(len(x)):
            pulled[0] += 1
            yield {"x": x[i:i + 1]}

    worst = [0]

    def watch(ev):
        worst[0] = max(worst[0], pulled[0] - (ev.start + ev.count))

    runner.on_batch = watch
    result = runner.run(source())
    assert result.computed == len(x)
    window = max(2 * runner.shard_size, runner.batch_size * runner.depth * 2 * 2)
    assert worst[0] <= window + runner.batch_size + runner.shard_size  # independent of the dataset's size


def test_failing_samples_are_reported_by_index():
    idx = np.arange(200) % 10
    idx[[5, 137]] = 99
    with BatchRunner(gather_model(), DEVICES, batch_size=16) as r:
        result = r.run({"idx": idx})
        assert [f.index for f in result.failed] == [5, 137]
        assert all("out of" in f.error or "idx" in f.error.lower() or "indices" in f.error.lower() for f in result.failed)
        keep = np.setdiff1d(np.arange(200), [5, 137])
        assert np.array_equal(result.indices, keep)
        np.testing.assert_array_equal(result.outputs["y"], np.arange(40, dtype=np.float32).reshape(10, 4)[idx[keep]])
        with pytest.raises(OnnxpipeError, match="all failed"):
            r.run({"idx": np.full(100, 99)})


def test_manifest_refuses_another_model(runner, x, tmp_path):
    runner.run({"x": x[:64]}, outdir=tmp_path / "j")
    with BatchRunner(gather_model(), ["cpu"]) as other, pytest.raises(InputError, match="another model"):
        other.run({"idx": np.zeros(10, np.int64)}, outdir=tmp_path / "j", resume=True)
    assert json.loads((tmp_path / "j" / "manifest.json").read_text())["complete"]


@pytest.mark.gpu
def test_cuda_and_cpu_workers_together(x, clean):
    with BatchRunner(cnn_model(), ["cuda:0", "cpu:0[threads=1]"], batch_size=32) as r:
        result = r.run({"x": x})
    np.testing.assert_allclose(result.outputs["y"], clean, rtol=1e-3, atol=1e-4)
    assert result.devices[0].placement["counts"].get("CUDAExecutionProvider", 0) >= 1


def test_outputs_bigger_than_the_shared_block_still_arrive():
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "double",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 70_000])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 70_000])],
                              [onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.random.default_rng(0).standard_normal((40, 70_000)).astype(np.float32)  # 2.2 MB per batch of 8
    with BatchRunner(model, ["cpu:0[threads=1]"], batch_size=8) as r:
        result = r.run({"x": x})
        slots = r.pool.workers[0].slots
        assert any(s.out.capacity >= 8 * 70_000 * 4 for s in slots)  # grown after the first batch came pickled
    np.testing.assert_array_equal(result.outputs["y"], x * 2)


def test_a_tie_in_leading_dims_batches_the_longest_axis():
    from onnxpipe.core.sources import split
    from onnxpipe.core.tensors import batched_inputs

    chunk = split({"x": np.zeros((240, 3)), "table": np.zeros((1, 3))})
    assert sorted(chunk.batched) == ["x"] and sorted(chunk.constant) == ["table"]
    assert batched_inputs({"x": np.zeros((240, 3)), "table": np.zeros((1, 3))}) == ({"x"}, 240)
