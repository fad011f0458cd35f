"""The dispatcher's logic on a simulated pool (no processes): load balance, deaths, poison samples,
fixed batches, shared inputs; plus micro-batch cutting, shared memory and input sources."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from conftest import conv_gemm_model, write_factory
from onnx import helper

from onnxpipe.core.errors import InputError
from onnxpipe.core.session import Session
from onnxpipe.core.sources import open_source, split
from onnxpipe.runtimes.batch import BatchRunner
from onnxpipe.runtimes.shm import Attached, Block, layout_of, read
from onnxpipe.runtimes.tasks import Job, cut_tasks
from onnxpipe.runtimes.worker import Event


@dataclass
class FakeWorker:
    device: object
    ready: bool = False
    alive: bool = True
    restarts: int = 0
    pid: int = 0
    info: dict = field(default_factory=dict)
    queue: list = field(default_factory=list)  # (task id, due time, outputs or error)

    def free(self) -> int:
        return 2 - len(self.queue) if self.ready else 0

    def inflight(self) -> list[int]:
        return [t for t, _, _ in self.queue]


class FakePool:
    """Runs batches in this process; worker ``k`` takes ``delays[k]`` s per sample, one batch after another.

    ``poison(feeds)`` True makes the worker die on that batch, as a segfault would.
    """

    def __init__(self, model, devices, delays, poison=lambda feeds: False, placement=None):
        self.session = Session(model)
        self.placement = placement
        self.workers = [FakeWorker(d, pid=1000 + i) for i, d in enumerate(devices)]
        self.delays, self.poison, self.events = delays, poison, []
        self.submitted = [0] * len(devices)

    def start(self):
        for wid, w in enumerate(self.workers):
            w.ready = True
            self.events.append(Event("ready", wid, info={"pid": w.pid, "load_s": 0.0, "placement": self.placement}))

    def submit(self, wid, task, feeds):
        w = self.workers[wid]
        self.submitted[wid] += 1
        start = max([time.perf_counter()] + [due for _, due, _ in w.queue])
        rows = max(np.shape(v)[0] if np.ndim(v) else 1 for v in feeds.values())
        if self.poison(feeds):
            w.queue.append((task, start + 1e-4, "die"))
            return
        try:
            out = self.session.run(feeds)
        except InputError as exc:
            out = exc
        w.queue.append((task, start + self.delays[wid] * rows, out))

    def poll(self, timeout):
        events, self.events = self.events, []
        deadline = time.perf_counter() + timeout
        while not events and time.perf_counter() < deadline:
            now = time.perf_counter()
            for wid, w in enumerate(self.workers):
                while w.alive and w.queue and w.queue[0][1] <= now:
                    task, due, out = w.queue.pop(0)
                    if isinstance(out, str):  # dies: this batch was running, the rest only queued
                        lost = [task] + [t for t, _, _ in w.queue]
                        w.queue, w.alive, w.ready = [], False, False
                        events.append(Event("died", wid, task, message="signal 11", info={"lost": lost}))
                    elif isinstance(out, Exception):
                        events.append(Event("error", wid, task, message=str(out)))
                    else:
                        events.append(Event("done", wid, task, out, self.delays[wid]))
            if not events:
                time.sleep(1e-4)
        return events

    def restart(self, wid):
        w = self.workers[wid]
        w.restarts += 1
        w.alive = w.ready = True
        self.events.append(Event("ready", wid, info={"pid": w.pid + 100, "load_s": 0.0}))

    def close(self):
        self.session.close()


def scale_model(batch: int | str = "N") -> onnx.ModelProto:
    """y = x * s with x[batch, 3] and a scalar s shared by the whole batch; z = ReduceSum(x) has no sample axis."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["y"]), helper.make_node("ReduceSum", ["x"], ["z"], keepdims=0)], "scale",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3]),
         helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 3]),
         helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def run_fake(model, data, delays, **kw):
    poison = kw.pop("poison", lambda feeds: False)
    devices = kw.pop("devices", [f"cpu:{i}" for i in range(len(delays))])
    placement = kw.pop("placement", None)
    runner = BatchRunner(model, devices, **kw)
    pool = FakePool(model, runner.devices, delays, poison, placement)
    runner.start(pool)
    try:
        return runner.run(data), pool
    finally:
        runner.close()


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((400, 3, 8, 8)).astype(np.float32)


def test_faster_devices_get_more(x):
    result, pool = run_fake(conv_gemm_model(), {"x": x}, [2e-5, 5e-3], batch_size=8)  # 0.16 ms vs 40 ms a batch
    fast, slow = result.devices
    assert fast.samples > 3 * slow.samples > 0  # pull by free slot: the fast one comes back for more
    with Session(conv_gemm_model()) as s:
        np.testing.assert_allclose(result.outputs["y"], s.run({"x": x})["y"], rtol=1e-6, atol=1e-6)


def test_a_poison_sample_is_reported_after_max_attempts_and_the_rest_survives(x):
    bad = 77
    def poison(feeds):
        return any(np.array_equal(row, x[bad]) for row in feeds["x"])

    result, pool = run_fake(conv_gemm_model(), {"x": x}, [1e-5, 1e-5], batch_size=16, max_attempts=2,
                            max_restarts=20, poison=poison)
    assert [f.index for f in result.failed] == [bad] and "died (signal 11)" in result.failed[0].error
    assert np.array_equal(result.indices, np.delete(np.arange(len(x)), bad))
    assert sum(w.restarts for w in pool.workers) >= 2  # the batch twice, then the sample alone twice
    with Session(conv_gemm_model()) as s:
        np.testing.assert_allclose(result.outputs["y"], np.delete(s.run({"x": x})["y"], bad, axis=0), rtol=1e-6, atol=1e-6)


def test_fixed_batch_pads_the_tail_and_keeps_outputs_without_sample_axis():
    model = scale_model(batch=4)
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    result, _ = run_fake(model, {"x": x, "s": np.float32(2.0)}, [0.0], batch_size=3)
    assert result.notes and "fixed at 4" in result.notes[0]
    np.testing.assert_array_equal(result.outputs["y"], x * 2)  # the padded rows are dropped
    sums = {k: float(v) for k, v in result.per_batch.items()}
    assert sums == {"z@0": float(x[:4].sum()), "z@4": float(x[4:8].sum()),
                    "z@8": float(x[8:].sum() + 2 * x[9].sum())}  # the tail was padded with its last sample


def test_gpu_nodes_placed_on_cpu_are_reported(x):
    placement = {"counts": {"CUDAExecutionProvider": 5, "CPUExecutionProvider": 2}, "cpu_nodes": ["Shape", "Gather"]}
    result, _ = run_fake(conv_gemm_model(), {"x": x[:20]}, [0.0], devices=["cuda:0"], placement=placement)
    assert "cuda:0: 2 of 7 nodes run on CPU (Shape, Gather)" in result.notes
    assert result.as_dict()["devices"][0]["placement"]["counts"]["CPUExecutionProvider"] == 2


def test_micro_batches_never_cross_shards_or_a_change_of_shared_inputs():
    runner = BatchRunner(scale_model(), ["cpu"], batch_size=4, shard_size=6)
    chunks = [{"x": np.zeros((5, 3), np.float32), "s": np.float32(1)},
              {"x": np.ones((5, 3), np.float32), "s": np.float32(1)},
              {"x": np.full((3, 3), 2, np.float32), "s": np.float32(3)}]
    tasks = list(cut_tasks(open_source(chunks, runner.inputs), runner.plan(), Job(skip=set())))
    spans = [(t.start, t.count, float(t.constant["s"])) for t in tasks]
    # 4 samples, then 2 up to the shard boundary at 6, ...; no batch mixes s=1 and s=3 samples
    assert spans == [(0, 4, 1.0), (4, 2, 1.0), (6, 4, 1.0), (10, 2, 3.0), (12, 1, 3.0)]
    assert all(t.batched["x"].shape == (t.count, 3) for t in tasks)
    skipped = list(cut_tasks(open_source(chunks, runner.inputs), runner.plan(), Job(skip={0})))
    assert [t.start for t in skipped] == [6, 10, 12]


def test_shared_memory_blocks_round_trip_and_grow():
    block = Block(64)
    try:
        arrays = {"a": np.arange(10, dtype=np.int64), "b": np.ones((3, 5), np.float16)}
        lay = block.put(arrays)
        assert all(off % 64 == 0 for *_, off in lay.entries)
        attached = Attached()
        got = read(attached.buf(block.name, "in0"), lay)
        assert all(np.array_equal(got[k], arrays[k]) for k in arrays)
        old = block.name
        big = {"a": np.arange(10_000, dtype=np.float64)}
        lay = block.put(big)
        assert block.name != old and block.capacity >= layout_of(big).nbytes
        assert np.array_equal(read(attached.buf(block.name, "in0"), lay)["a"], big["a"])
        attached.close()
    finally:
        block.close()


def test_sources_split_batched_and_shared_inputs_and_count_samples(tmp_path):
    c = split({"x": np.zeros((4, 3)), "table": np.zeros((7, 2)), "s": np.float32(1), "m": np.zeros((4,))})
    assert sorted(c.batched) == ["m", "x"] and sorted(c.constant) == ["s", "table"]
    np.savez(tmp_path / "a.npz", x=np.zeros((5, 3), np.float32))
    np.savez(tmp_path / "b.npz", x=np.ones((7, 3), np.float32))
    src = open_source(tmp_path, [])
    assert src.total == 12 and sum(ch.rows for ch in src.chunks()) == 12
    assert open_source(tmp_path / "a.npz", []).total == 5
    factory = write_factory(tmp_path, """
        import numpy as np

        def data():
            for k in range(3):
                yield {"x": np.full((4, 3), k, np.float32)}
    """, name="feed.py")
    chunks = list(open_source(f"{factory}:data", []).chunks())
    assert [float(c.batched["x"][0, 0]) for c in chunks] == [0.0, 1.0, 2.0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no .npy or .npz"):
        open_source(tmp_path / "empty", [])
    with pytest.raises(InputError, match="no such file"):
        open_source(tmp_path / "missing.npz", [])
