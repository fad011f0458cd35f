"""The batch runner on a local Ray (one instance for the module): order kept, a dead actor replaced."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from conftest import conv_gemm_model

from onnxpipe.core.session import Session
from onnxpipe.runtimes import BatchRunner
from onnxpipe.runtimes.manifest import load_outputs

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a local Ray takes 6-15 s to start


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((300, 3, 8, 8)).astype(np.float32)


def test_ray_actors_keep_input_order_and_survive_a_killed_actor(local_ray, x, tmp_path):
    with Session(conv_gemm_model(), threads=1) as s:
        expected = s.run({"x": x})["y"]
    killed = []

    def kill(ev):
        if ev.task == 3 and not killed:
            killed.append(ev.pid)
            os.kill(ev.pid, signal.SIGKILL)

    with BatchRunner(conv_gemm_model(), ["cpu:0[threads=1]", "cpu:1[threads=1]"], batch_size=16, shard_size=64,
                     backend="ray", on_batch=kill) as runner:
        result = runner.run({"x": x}, outdir=tmp_path / "out")
    assert killed and sum(d.restarts for d in result.devices) == 1 and not result.failed
    assert all(d.samples > 0 for d in result.devices) and result.backend == "ray"
    got = load_outputs(tmp_path / "out")
    assert np.array_equal(got["_index"], np.arange(len(x)))
    np.testing.assert_allclose(got["y"], expected, rtol=1e-6, atol=1e-6)


def test_an_actor_that_cannot_start_is_named(local_ray, tmp_path):
    import onnx

    from onnxpipe.core.errors import OnnxpipeError

    path = tmp_path / "m.onnx"
    onnx.save(conv_gemm_model(), path)
    runner = BatchRunner(path, ["cpu:0[threads=1]"], backend="ray")
    path.write_bytes(b"not a model")  # the actor, not the dispatcher, finds out
    with pytest.raises(OnnxpipeError, match="cpu:0: .*(cannot load|INVALID_PROTOBUF|Protobuf)"):
        runner.start()
    runner.close()
