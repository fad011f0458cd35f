"""The CPU worker pool sized to the cores: one wide worker or one per core, by measurement, never oversubscribed."""

from __future__ import annotations

import dataclasses
import json
import urllib.request

import numpy as np
import onnx
import pytest
from conftest import conv_gemm_model, serving, triton_client

from onnxpipe.core.errors import InputError
from onnxpipe.core.hardware import cpu
from onnxpipe.runtimes import cpu_pool
from onnxpipe.runtimes.cpu_pool import MARGIN, CpuLayout, choose_layout, cpu_share, measure_layouts, probe_feeds
from onnxpipe.runtimes.providers import Device


def _never(*args):
    raise AssertionError("the measurement ran where the layout was already decided")


def _rates(wide: float, pool: float):
    def measure(model, feeds, layouts):
        (w1, t1), (w2, t2) = layouts
        assert (w1, w2, t2) == (1, t1, 1), layouts  # one wide worker first, then one single-thread worker per core
        return {layouts[0]: wide, layouts[1]: pool}
    return measure


def test_cpu_share_splits_the_cores_evenly():
    assert cpu_share(1, cores=8) == 8
    assert cpu_share(3, cores=8, reserve=1) == 2
    assert cpu_share(4, cores=2, reserve=1) == 1  # never below one thread


def test_measured_choice_prefers_one_wide_worker_unless_the_pool_is_clearly_faster():
    kw = dict(budget=4, cores=4, free_memory=1 << 40)
    pool = choose_layout("m.onnx", {}, measure=_rates(100.0, 100.0 * MARGIN), **kw)
    assert (pool.workers, pool.threads, pool.chosen_by) == (4, 1, "measured")
    assert pool.rates == {"1 x 4": 100.0, "4 x 1": pytest.approx(100.0 * MARGIN)}
    close = choose_layout("m.onnx", {}, measure=_rates(100.0, 105.0), **kw)  # within the margin: fewer processes
    assert (close.workers, close.threads) == (1, 4)
    wide = choose_layout("m.onnx", {}, measure=_rates(300.0, 120.0), **kw)
    assert (wide.workers, wide.threads, wide.chosen_by) == (1, 4, "measured")
    assert "4 x 1: 120 samples/s" in wide.describe() and wide.label == "1 worker x 4 threads"


def test_rules_when_measuring_is_pointless_or_unaffordable(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"\0" * 4096)
    one = choose_layout(model, _never, budget=1, cores=2, measure=_never)
    assert (one.workers, one.threads, one.chosen_by) == (1, 1, "rule")
    # the weights once per core would not fit: one wide worker, without measuring
    big = choose_layout(model, _never, budget=8, cores=8, measure=_never, free_memory=4096 * 8)
    assert (big.workers, big.threads, big.chosen_by) == (1, 8, "rule") and "memory" in big.reason
    slow = choose_layout(model, {}, budget=8, cores=8, measure=lambda *a: None, free_memory=1 << 40)
    assert (slow.workers, slow.threads, slow.chosen_by) == (1, 8, "rule") and "too slow" in slow.reason


def test_forced_layouts_and_no_oversubscription():
    assert choose_layout("m.onnx", _never, budget=3, cores=4, workers=2, measure=_never).threads == 1
    t = choose_layout("m.onnx", _never, budget=7, cores=8, threads=2, measure=_never)
    assert (t.workers, t.threads, t.chosen_by) == (1, 2, "user") and t.describe() == "1 worker x 2 threads (user: threads=2)"
    assert choose_layout("m.onnx", _never, budget=3, cores=4, workers=2, threads=2, measure=_never).workers == 2
    with pytest.raises(InputError, match="6 threads on 4 cores"):
        choose_layout("m.onnx", _never, budget=3, cores=4, workers=3, threads=2, measure=_never)
    for cores in range(1, 17):
        for rates in ((1.0, 9.0), (9.0, 1.0)):
            lay = choose_layout("m.onnx", {}, budget=cpu_share(1, cores=cores, reserve=1), cores=cores,
                                measure=_rates(*rates), free_memory=1 << 40)
            assert 1 <= lay.workers * lay.threads <= max(1, cores - 1)


def test_layout_devices_keep_the_device_options():
    devs = CpuLayout(3, 1, "user").devices(Device.parse("cpu[spinning=false,arena=false]"))
    assert [str(d) for d in devs] == [f"cpu:{k}[threads=1,spinning=false,arena=false]" for k in range(3)]
    assert str(CpuLayout(3, 1, "user").devices(Device.parse("cpu"))[0]) == "cpu:0[threads=1]"
    # a wide worker does not spin its threads on the cores the server decodes on, unless told to
    assert CpuLayout(1, 4, "rule").devices(Device.parse("cpu"))[0].options.spinning is False
    assert CpuLayout(1, 4, "rule").devices(Device.parse("cpu[spinning=true]"))[0].options.spinning is True


def test_measurement_runs_the_model_on_both_layouts(conv_gemm_path):
    feeds = probe_feeds(conv_gemm_path, 4)
    assert feeds["x"].shape[0] == 4
    rates = measure_layouts(str(conv_gemm_path), feeds, [(1, 2), (2, 1)], budget_s=0.3, rounds=2)
    assert set(rates) == {(1, 2), (2, 1)} and all(r > 0 for r in rates.values())
    assert measure_layouts(str(conv_gemm_path), feeds, [(1, 1)], budget_s=0.0) is None  # no time: the rule decides


def test_server_serves_correct_answers_on_the_chosen_pool(tmp_path, monkeypatch):
    import onnxruntime as ort

    from onnxpipe.serve import server as server_mod

    repo = tmp_path / "repo"
    repo.mkdir()
    onnx.save(conv_gemm_model(), repo / "cnn.onnx")
    # a three-core machine: two cores for workers, and the measurement says the pool serves more
    monkeypatch.setattr(server_mod, "cpu", lambda: dataclasses.replace(cpu(), cores=3))
    monkeypatch.setattr(cpu_pool, "measure_layouts", _rates(100.0, 180.0))
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(repo / "cnn.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    httpclient = pytest.importorskip("tritonclient.http")
    with serving(repo, "cpu", max_batch_size=4) as (url, srv):
        m = srv.models["cnn"]
        assert (m.layout.workers, m.layout.threads, m.layout.chosen_by) == (2, 1, "measured")
        assert len(m.pool.pids()) == 2 and all(m.pool.pids())
        meta = json.load(urllib.request.urlopen(url + "/v2/models/cnn"))
        assert meta["cpu_pool"]["workers"] == 2 and meta["cpu_pool"]["samples_per_s"]["2 x 1"] == 180.0
        with triton_client(url) as client:
            inp = httpclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            pending = [client.async_infer("cnn", [inp]) for _ in range(8)]
            for p in pending:
                np.testing.assert_allclose(p.get_result().as_numpy(srv.models["cnn"].entry.outputs[0].name), ref,
                                           rtol=1e-5, atol=1e-5)


def test_workers_option_needs_one_cpu_device(tmp_path):
    from onnxpipe.runtimes.providers import parse_devices
    from onnxpipe.serve.server import InferenceServer, ServeOptions

    with pytest.raises(InputError, match="single cpu device"):
        InferenceServer([], parse_devices("cpu:0,cpu:1"), ServeOptions(port=0, cpu_workers=2))
