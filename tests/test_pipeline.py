"""The pass pipeline: a check after every pass, rollback of broken passes, recipes and reports."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import conv_gemm_model, run_cli
from onnx import helper

from onnxpipe.core.errors import InputError
from onnxpipe.passes.base import Pass, PassResult
from onnxpipe.pipeline import optimize
from onnxpipe.pipeline.recipe import load_recipe


class ScaleOutput(Pass):
    """Test-only: multiplies the output by a factor, i.e. breaks numerics on purpose."""

    name = "scale-output"

    def __init__(self, factor: float) -> None:
        super().__init__({})
        self.factor = factor

    def apply(self, model, ctx):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        g = out.graph
        last = g.output[0].name
        for node in g.node:
            node.output[:] = [o + "_pre" if o == last else o for o in node.output]
        g.initializer.append(onnx.numpy_helper.from_array(np.array(self.factor, np.float32), "factor"))
        g.node.append(helper.make_node("Mul", [last + "_pre", "factor"], [last]))
        return PassResult(out)


class Explodes(Pass):
    name = "explodes"

    def apply(self, model, ctx):
        raise RuntimeError("kaboom")


class InvalidGraph(Pass):
    name = "invalid-graph"

    def apply(self, model, ctx):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.node.append(helper.make_node("Relu", ["does_not_exist"], ["z"]))
        return PassResult(out)


def test_a_pass_that_breaks_numerics_is_rolled_back_and_reported(tmp_path):
    model = conv_gemm_model()
    result = optimize(model, ["simplify", ScaleOutput(1.5), ScaleOutput(1.0 + 1e-7)], outdir=tmp_path)
    names = [(s.name, s.kept) for s in result.stages]
    assert names == [("input", True), ("simplify", True), ("scale-output", False), ("scale-output", True)]
    broken = result.stages[2]
    assert "output y differs by" in broken.reason and broken.max_abs > 0.1
    assert (tmp_path / "stages" / "02-scale-output.rejected.onnx").exists()
    # the pipeline went on from the last good model: the final model is the input's numbers
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    from onnxpipe.core.session import run_model

    np.testing.assert_allclose(run_model(result.model, {"x": x})["y"], run_model(model, {"x": x})["y"],
                               rtol=1e-5, atol=1e-5)


def test_exceptions_and_invalid_graphs_are_rolled_back():
    result = optimize(conv_gemm_model(), [Explodes({}), InvalidGraph({}), "simplify"], measure_latency=False)
    reasons = [s.reason for s in result.stages[1:3]]
    assert reasons[0] == "pass failed: RuntimeError: kaboom"
    assert reasons[1].startswith("invalid graph")
    assert result.stages[3].kept


def test_stage_records_what_changed():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
        a = Identity(x)
        b = Identity(a)
        y = Relu(b)
    }
    """)
    result = optimize(model, ["simplify"])
    s = result.stages[1]
    assert s.kept and s.nodes == 1 and s.op_delta == {"Identity": -2}
    assert s.max_abs == 0.0 and s.latency_ms > 0 and s.seconds > 0
    json.dumps(result.as_dict())


def test_pass_raising_a_user_error_stops_the_run():
    with pytest.raises(InputError, match="fix-shapes needs dims or inputs"):
        optimize(conv_gemm_model(), [{"fix-shapes": {}}])


RECIPE_OK = """\
model: {{source: {model}}}
passes:
  - simplify
  - fp16
validate: {{providers: [cpu], atol: 1.0e-2, rtol: 1.0e-2}}
output: {out}
"""


def test_recipe_runs_and_writes_every_artifact(tmp_path, conv_gemm_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE_OK.format(model=conv_gemm_path.name, out=tmp_path / "out"))
    proc = run_cli("run", str(recipe))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "report.json", "report.md", "report.png", "stages"}
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["00-input.onnx", "01-simplify.onnx", "02-fp16.onnx"]
    doc = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in doc["stages"]] == ["input", "simplify", "fp16"]
    assert doc["validation"][0]["ok"]
    assert "| 02 fp16 |" in (out / "report.md").read_text()
    assert "01 simplify" in proc.stdout


@pytest.mark.parametrize("text, message", [
    ("model: {source: m.onnx}\npasses:\n  - simplify\n  - fp16: {keep_fp32_ops: [Softmax], bogus: 1}\n",
     "r.yaml:4: passes.1.fp16: pass 'fp16', option bogus: unknown option"),
    ("model: {source: m.onnx}\nvalidat: {}\n", "r.yaml:2: validat: unknown key 'validat'"),
    ("model: {source: m.onnx}\npasses: [simplfy]\n", "r.yaml:2: passes.0.simplfy: unknown pass 'simplfy'"),
    ("model: {source: nothere.onnx}\n", "r.yaml:1: model.source: no such file"),
    ("model: {source: m.onnx}\ndata: {batch_size: lots}\n", "r.yaml:2: data.batch_size: Input should be a valid integer"),
    ("model: {source: m.onnx\n", "r.yaml:2: not valid YAML"),
    ("- just\n- a list\n", "a recipe is a mapping"),
])
def test_bad_recipes_name_the_line(tmp_path, text, message):
    onnx.save(conv_gemm_model(), tmp_path / "m.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(InputError) as info:
        load_recipe(recipe)
    assert message in str(info.value)
    proc = run_cli("run", str(recipe))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_optimize_cli(tmp_path, conv_gemm_path):
    out = tmp_path / "o.onnx"
    proc = run_cli("optimize", str(conv_gemm_path), "-o", str(out), "--pass", "simplify",
                   "--pass", "opset:version=19", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [s["name"] for s in doc["stages"]] == ["input", "simplify", "opset"]
    assert [o.version for o in onnx.load(out).opset_import if o.domain == ""] == [19]
    bad = run_cli("optimize", str(conv_gemm_path), "-o", str(out), "--pass", "nope")
    assert bad.returncode == 2 and "unknown pass 'nope'" in bad.stderr


@pytest.mark.slow
def test_the_digits_pipeline_runs_end_to_end(tmp_path):
    proc = run_cli("run", "models/digits_cnn/pipeline.yaml", "-o", str(tmp_path / "digits"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "digits" / "report.json").read_text())
    stages = doc["stages"]
    assert stages[0]["metric"] >= 0.95  # the converted CNN keeps its accuracy
    assert all(s["kept"] for s in stages), [(s["name"], s["reason"]) for s in stages]
    assert stages[-1]["metric"] >= stages[0]["metric"] - 0.02  # prune (<= 2 points) then int8 (<= 1 point)
    assert doc["conversion"]["check"]["ok"] and doc["validation"][0]["ok"]
