"""onnxpipe auto: candidates measured on the device, the best written with a recipe that reproduces it."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import onnx
from conftest import conv_gemm_model, run_cli

from onnxpipe.passes.base import Pass, PassResult
from onnxpipe.pipeline.auto import auto
from onnxpipe.pipeline.auto_candidates import singles
from onnxpipe.pipeline.auto_report import pareto


def _onnx(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(conv_gemm_model(), path)
    return path


def _only(*labels):
    return lambda options: [o for o in options if o[0] in labels]


def test_singles_follow_the_device_and_the_registry(monkeypatch):
    model = conv_gemm_model()
    cpu = [label for label, _, _ in singles(model, "cpu", has_data=True)]
    assert "int8 static qdq minmax" in cpu and "int8 static qoperator minmax" in cpu and "fp16" not in cpu
    assert not any("static" in label for label, _, _ in singles(model, "cpu", has_data=False))
    assert any("reconstruct" in str(spec) for _, _, spec in singles(model, "cpu", has_data=True))
    from onnxpipe import passes

    assert ("fuse" in cpu) == ("fuse" in passes.PASSES)
    monkeypatch.delitem(passes.PASSES, "fuse", raising=False)  # without a fuse pass, no fuse candidate
    assert "fuse" not in [label for label, _, _ in singles(model, "cpu", has_data=False)]
    monkeypatch.setitem(passes.PASSES, "fuse", "onnxpipe.passes.strip:Strip")  # a registered fuse pass joins
    assert singles(model, "cpu", has_data=False)[0][0] == "fuse"
    # a MatMul-heavy model: dynamic int8 first, and int4 when the quantize pass offers it
    from onnx import helper

    w = onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    mm = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64])], [w]))
    labels = [label for label, _, _ in singles(mm, "cpu", has_data=False)]
    assert labels[:2] == ["fuse", "int8 dynamic"]
    from onnxpipe.pipeline.auto_candidates import _quantize_accepts

    assert ("int4" in labels) == _quantize_accepts({"mode": "int4"})


def test_pareto_front():
    assert pareto([(1.0, 0.9), (2.0, 0.95), (3.0, 0.94), (0.5, 0.5)]) == [3, 0, 1]


def test_auto_size_writes_everything_and_the_recipe_reproduces_the_winner(tmp_path):
    from onnxpipe.pipeline import run

    out = tmp_path / "auto"
    result = auto(_onnx(tmp_path), out, objective="size", budget_s=40, max_drop=0.05,
                  candidates_filter=_only("int8 dynamic", "prune 0.25", "strip"))
    for name in ("model.onnx", "recipe.yaml", "tuned.json", "leaderboard.json", "leaderboard.md", "leaderboard.png"):
        assert (out / name).is_file(), name
    board = json.loads((out / "leaderboard.json").read_text())
    names = [c["name"] for c in board["candidates"]]
    assert names == [c.name for c in result.candidates] and len(names) >= 5
    md = (out / "leaderboard.md").read_text()
    for c in result.candidates:
        assert f"| {c.name} |" in md
        if c.status == "measured":
            assert c.latency_ms > 0 and c.size_bytes > 0 and c.metric is not None
    # int8 weights and short names shrink this model: the winner stacks them, smaller than float
    w, base = result.winner, result.baseline
    assert w is not base and w.size_bytes < 0.6 * base.size_bytes, [(c.name, c.size_bytes) for c in result.candidates]
    assert base.metric - w.metric <= 0.05
    # a variant that did not help alone is never part of a combination
    helped = {c.name.removeprefix("simplify + ") for c in result.candidates if c.kept and c.parent == "simplify"}
    for c in result.candidates:
        parts = c.name.split(" + ")
        if len(parts) > 2:
            assert set(parts[1:]) <= helped, (c.name, helped)
    # onnxpipe run with the written recipe gives the same model
    rerun = run(out / "recipe.yaml", tmp_path / "rerun")
    assert all(s.kept for s in rerun.pipeline.stages)
    a, b = onnx.load(str(out / "model.onnx")), onnx.load(str(rerun.model_path))
    assert Counter(n.op_type for n in a.graph.node) == Counter(n.op_type for n in b.graph.node)
    from onnxpipe.core.session import run_model

    x = np.random.default_rng(3).standard_normal((4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(list(run_model(a, {a.graph.input[0].name: x}).values())[0],
                               list(run_model(b, {b.graph.input[0].name: x}).values())[0], atol=1e-6)


def test_auto_stays_within_its_budget_and_lists_every_candidate(tmp_path):
    out = tmp_path / "auto"
    t0 = time.perf_counter()
    result = auto(_onnx(tmp_path), out, objective="latency", budget_s=6, batch_size=2)
    elapsed = time.perf_counter() - t0 - result.prepare_s  # the budget starts once the baseline is built
    assert elapsed <= 6 * 1.1, elapsed
    assert json.loads((out / "leaderboard.json").read_text())["elapsed_s"] <= 6 * 1.1
    board = json.loads((out / "leaderboard.json").read_text())
    assert len(board["candidates"]) == len(result.candidates) >= 3
    assert all(c["status"] in ("measured", "failed", "skipped") and c["why"] for c in board["candidates"])
    # the winner is never slower than the simplified float model beyond noise
    w = result.winner
    assert w is result.baseline or w.ratio < 1


class Sleepy(Pass):
    """Test-only: a pass that takes far longer than the search's budget."""

    name = "sleepy"

    def apply(self, model, ctx):
        time.sleep(20)
        return PassResult(model)


def test_a_pass_still_building_at_the_budget_end_is_abandoned(tmp_path, monkeypatch):
    from onnxpipe.pipeline import auto as auto_mod

    monkeypatch.setattr(auto_mod, "singles", lambda *a, **k: [("sleepy", "prune", Sleepy()), ("strip", "strip", "strip")])
    t0 = time.perf_counter()
    result = auto(_onnx(tmp_path), tmp_path / "o", objective="size", budget_s=5)
    assert time.perf_counter() - t0 - result.prepare_s <= 5 * 1.1
    by_name = {c.name: c for c in result.candidates}
    assert by_name["simplify + sleepy"].why.startswith("budget: still building")
    assert by_name["simplify + strip"].status == "skipped" and "abandoned" in by_name["simplify + strip"].why
    assert result.winner is result.baseline and (tmp_path / "o" / "model.onnx").is_file()


def test_cli_auto_bad_input_is_one_line(tmp_path):
    proc = run_cli("auto", str(_onnx(tmp_path)), "-o", str(tmp_path / "o"), "--objective", "speed")
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown objective 'speed'")
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
    proc = run_cli("auto", str(_onnx(tmp_path)), "-o", str(tmp_path / "o"), "--metric", "top1")
    assert proc.returncode == 2 and "--eval" in proc.stderr
