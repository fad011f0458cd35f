"""Serving a split model (``onnxpipe serve DIR`` on a ``pipeline.json`` folder) through ``tritonclient[http]``."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import residual_concat_model, serving, triton_client

pytest.importorskip("aiohttp")
httpclient = pytest.importorskip("tritonclient.http")
ort = pytest.importorskip("onnxruntime")

from onnxpipe.core.errors import InputError
from onnxpipe.partition.split import split_model
from onnxpipe.runtimes.providers import Device
from onnxpipe.serve.repository import discover
from onnxpipe.serve.staged import StagedPool, stage_devices

ATOL = 1e-5


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_split")
    model = residual_concat_model(batched_side=True)  # cut after b: r1 (the skip) and b cross
    onnx.save(model, root / "whole.onnx")
    result = split_model(model, root / "net", cuts=["b"])
    assert result.ok and [set(p.inputs) for p in result.spec.parts] == [{"x"}, {"r1", "b", "z"}]
    return root


@pytest.fixture(scope="module")
def whole(split):
    sess = ort.InferenceSession(str(split / "whole.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(None, feeds)))


@pytest.fixture(scope="module")
def server(split):
    with serving(split / "net", "cpu:0,cpu:1", max_batch_size=8, max_queue_delay_ms=20) as running:
        yield running


@pytest.fixture
def client(server):
    with triton_client(server[0]) as c:
        yield c


def feeds_of(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((rows, 8, 8, 8)).astype(np.float32),
            "z": rng.standard_normal((rows, 3)).astype(np.float32)}


def inputs_of(feeds: dict[str, np.ndarray], binary: bool = True) -> list:
    out = []
    for name, arr in feeds.items():
        i = httpclient.InferInput(name, list(arr.shape), "FP32")
        i.set_data_from_numpy(arr, binary_data=binary)
        out.append(i)
    return out


def assert_whole(result, expected: dict[str, np.ndarray]) -> None:
    for name in ("y", "feat"):
        np.testing.assert_allclose(result.as_numpy(name), expected[name], atol=ATOL, rtol=0, err_msg=name)


def test_stages_are_dealt_round_robin_over_devices():
    devs = [Device.parse(f"cpu:{i}") for i in range(5)]
    assert [[d.label for d in g] for g in stage_devices(devs, 2)] == [["cpu:0", "cpu:2", "cpu:4"], ["cpu:1", "cpu:3"]]
    assert [[d.label for d in g] for g in stage_devices(devs[:1], 3)] == [["cpu:0"]] * 3


def test_a_pipeline_folder_is_one_model_alone_or_in_a_repository(split, tmp_path):
    entry = discover(split / "net", name="resnetish")[0]
    assert entry.name == "resnetish" and entry.pipeline is not None and entry.batchable
    assert [i.name for i in entry.inputs] == ["x", "z"] and entry.output_names == ["y", "feat"]
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "whole.onnx").write_bytes((split / "whole.onnx").read_bytes())
    (repo / "net").symlink_to(split / "net", target_is_directory=True)
    found = {e.name: e for e in discover(repo)}
    assert found["net"].pipeline is not None and found["whole"].pipeline is None
    assert [i.name for i in found["net"].inputs] == [i.name for i in found["whole"].inputs]
    with pytest.raises(InputError, match="not allowed in a URL path"):
        discover(split / "net", name="bad name")


def test_metadata_is_the_whole_models_and_each_stage_has_its_device(client, server):
    assert client.is_server_ready() and client.is_model_ready("net")
    meta = client.get_model_metadata("net")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8, 8, 8]},
                              {"name": "z", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "feat", "datatype": "FP32", "shape": [-1, 8, 8, 8]}]
    assert client.get_model_config("net")["max_batch_size"] == 8
    pool = server[1].models["net"].pool
    assert isinstance(pool, StagedPool)
    assert [(w["stage"], w["part"], w["device"]) for w in pool.info()] == [
        (0, "part0.onnx", "cpu:0[threads=1]"), (1, "part1.onnx", "cpu:1[threads=1]")]


@pytest.mark.parametrize("binary", [True, False])
def test_outputs_equal_the_whole_model(client, whole, binary):
    rng = np.random.default_rng(1)
    for rows in (1, 3):
        feeds = feeds_of(rng, rows)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("y", "feat")]
        assert_whole(client.infer("net", inputs_of(feeds, binary), outputs=outputs), whole(feeds))
    only = client.infer("net", inputs_of(feeds), outputs=[httpclient.InferRequestedOutput("y")])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["y"]


def test_concurrent_requests_are_batched_pipelined_and_correct(client, server, whole):
    srv = server[1]
    pool = srv.models["net"].pool
    rng = np.random.default_rng(2)
    requests = [feeds_of(rng, int(rng.integers(1, 4))) for _ in range(40)]
    hist = srv.metrics.batch_requests
    before = hist.count(model="net"), hist.total(model="net")
    pending = [client.async_infer("net", inputs_of(f)) for f in requests]
    for feeds, p in zip(requests, pending):
        assert_whole(p.get_result(timeout=60), whole(feeds))
    batches, served = hist.count(model="net") - before[0], hist.total(model="net") - before[1]
    assert served == 40 and batches < 40, f"{served} requests ran in {batches} batches: nothing was batched"
    # stage 0 held a batch while stage 1 held another: the stages overlapped
    assert pool.peak_busy_stages == 2


def test_a_killed_stage_worker_is_restarted_and_serving_goes_on(client, server, whole):
    srv = server[1]
    pool = srv.models["net"].pool
    victim = pool.stages[1].pids()[0]
    rng = np.random.default_rng(3)
    requests = [feeds_of(rng, 2) for _ in range(40)]
    held = []

    def kill_when_busy() -> None:  # a thread: the client's requests only go out while we wait on them
        deadline = time.monotonic() + 30
        while pool.held()[1] == 0 and time.monotonic() < deadline:
            time.sleep(0.0002)
        held.append(pool.held()[1])
        os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    pending = [client.async_infer("net", inputs_of(f)) for f in requests]
    for feeds, p in zip(requests, pending):  # every request answered, right, though stage 1 died holding batches
        assert_whole(p.get_result(timeout=60), whole(feeds))
    killer.join()
    assert held[0] > 0, "stage 1 never held a batch: the kill hit an idle worker"
    deadline = time.monotonic() + 60
    while pool.ready_workers() < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool.ready_workers() == 1 and pool.stages[1].pids()[0] not in (victim, None)
    assert pool.restarts() >= 1
    assert srv.metrics.restarts.value(model="net", device="stage1/cpu:1") >= 1
    feeds = feeds_of(rng, 1)
    assert_whole(client.infer("net", inputs_of(feeds)), whole(feeds))
    assert client.is_server_ready()
