"""Recipe objectives: each stage is measured on the target and rolled back when it made the objective worse."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import conv_gemm_model, run_cli
from onnx import helper

from onnxpipe.core.errors import InputError
from onnxpipe.core.timing import ratio_noise
from onnxpipe.passes.base import Pass, PassResult
from onnxpipe.pipeline import optimize
from onnxpipe.pipeline.objective import Objective, timing_feeds
from onnxpipe.pipeline.recipe import load_recipe


class SlowDown(Pass):
    """Test-only: same outputs, plus ~4M multiply-adds per sample and 4 MB of weights added as ``+ 0 * work``."""

    name = "slow-down"

    def __init__(self, keep: bool = False) -> None:
        super().__init__({})
        self.keep = keep

    def apply(self, model, ctx):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        g = out.graph
        x, y = g.input[0].name, g.output[0].name
        rng = np.random.default_rng(0)
        width = int(np.prod([d.dim_value for d in g.input[0].type.tensor_type.shape.dim[1:]]))
        g.initializer.extend([
            onnx.numpy_helper.from_array(rng.standard_normal((width, 1024)).astype(np.float32) * 0.01, "slow_w1"),
            onnx.numpy_helper.from_array(rng.standard_normal((1024, 1024)).astype(np.float32) * 0.01, "slow_w2"),
            onnx.numpy_helper.from_array(np.zeros((), np.float32), "slow_zero")])
        for n in g.node:  # the old output becomes an intermediate
            n.output[:] = ["slow_y" if o == y else o for o in n.output]
        nodes = [helper.make_node("Flatten", [x], ["slow_f"], axis=1),
                 helper.make_node("MatMul", ["slow_f", "slow_w1"], ["slow_h0"])]
        for k in range(4):
            nodes.append(helper.make_node("MatMul", [f"slow_h{k}", "slow_w2"], [f"slow_h{k + 1}"]))
        nodes += [helper.make_node("ReduceSum", ["slow_h4"], ["slow_s"], keepdims=1),
                  helper.make_node("Mul", ["slow_s", "slow_zero"], ["slow_z"]),
                  helper.make_node("Add", ["slow_y", "slow_z"], [y])]
        g.node.extend(nodes)
        return PassResult(out)


def test_ratio_noise_is_the_median_ratio_and_its_standard_error():
    ratio, noise = ratio_noise([1.0, 1.0, 1.0, 1.0, 1.0], [2.0, 2.1, 1.9, 2.0, 2.0])
    assert ratio == pytest.approx(2.0)
    # MAD of the ratios is 0 here: three of five are exactly 2.0
    assert noise == pytest.approx(0.0)
    _, noisy = ratio_noise([1.0] * 6, [1.0, 1.2, 0.8, 1.1, 0.9, 1.0])
    assert 0.03 < noisy < 0.2


def test_a_stage_that_makes_the_model_slower_is_rolled_back_with_both_numbers():
    result = optimize(conv_gemm_model(), ["simplify", SlowDown()],
                      objective=Objective.parse("latency", batch_size=4), measure_latency=False)
    stage = result.stages[-1]
    assert not stage.kept
    assert stage.objective["after"] > 3 * stage.objective["before"], stage.objective
    assert "latency worse beyond noise" in stage.reason and stage.why is None
    before, after = stage.objective["before"], stage.objective["after"]
    assert f"{before:.3f} ms -> {after:.3f} ms" in stage.reason
    assert not any(n.output[0].startswith("slow") for n in result.model.graph.node)
    assert result.stages[1].kept and "simplify" == result.stages[1].name
    assert result.stages[1].why and "latency" in result.stages[1].why


def test_keep_true_keeps_a_stage_the_objective_would_roll_back():
    model = conv_gemm_model()
    result = optimize(model, [SlowDown(keep=True)], objective="size", measure_latency=False)
    stage = result.stages[-1]
    assert stage.kept and stage.keep
    assert stage.why.startswith("keep: true, although size")
    assert stage.objective["after"] > 100 * stage.objective["before"]
    assert any(n.output[0].startswith("slow") for n in result.model.graph.node)
    # the same pass without keep: rolled back, size before and after named
    plain = optimize(model, [SlowDown()], objective="size", measure_latency=False).stages[-1]
    assert not plain.kept and "size" in plain.reason and "->" in plain.reason


def test_a_metric_drop_beyond_max_drop_rolls_back(tmp_path):
    model = conv_gemm_model()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    from onnxpipe.core.session import run_model

    labels = run_model(model, {"x": x})["y"].argmax(-1)  # the float model scores 1.0
    result = optimize(model, [{"prune": {"ratio": 0.75, "round_to": 1, "min_agreement": 0.01}}], evaluation=({"x": x}, labels), metric="top1",
                      objective=Objective.parse({"goal": "size", "max_drop": 0.0}), measure_latency=False)
    stage = result.stages[-1]
    assert not stage.kept and "max_drop 0" in stage.reason and "1.0000 ->" in stage.reason


def test_timing_feeds_take_real_rows_to_the_batch_size():
    model = conv_gemm_model()
    rows = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
    feeds = timing_feeds(model, [{"x": rows}], 5)
    assert feeds["x"].shape == (5, 3, 8, 8)
    np.testing.assert_array_equal(feeds["x"][2], rows[0])


def test_recipe_objective_and_target(tmp_path):
    onnx.save(conv_gemm_model(), tmp_path / "m.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m.onnx\ntarget: {device: cpu, batch_size: 8}\nobjective: throughput\n"
                      "passes:\n  - simplify\n  - strip: {}\n    keep: true\n")
    r = load_recipe(recipe)
    obj = r.objective_for_run()
    assert (obj.goal, obj.batch_size, obj.device) == ("throughput", 8, "cpu")
    recipe.write_text("model: m.onnx\ntarget: {device: 'gpu:x'}\nobjective: latency\n")
    with pytest.raises(InputError, match=r"r.yaml:2: target.device"):
        load_recipe(recipe)
    recipe.write_text("model: m.onnx\nobjective: speed\n")
    with pytest.raises(InputError, match=r"r.yaml:2: objective"):
        load_recipe(recipe)
    recipe.write_text("model: m.onnx\npasses:\n  - strip: {}\n    keep: maybe\n")
    with pytest.raises(InputError, match="keep"):
        load_recipe(recipe)


def test_run_reports_the_objective_per_stage(tmp_path):
    onnx.save(conv_gemm_model(), tmp_path / "m.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m.onnx\ntarget: {device: cpu, batch_size: 2}\nobjective: size\n"
                      "passes:\n  - simplify\n  - strip\n")
    proc = run_cli("run", str(recipe), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Objective: **size on cpu**" in md
    assert "| objective | change |" in md
    import json

    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["objective"]["goal"] == "size"
    for stage in doc["stages"][1:]:
        assert stage["objective"]["unit"] == "bytes"
        assert stage["why"] if stage["kept"] else stage["reason"]
