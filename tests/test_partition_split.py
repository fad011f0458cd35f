"""Splitting models into stages: cuts across residual and Concat branches, If outer-scope names, checked sequences."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import residual_concat_model, run_cli, with_random_weights

from onnxpipe.core.errors import CheckFailedError, InputError
from onnxpipe.core.session import Session
from onnxpipe.partition.cut import find_cuts
from onnxpipe.partition.profile import profile_graph
from onnxpipe.partition.spec import PipelineSpec, run_sequence
from onnxpipe.partition.split import split_model


def if_model() -> onnx.ModelProto:
    """An If whose branches read ``t`` from the outer scope: a cut between ``t`` and the If carries it."""
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    cond_net (float[N, 4] x, bool flag) => (float[N, 4] y) {
        t = MatMul (x, w)
        u = Relu (t)
        y = If (flag) <
            then_branch = g1 () => (float[N, 4] o1) { o1 = Add (t, u) },
            else_branch = g2 () => (float[N, 4] o2) { o2 = Sub (t, u) }
        >
    }
    """)
    return with_random_weights(model, {"w": (4, 4)})


def feeds(batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 8, 8, 8)).astype(np.float32), "scale": np.array(1.5, np.float32)}


def whole_and_parts(model: onnx.ModelProto, folder, inputs) -> tuple[dict, dict]:
    spec = PipelineSpec.load(folder)
    sessions = [Session(str(spec.part_path(k))) for k in range(len(spec.parts))]
    with Session(model) as s:
        expected = s.run(inputs)
    got = run_sequence(sessions, spec.parts, spec.output_names, inputs)
    for sess in sessions:
        sess.close()
    return expected, got


def assert_close(expected: dict, got: dict) -> None:
    assert set(got) == set(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, atol=1e-5, rtol=1e-5)


def test_cut_inside_residual_block_carries_the_skip(tmp_path):
    model = residual_concat_model()
    result = split_model(model, tmp_path / "s", cuts=["b"])
    first, second = result.spec.parts
    assert {t["name"] for t in result.spec.extra["cuts"][0]["tensors"]} == {"r1", "b", "scale"}
    assert set(second.inputs) == {"r1", "b", "scale"}  # the skip, the branch and the pass-through input
    assert "w1" in {i.name for i in onnx.load(str(tmp_path / "s" / first.file)).graph.initializer}
    assert "w1" in {i.name for i in onnx.load(str(tmp_path / "s" / second.file)).graph.initializer}  # duplicated
    assert_close(*whole_and_parts(model, tmp_path / "s", feeds()))


def test_cut_between_concat_branches_sends_both_sides(tmp_path):
    model = residual_concat_model()
    result = split_model(model, tmp_path / "s", cuts=["c1"])
    first, second = result.spec.parts
    assert "feat" in first.outputs and "c1" in first.outputs  # c2 is computed after the cut, from feat
    assert set(second.inputs) == {"c1", "feat", "scale"}
    assert result.spec.output_names == ["y", "feat"]
    assert_close(*whole_and_parts(model, tmp_path / "s", feeds(batch=5, seed=1)))


def test_three_way_split_balances_flops_and_equals_the_whole(tmp_path):
    model = residual_concat_model()
    result = split_model(model, tmp_path / "s", parts=3, balance="flops", batch=2)
    parts = result.spec.parts
    assert len(parts) == 3 and result.ok
    total = sum(p.flops for p in parts)
    assert total == pytest.approx(sum(profile_graph(model, batch=2).flops))
    assert max(p.flops for p in parts) < 0.6 * total  # four equal convs: no part holds most of the work
    for k, p in enumerate(parts):
        part = onnx.load(str(tmp_path / "s" / p.file))
        onnx.checker.check_model(part, full_check=True)
        assert [i.name for i in part.graph.input] == p.inputs
        assert p.weight_bytes > 0 and p.peak_activation_bytes > 0
    doc = json.loads((tmp_path / "s" / "pipeline.json").read_text())
    assert doc["check"]["ok"] and [c["after_part"] for c in doc["cuts"]] == [0, 1]
    assert all(c["bytes"] == sum(t["bytes"] for t in c["tensors"]) > 0 for c in doc["cuts"])
    assert_close(*whole_and_parts(model, tmp_path / "s", feeds(batch=4, seed=2)))


def test_params_balance_puts_the_heavy_weight_alone():
    """A chain whose last MatMul holds most weights: balancing bytes keeps it apart from the others."""
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    chain (float[N, 16] x) => (float[N, 256] y) {
        a = MatMul (x, w1)
        b = Relu (a)
        c = MatMul (b, w2)
        d = Relu (c)
        y = MatMul (d, w3)
    }
    """)
    model = with_random_weights(model, {"w1": (16, 16), "w2": (16, 16), "w3": (16, 256)})
    plan = find_cuts(profile_graph(model), 2, balance="params")
    assert plan.bounds[1] in (3, 4)  # w2 with w3 would exceed the best bottleneck (w3 alone) by 6%
    assert plan.loads[1] == 16 * 256 * 4
    flops = find_cuts(profile_graph(model), 2, balance="flops")
    assert flops.loads[0] < flops.loads[1] and flops.bounds[1] == 4  # the big MatMul dominates the FLOPs too


def test_if_branches_outer_scope_names_cross_the_cut(tmp_path):
    model = if_model()
    result = split_model(model, tmp_path / "s", cuts=["u"])
    assert set(result.spec.parts[1].inputs) == {"t", "u", "flag"}
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    for flag in (True, False):
        assert_close(*whole_and_parts(model, tmp_path / "s", {"x": x, "flag": np.array(flag)}))


def test_a_cut_tensor_that_does_not_exist_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"cannot cut at .c3.: it is not a tensor of the model \(did you mean c2, c1\?\)"):
        split_model(residual_concat_model(), tmp_path / "s", cuts=["c3"])
    with pytest.raises(InputError, match="it is a graph input"):
        split_model(residual_concat_model(), tmp_path / "s", cuts=["x"])
    with pytest.raises(InputError, match="leaves nothing for the last stage"):
        split_model(residual_concat_model(), tmp_path / "s", cuts=["y"])
    assert not (tmp_path / "s").exists()
    path = tmp_path / "m.onnx"
    onnx.save(residual_concat_model(), path)
    proc = run_cli("split", str(path), "-o", str(tmp_path / "cli"), "--cut", "nope")
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot cut at 'nope'")
    assert "Traceback" not in proc.stderr


def test_failed_check_writes_nothing(tmp_path, monkeypatch):
    from onnxpipe.core.compare import Comparison
    from onnxpipe.partition import split as split_mod

    monkeypatch.setattr(split_mod, "check_sequence",
                        lambda *a, **k: [Comparison("y", 0.5, 0.5, False, 1.0)])
    with pytest.raises(CheckFailedError, match="disagree with the whole model on 'y'"):
        split_model(residual_concat_model(), tmp_path / "s", parts=2)
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_cli_split_writes_parts_with_externalwith_random_weights(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(residual_concat_model(), path)
    out = tmp_path / "split"
    proc = run_cli("split", str(path), "-o", str(out), "--parts", "2", "--balance", "memory", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["format"] == "onnxpipe-pipeline/1" and doc["balance"] == "memory" and len(doc["parts"]) == 2
    for p in doc["parts"]:
        assert (out / p["file"]).is_file() and (out / f"{p['file']}.data").is_file()
    # a second split with fewer parts replaces the first: no stale part is left behind
    assert run_cli("split", str(path), "-o", str(out), "--parts", "3").returncode == 0
    assert run_cli("split", str(path), "-o", str(out), "--parts", "2").returncode == 0
    assert sorted(f.name for f in out.iterdir() if f.suffix == ".onnx") == ["part0.onnx", "part1.onnx"]
