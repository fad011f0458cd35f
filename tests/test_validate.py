"""Cross-provider validation: the matrix, references, precisions, tolerances and --localize."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import run_cli
from onnx import helper, numpy_helper

from onnxpipe.core.compare import Tolerance, check_output
from onnxpipe.core.errors import InputError
from onnxpipe.pipeline.validation import parse_targets, validate
from onnxpipe.runtimes import localize as localize_mod
from onnxpipe.runtimes.providers import available


def chain(perturb: float = 0.0) -> onnx.ModelProto:
    """x[N,8] -> mm1 -> Relu -> mm2 -> Tanh -> mm3 -> y[N,8]; s[N] = ReduceSum(y). ``perturb`` shifts w2."""
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((8, 8)).astype(np.float32) * 0.5 for _ in range(3)]
    ws[1] = ws[1] + np.float32(perturb)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a1"], name="mm1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
             helper.make_node("MatMul", ["r1", "w2"], ["a2"], name="mm2"),
             helper.make_node("Tanh", ["a2"], ["t2"], name="tanh"),
             helper.make_node("MatMul", ["t2", "w3"], ["y"], name="mm3"),
             helper.make_node("ReduceSum", ["y", "axes"], ["s"], keepdims=0, name="sum")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8]),
                               helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, ["N"])],
                              [numpy_helper.from_array(w, f"w{i + 1}") for i, w in enumerate(ws)]
                              + [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def inputs() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(2)]


def test_targets_and_tolerances_parse():
    assert [t.label for t in parse_targets("cpu,cpu:1/fp16", ["fp32", "int8"])] == ["cpu:0", "cpu:0/int8", "cpu:1/fp16"]
    with pytest.raises(InputError, match="unknown precision 'bf8'"):
        parse_targets("cpu/bf8")
    assert Tolerance.parse("1e-3") == Tolerance(1e-3, 1e-3)
    with pytest.raises(InputError, match="ATOL"):
        Tolerance.parse("a,b")


def test_check_output_statistics():
    e = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)
    a = e.copy()
    a[1, 0] = 0.5  # row 1's arg-max moves from 0 to 1
    c = check_output("y", [a], [e], Tolerance(0.1, 0.0))
    assert not c.ok and c.max_abs == pytest.approx(2.5) and c.mismatched == pytest.approx(1 / 6)
    assert c.mean_abs == pytest.approx(2.5 / 6) and c.top1 == 0.5 and c.topk == 1.0
    # cosine is core.compare's: the mean over samples (rows) of each sample's cosine similarity
    assert c.cosine == pytest.approx(np.mean([float(r @ s / np.linalg.norm(r) / np.linalg.norm(s)) for r, s in zip(a, e)]))
    assert check_output("y", [a], [e], Tolerance(0.1, 0.0, max_mismatch=0.2)).ok  # per-output allowance
    assert not check_output("y", [a[:1]], [e], Tolerance()).ok  # shapes must agree


def test_providers_and_precisions_against_the_first(inputs):
    report = validate(chain(), parse_targets("cpu,cpu:1,cpu/fp16,cpu/int8"), inputs=inputs)
    assert report.ok and report.reference == "cpu:0" and report.batches == 2
    rows = {r.target: r for r in report.rows}
    assert rows["cpu:0 (reference)"].placement == "cpu 6"
    assert all(o.max_abs == 0 for o in rows["cpu:1"].outputs)
    fp16 = {o.name: o for o in rows["cpu:0/fp16"].outputs}
    assert 0 < fp16["y"].max_abs < 1e-2 and fp16["y"].cosine > 0.9999
    assert rows["cpu:0/int8"].outputs[0].cosine > 0.98 and rows["cpu:0/int8"].outputs[0].tolerance.min_cosine == 0.98


def test_a_divergent_model_fails_and_localize_finds_the_first_node(inputs, tmp_path, monkeypatch):
    onnx.save(chain(perturb=0.3), tmp_path / "ref.onnx")
    seen = []
    real = localize_mod.MarkedModel.run
    def counting(self, feeds, names):
        seen.append(len(names))
        return real(self, feeds, names)

    monkeypatch.setattr(localize_mod.MarkedModel, "run", counting)
    report = validate(chain(), parse_targets("cpu"), inputs=inputs, reference=tmp_path / "ref.onnx",
                      tolerances={"s": Tolerance(1e-3, 1e-3)}, localize=True, chunk=2)
    row = report.rows[0]
    assert not report.ok and {o.name for o in row.outputs if not o.ok} == {"y", "s"}
    assert next(o for o in row.outputs if o.name == "s").tolerance == Tolerance(1e-3, 1e-3)
    assert row.localized["found"] and row.localized["node"] == "mm2" and row.localized["tensor"] == "a2"
    assert max(seen) <= 2 and len(seen) == 4  # two rounds of two marked tensors, on each side


def test_saved_outputs_as_reference(inputs, tmp_path):
    from onnxpipe.core.session import Session

    with Session(chain()) as s:
        outs = [s.run(b) for b in inputs]
    np.savez(tmp_path / "golden.npz", **{f"b{k}/{n}": v for k, o in enumerate(outs) for n, v in o.items()})
    report = validate(chain(), parse_targets("cpu"), inputs=inputs, reference=tmp_path / "golden.npz", localize=True)
    assert report.ok
    with pytest.raises(InputError, match="holds 2 batch"):
        validate(chain(), parse_targets("cpu"), inputs=inputs[:1], reference=tmp_path / "golden.npz")


def test_cli_matrix_exit_codes_golden_inputs_and_localize(tmp_path):
    onnx.save(chain(), tmp_path / "m.onnx")
    onnx.save(chain(perturb=0.3), tmp_path / "ref.onnx")
    ok = run_cli("validate", str(tmp_path / "m.onnx"), "--providers", "cpu,cpu:1", "--save-inputs",
                 str(tmp_path / "in.npz"), "--batches", "2", "--json", timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] and (tmp_path / "in.npz").is_file()
    bad = run_cli("validate", str(tmp_path / "m.onnx"), "--reference", str(tmp_path / "ref.onnx"),
                  "--load-inputs", str(tmp_path / "in.npz"), "--localize", "--tol", "s=1e-3", timeout=120)
    assert bad.returncode == 1, bad.stderr
    assert "FAIL" in bad.stdout and "first divergence at node mm2 (MatMul)" in " ".join(bad.stdout.split())
    assert "error:" in bad.stderr and "disagree" in bad.stderr and "Traceback" not in bad.stderr
    if "CUDAExecutionProvider" not in available():
        r = run_cli("validate", str(tmp_path / "m.onnx"), "--providers", "cpu,cuda", timeout=120)
        assert r.returncode == 2 and "onnxpipe[gpu]" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.gpu
def test_cuda_and_fp16_agree_with_cpu(inputs):
    report = validate(chain(), parse_targets("cpu,cuda:0,cuda:0/fp16"), inputs=inputs)
    assert report.ok, report.as_dict()
