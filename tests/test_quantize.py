"""The quantize pass: int8 on zoo models, hardware-aware choices, the accuracy budget, calibration data."""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import ROOT, conv_gemm_model, ort_fused_ops, run_cli, write_factory
from onnx import numpy_helper

from onnxpipe.core import hardware
from onnxpipe.core.agreement import agreement, judge_cosine
from onnxpipe.core.compare import outputs_on, sample_cosines
from onnxpipe.core.data import calibration_source, evaluation_source
from onnxpipe.core.errors import InputError
from onnxpipe.core.session import run_model
from onnxpipe.core.tensors import TensorInfo, graph_inputs
from onnxpipe.passes import get_pass
from onnxpipe.passes.base import PassContext
from onnxpipe.passes.quant_budget import fit_budget
from onnxpipe.passes.quant_data import StreamingReader, check_batch
from onnxpipe.passes.quantize import Quantize
from onnxpipe.pipeline import optimize

DIGITS = ROOT / "models" / "digits_cnn"


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.fixture(scope="module")
def digits():
    """The trained digits CNN as ONNX, its calibration source and its test split."""
    from onnxpipe.converter import convert

    model = convert(f"{DIGITS}/model.py:build", check=False).model
    return model, calibration_source(f"{DIGITS}/data.py:calibration"), evaluation_source(f"{DIGITS}/data.py:evaluation")


def conv_calibration(n: int = 4, batch: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    data = [{"x": rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)} for _ in range(n)]
    return lambda: iter(data)


def reads_float_weights(model: onnx.ModelProto, node_name: str) -> bool:
    """Whether a node still computes with its float32 weights (no DequantizeLinear, no integer op)."""
    node = next((n for n in model.graph.node if n.name == node_name), None)
    if node is None:  # renamed: the quantizer replaced it
        return False
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    return len(node.input) > 1 and all(i in floats for i in node.input[1:] if i)


# ----------------------------------------------------------------------------- modes on zoo models

def test_static_qdq_on_digits_keeps_accuracy_and_shrinks_weights(digits):
    model, cal, evaluation = digits
    result = optimize(model, [{"quantize": {"mode": "static"}}], calibration=cal, evaluation=evaluation,
                      metric="top1", measure_latency=False)
    before, after = result.stages[0], result.stages[1]
    assert after.kept, after.reason
    assert abs(after.metric - before.metric) <= 0.01  # within one point of float32
    q = result.model
    assert ops(q)["QuantizeLinear"] > 0 and ops(q)["DequantizeLinear"] > 0
    notes = after.notes
    assert notes["activation_type"] == hardware.int8_activation_type("cpu", "qdq")[0]
    assert notes["calibration"]["samples"] == 256 and notes["calibration"]["batches"] == 8
    # per-channel: one scale per output channel of every conv weight
    convs = {i.name: i for i in model.graph.initializer if len(i.dims) == 4}
    scales = {i.name: list(i.dims) for i in q.graph.initializer}
    for name, w in convs.items():
        assert scales.get(f"{name}_scale") == [w.dims[0]], name
    int8 = sum(int(np.prod(i.dims)) for i in q.graph.initializer if i.data_type in (onnx.TensorProto.INT8,))
    assert int8 >= 0.95 * sum(int(np.prod(w.dims)) for w in convs.values())
    assert "cosine mean" in after.comparisons[0].detail


def test_qoperator_and_dynamic_on_digits(digits):
    model, cal, _ = digits
    qop = Quantize({"mode": "static", "format": "qoperator"}).apply(model, PassContext(calibration=cal))
    assert ops(qop.model)["QLinearConv"] == 4 and "QuantizeLinear" in ops(qop.model)
    dyn = Quantize({"mode": "dynamic"}).apply(model, PassContext())
    assert ops(dyn.model)["ConvInteger"] == 4 and ops(dyn.model)["MatMulInteger"] == 1  # the Gemm goes as MatMul
    x = {"x": next(iter(cal()))["x"]}
    ref = run_model(model, x)
    for m in (qop.model, dyn.model):
        assert sample_cosines(list(ref.values())[0], list(run_model(m, x).values())[0]).mean() > 0.99


def test_auto_mode_picks_static_for_cnns_and_dynamic_for_transformers(digits):
    model, _, _ = digits
    assert Quantize({}).plan(model, True).mode == "static"
    with pytest.raises(InputError, match=r"needs calibration data.*mode auto chose static.*data\.calibration"):
        Quantize({}).plan(model, False)
    matmul = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 16] x) => (float[N, 16] y) <float[16, 16] w = {""" + ",".join(["0.5"] * 256) + """}> {
        y = MatMul(x, w)
    }""")
    plan = Quantize({}).plan(matmul, False)
    assert plan.mode == "dynamic" and plan.activation == "uint8"


@pytest.mark.slow
def test_dynamic_on_tiny_transformer_agrees_with_float():
    from onnxpipe.converter import convert

    tt = ROOT / "models" / "tiny_transformer"
    model = convert(f"{tt}/model.py:build", check=False).model
    inputs, labels = evaluation_source(f"{tt}/data.py:evaluation")
    result = optimize(model, ["quantize"], calibration=calibration_source(f"{tt}/data.py:calibration"),
                      evaluation=(inputs, labels), metric="top1", measure_latency=False)
    stage = result.stages[1]
    assert stage.kept and stage.notes["mode"] == "dynamic" and ops(result.model)["MatMulInteger"] >= 12
    assert stage.metric >= result.stages[0].metric - 0.01
    ref = run_model(model, inputs)
    got = run_model(result.model, inputs)
    assert sample_cosines(*[list(r.values())[0] for r in (ref, got)]).mean() >= 0.99


# ----------------------------------------------------------------------------- the accuracy budget

def test_budget_keeps_the_most_sensitive_nodes_in_float(digits):
    model, cal, _ = digits
    plain = Quantize({"mode": "static"}).apply(model, PassContext(calibration=cal))
    ref_batches = list(itertools.islice(cal(), 8))
    drop = 1.0 - np.mean([a.cosine_mean for a in agreement(outputs_on(model, ref_batches),
                                                              outputs_on(plain.model, ref_batches)).values()])
    budget = drop / 4  # a budget the plain int8 model misses
    result = Quantize({"mode": "static", "max_drop": budget}).apply(model, PassContext(calibration=cal))
    notes = result.notes
    assert notes["metric_before"] == 1.0 and notes["metric_int8"] == pytest.approx(1.0 - drop, abs=1e-6)
    assert notes["budget_met"] and notes["drop"] <= budget and notes["nodes_kept_float"]
    assert notes["ranking"][0]["error"] >= notes["ranking"][-1]["error"]
    kept = [n for n in notes["nodes_kept_float"] if n in {w.name for w in model.graph.node if len(w.input) > 1}]
    assert kept and all(reads_float_weights(result.model, name) for name in kept)
    assert notes["nodes_quantized"] < plain.notes["nodes_quantized"]


def test_budget_that_cannot_be_met_keeps_the_float_model(digits):
    model, cal, _ = digits
    logged = []
    result = Quantize({"mode": "static", "max_drop": 0.0, "max_float_nodes": 1}).apply(
        model, PassContext(calibration=cal, log=logged.append))
    assert result.model is model and not result.modified
    assert result.notes["budget_met"] is False and result.notes["drop"] > 0
    assert any("cannot be met" in line for line in logged)


def test_budget_uses_the_task_metric_when_there_is_one():
    model = conv_gemm_model()
    calls = []

    def metric(m):
        calls.append(m)
        return 0.5 if any(n.op_type == "QuantizeLinear" for n in m.graph.node) else 0.9

    ctx = PassContext(calibration=conv_calibration(), metric=metric)
    result = Quantize({"mode": "static", "max_drop": 0.1}).apply(model, ctx)
    assert result.notes["metric"] == "metric" and result.notes["metric_before"] == 0.9
    assert result.notes["budget_met"] and result.notes["metric_after"] == 0.9 and len(calls) >= 3


def test_budget_reads_a_lower_is_better_metric_as_a_relative_increase():
    model = conv_gemm_model()

    def quantized_nodes(m):
        return sum(n.op_type == "QuantizeLinear" for n in m.graph.node)

    full = quantized_nodes(Quantize({"mode": "static"}).apply(model, PassContext(calibration=conv_calibration())).model)

    def perplexity_like(m):  # float 10; each quantized activation adds 1 (lower is better)
        return 10.0 + quantized_nodes(m)
    perplexity_like.higher_is_better = False

    # taken as higher-is-better, a rising value would look like a gain and pass any budget
    budget = 0.5 * (full / 10.0)  # half the all-int8 relative increase
    ctx = PassContext(calibration=conv_calibration(), metric=perplexity_like)
    result = Quantize({"mode": "static", "max_drop": budget}).apply(model, ctx)
    notes = result.notes
    assert full >= 2 and notes["metric_before"] == 10.0 and notes["metric_int8"] == 10.0 + full
    assert notes["higher_is_better"] is False and notes["budget_met"]
    assert notes["nodes_kept_float"] and notes["metric_after"] < notes["metric_int8"]
    assert notes["drop"] == pytest.approx(notes["metric_after"] / 10.0 - 1.0) and notes["drop"] <= budget
    assert all(t["metric"] >= 10.0 for t in notes["search"])


def test_fit_budget_searches_few_counts():
    seen = []

    def evaluate(excluded):
        seen.append(len(excluded))
        return 1.0 - 0.1 * max(0, 37 - len(excluded)), None

    result = fit_budget(list(range(64)), evaluate, 1.0, 0.25)
    assert result.met and len(result.excluded) == 35 and len(seen) <= 14
    assert not fit_budget(list(range(4)), evaluate, 1.0, 0.25).met


# ----------------------------------------------------------------------------- calibration data

@pytest.fixture
def conv_model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_gemm_model(), path)
    return path


def test_every_calibration_form_reaches_the_pass(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    (tmp_path / "npz").mkdir()
    for k in range(3):
        np.savez(tmp_path / "npz" / f"b{k}.npz", x=x[k * 4:(k + 1) * 4])
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "x_0.npy", x[:6])
    np.save(tmp_path / "npy" / "x_1.npy", x[6:9])
    factory = write_factory(tmp_path, """
        import numpy as np
        def batches():
            rng = np.random.default_rng(1)
            return [{"x": rng.standard_normal((5, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    """)
    expected = {str(tmp_path / "cal.npz"): 20, str(tmp_path / "npz"): 12, str(tmp_path / "npy"): 9,
                f"{factory}:batches": 10}
    for spec, samples in expected.items():
        ctx = PassContext(calibration=calibration_source(spec, batch_size=8))
        notes = Quantize({"mode": "static"}).apply(conv_gemm_model(), ctx).notes
        assert notes["calibration"]["samples"] == samples, spec


def test_calibration_is_streamed_not_materialized():
    pulled = itertools.count()

    def endless():
        rng = np.random.default_rng(0)
        while True:
            next(pulled)
            yield {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}

    result = Quantize({"mode": "static", "calibration": "entropy", "calibration_batches": 5}).apply(
        conv_gemm_model(), PassContext(calibration=endless))
    assert result.notes["calibration"] == {"method": "entropy", "batches": 5, "samples": 10}
    assert next(pulled) <= 7  # five used, one read ahead at most, then this call


def test_reader_hands_out_bounded_chunks_and_splits_fixed_batches():
    infos = [TensorInfo("x", [2, 3], np.dtype("float32"))]
    reader = StreamingReader(lambda: ({"x": np.zeros((4, 3), np.float32)} for _ in range(3)), infos)
    chunk = reader.chunk(2)
    got = [chunk.get_next() for _ in range(3)]
    assert [g["x"].shape for g in got[:2]] == [(2, 3), (2, 3)] and got[2] is None
    assert reader.batches == 2 and reader.has_next()


@pytest.mark.parametrize("batch, message", [
    ({"x": np.zeros((2, 3, 8, 8))}, "calibration batch 1: input 'x': expected dtype float32, received float64"),
    ({"y": np.zeros((2, 3, 8, 8), np.float32)}, "calibration batch 1: unknown input(s) y: expected x"),
    ({"x": np.zeros((2, 3, 4, 4), np.float32)}, "expected shape [N, 3, 8, 8], received [2, 3, 4, 4]"),
    ([1, 2], "calibration batch 1 is a list, expected a dict of arrays"),
])
def test_bad_calibration_batches_are_named(batch, message):
    with pytest.raises(InputError) as info:
        check_batch(batch, graph_inputs(conv_gemm_model()), 0)
    assert message in str(info.value)


def test_static_without_calibration_is_an_error_not_a_fallback():
    with pytest.raises(InputError, match=r"static int8 quantization needs calibration data.*data\.calibration"):
        Quantize({"mode": "static"}).apply(conv_gemm_model(), PassContext())
    with pytest.raises(InputError, match="data.calibration"):
        optimize(conv_gemm_model(), [{"quantize": {"mode": "static"}}], measure_latency=False)


RECIPE = """\
model: {{source: {model}}}
{data}passes:
  - quantize: {{mode: static, max_drop: 0.5}}
validate: {{providers: [cpu], atol: 1.0, rtol: 1.0}}
output: {out}
"""


def test_recipe_with_npz_calibration_runs_and_without_it_names_the_key(tmp_path, conv_model_path):
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(model=conv_model_path.name, data="data: {calibration: cal.npz, batch_size: 4}\n",
                                    out=tmp_path / "out"))
    from rich.console import Console

    from onnxpipe.pipeline import run

    run(recipe, console=Console(file=io.StringIO()))
    stage = json.loads((tmp_path / "out" / "report.json").read_text())["stages"][1]
    assert stage["kept"] and stage["notes"]["calibration"]["samples"] == 16 and stage["notes"]["budget_met"]
    recipe.write_text(RECIPE.format(model=conv_model_path.name, data="", out=tmp_path / "out2"))
    proc = run_cli("run", str(recipe))
    assert proc.returncode == 2 and "data.calibration" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out2" / "model.onnx").exists()


# ----------------------------------------------------------------------------- targets and hardware

def test_tensorrt_gets_symmetric_signed_per_channel_qdq():
    result = Quantize({"target": "tensorrt"}).apply(conv_gemm_model(), PassContext(calibration=conv_calibration()))
    q = result.model
    assert result.notes["mode"] == "static" and result.notes["activation_symmetric"]
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    for node in q.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits[node.input[2]]
            assert zp.dtype in (np.int8, np.int32) and not zp.any(), node.name
    # TensorRT's parser refuses DequantizeLinear on int32: biases stay float
    assert not any(i.data_type == onnx.TensorProto.INT32 for i in q.graph.initializer)


def test_float_biases_keep_the_fused_int8_kernels_and_their_numbers(tmp_path):
    cal = conv_calibration()
    model = conv_gemm_model()
    results = {qb: Quantize({"mode": "static", "quantize_bias": qb}).apply(model, PassContext(calibration=cal))
               for qb in (None, True)}
    floats, int32s = results[None], results[True]
    assert floats.notes["bias"] == "float32" and int32s.notes["bias"] == "int32"
    int32_of = lambda m: [i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT32]  # noqa: E731
    assert not int32_of(floats.model) and len(int32_of(int32s.model)) >= 2
    assert floats.model.ByteSize() < int32s.model.ByteSize()
    for r in (floats, int32s):  # ORT quantizes a float bias itself when it fuses the group
        fused = ort_fused_ops(r.model, tmp_path)
        assert fused["QLinearConv"] == 1 and fused["QGemm"] == 1 and fused["Conv"] == fused["Gemm"] == 0, fused
    x = next(iter(cal()))
    np.testing.assert_allclose(run_model(floats.model, x)["y"], run_model(int32s.model, x)["y"], atol=1e-5, rtol=1e-5)


def test_bias_options_that_cannot_apply():
    with pytest.raises(InputError, match="TensorRT rejects DequantizeLinear on int32 biases"):
        Quantize({"target": "tensorrt", "quantize_bias": True}).plan(conv_gemm_model(), True)
    plan = Quantize({"mode": "static", "format": "qoperator", "quantize_bias": False}).plan(conv_gemm_model(), True)
    assert plan.quantize_bias and any("no effect on QOperator" in w for w in plan.warnings)


@pytest.mark.parametrize("options, message", [
    ({"target": "tensorrt", "format": "qoperator"}, "TensorRT takes int8 only as QDQ"),
    ({"target": "tensorrt", "activation_type": "uint8"}, "TensorRT takes signed int8 activations only"),
    ({"target": "cuda", "mode": "dynamic"}, "no CUDA kernel for ConvInteger"),
    ({"op_types": ["Softplus"]}, "cannot quantize op type(s) Softplus"),
    ({"exclude_nodes": ["no_such_node"]}, "exclude_nodes: no node named 'no_such_node'"),
])
def test_impossible_requests_are_refused(options, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Quantize({"mode": "static", **options} if "mode" not in options else options).apply(
            conv_gemm_model(), PassContext(calibration=conv_calibration()))


def test_unknown_options_are_rejected_by_name():
    with pytest.raises(InputError, match="option calibrate: unknown option"):
        get_pass("quantize")({"calibrate": "minmax"})


def test_activation_type_follows_the_cpu(monkeypatch):
    def fake(arch, dot=(), simd="avx2"):
        return hardware.CpuInfo(arch, "test cpu", 2, simd, dot)

    monkeypatch.setattr(hardware, "cpu", lambda: fake("x86_64"))
    assert hardware.int8_activation_type("cpu", "qdq")[0] == "uint8"
    monkeypatch.setattr(hardware, "cpu", lambda: fake("x86_64", ("avx512_vnni",), "avx512"))
    assert hardware.int8_activation_type("cpu", "qdq")[0] == "int8"
    assert hardware.int8_activation_type("cpu", "qoperator")[0] == "uint8"
    monkeypatch.setattr(hardware, "cpu", lambda: fake("aarch64", ("asimddp",), "neon"))
    assert hardware.int8_activation_type("cpu", "qdq")[0] == "int8"
    assert hardware.int8_activation_type("tensorrt")[0] == "int8"


def test_reduce_range_follows_int16_saturation(monkeypatch, digits):
    model = conv_gemm_model()
    monkeypatch.setattr(hardware, "int8_activation_type", lambda target="cpu", fmt="qdq": ("uint8", "test"))
    monkeypatch.setattr(hardware, "u8s8_saturates", lambda: True)
    assert Quantize({"mode": "static"}).plan(model, True).reduce_range
    assert not Quantize({"mode": "static", "per_channel": False}).plan(model, True).reduce_range
    assert not Quantize({"mode": "static", "reduce_range": False}).plan(model, True).reduce_range
    monkeypatch.setattr(hardware, "u8s8_saturates", lambda: False)
    assert not Quantize({"mode": "static"}).plan(model, True).reduce_range
    monkeypatch.undo()
    # on this machine: auto is never worse than 8-bit weights, and better where sums saturate
    net, cal, (inputs, _) = digits
    ref = list(run_model(net, inputs).values())[0]

    def cos(cfg):
        q = Quantize({"mode": "static", **cfg}).apply(net, PassContext(calibration=cal)).model
        return sample_cosines(ref, list(run_model(q, inputs).values())[0]).mean()
    auto, eight = cos({}), cos({"reduce_range": False})
    assert auto >= eight - 1e-4
    if hardware.u8s8_saturates() and hardware.int8_activation_type()[0] == "uint8":
        assert auto > eight + 1e-3


def test_warns_when_int8_is_likely_slower_here(monkeypatch):
    monkeypatch.setattr(hardware, "int8_advice", lambda target="cpu": (False, "generic SIMD only"))
    logged = []
    result = Quantize({"mode": "dynamic"}).apply(conv_gemm_model(), PassContext(log=logged.append))
    assert any("likely slower than float32" in w for w in result.notes["warnings"])
    assert any("warning: int8 is likely slower" in line for line in logged)


def test_excluded_nodes_stay_float():
    model = conv_gemm_model()
    model.graph.node[0].name, model.graph.node[3].name = "conv", "head"
    result = Quantize({"mode": "static", "exclude_nodes": ["head"]}).apply(
        model, PassContext(calibration=conv_calibration()))
    assert reads_float_weights(result.model, "head") and not reads_float_weights(result.model, "conv")
    dyn = Quantize({"mode": "dynamic", "exclude_nodes": ["head"]}).apply(model, PassContext())
    assert ops(dyn.model)["MatMulInteger"] == 0 and ops(dyn.model)["ConvInteger"] == 1  # ORT splits the Gemm, in float


BRANCHY = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16] a, float[N, 16] b, bool c) => (float[N, 8] y, float[N, 16] z, int64[N] k)
  <float[16, 8] w1 = {W1}, float[16, 16] w2 = {W2}> {
    h = MatMul(a, w2)
    s = Add(h, b)
    z = If(c) <then_branch = g1 () => (float[N, 16] t) { t = Relu(s) },
               else_branch = g2 () => (float[N, 16] e) { e = Neg(s) }>
    y = MatMul(z, w1)
    k = ArgMax<axis=1, keepdims=0>(y)
}
"""


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_several_inputs_outputs_and_branches(mode):
    rng = np.random.default_rng(0)
    text = BRANCHY.replace("{W1}", "{" + ",".join(f"{v:.4f}" for v in rng.standard_normal(128)) + "}")
    model = onnx.parser.parse_model(text.replace("{W2}", "{" + ",".join(f"{v:.4f}" for v in rng.standard_normal(256)) + "}"))
    data = [{"a": rng.standard_normal((4, 16)).astype(np.float32), "b": rng.standard_normal((4, 16)).astype(np.float32),
             "c": np.array(flag)} for flag in (True, False, True)]
    result = Quantize({"mode": mode}).apply(model, PassContext(calibration=lambda: iter(data)))
    onnx.checker.check_model(result.model)  # sorted, with the If body's outer-scope input before it
    assert ops(result.model)["MatMulInteger" if mode == "dynamic" else "DequantizeLinear"] >= 2
    for batch in data:
        ref, got = run_model(model, batch), run_model(result.model, batch)
        assert set(got) == {"y", "z", "k"}
        assert sample_cosines(ref["z"], got["z"]).mean() > 0.99 and sample_cosines(ref["y"], got["y"]).mean() > 0.99


def test_old_opsets_are_raised_to_13_for_per_channel_qdq():
    old = conv_gemm_model()
    old.opset_import[0].version = 11  # the graph uses nothing newer than opset 11
    cal = conv_calibration()
    result = Quantize({"mode": "static"}).apply(old, PassContext(calibration=cal))
    assert next(o.version for o in result.model.opset_import if o.domain == "") >= 13
    x = next(iter(cal()))
    assert sample_cosines(run_model(old, x)["y"], run_model(result.model, x)["y"]).mean() > 0.99


# ----------------------------------------------------------------------------- the pipeline's check

def test_check_judges_agreement_not_elementwise_tolerance():
    rng = np.random.default_rng(0)
    ref = [{"y": rng.standard_normal((16, 10)).astype(np.float32)}]
    close = [{"y": ref[0]["y"] + 0.01 * rng.standard_normal((16, 10)).astype(np.float32)}]
    wrecked = [{"y": rng.standard_normal((16, 10)).astype(np.float32)}]
    assert all(c.ok for c in judge_cosine(ref, close, min_cosine=0.99, min_top1=0.9))
    bad = judge_cosine(ref, wrecked, min_cosine=0.99, min_top1=None)[0]
    assert not bad.ok and "needs cosine >= 0.99" in bad.detail
    ints = [{"k": np.arange(8)}]
    assert judge_cosine(ints, [{"k": np.arange(8)[::-1]}], min_cosine=0.99, min_top1=None)[0].ok is False


def test_pipeline_rolls_back_a_quantization_below_min_cosine(tmp_path):
    result = optimize(conv_gemm_model(), [{"quantize": {"mode": "dynamic", "min_cosine": 0.9999999}}],
                      check_inputs=[conv_calibration()().__next__()], outdir=tmp_path, measure_latency=False)
    stage = result.stages[1]
    assert not stage.kept and "cosine mean" in stage.reason and "needs cosine >= 1" in stage.reason
    assert (tmp_path / "stages" / "01-quantize.rejected.onnx").exists()


@pytest.mark.gpu
def test_tensorrt_target_runs_on_cuda_and_agrees_with_cpu():
    from onnxpipe.pipeline import validate_providers

    cal = conv_calibration()
    result = Quantize({"target": "tensorrt"}).apply(conv_gemm_model(), PassContext(calibration=cal))
    rows = validate_providers(result.model, ["cuda"], list(cal()), atol=1e-2, rtol=1e-2)
    assert rows[0]["ok"], rows
