"""The prune pass as a whole: unsafe groups, options, the pipeline's judgement, importance, refit."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_prune_groups import assert_same, build, conv, prune, rand, removed, row_of, run, weight, zeroed

from onnxpipe.core.errors import InputError
from onnxpipe.passes import get_pass
from onnxpipe.passes.base import PassContext
from onnxpipe.passes.prune import Prune
from onnxpipe.passes.pruning.reconstruct import conv_patches
from onnxpipe.pipeline import optimize

I64 = onnx.TensorProto.INT64


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1)


def _chain(rng: np.random.Generator, middle: list[onnx.NodeProto], extra: dict | None = None,
           outputs: dict | None = None) -> onnx.ModelProto:
    """x -> Conv a (8 ch) -> Relu -> r -> [middle, reading r, writing m] -> Conv b -> y."""
    nodes = [conv("a", "x", "wa", "ba", "c"), helper.make_node("Relu", ["c"], ["r"]), *middle,
             conv("b", "m", "wb", None, "y", k=1)]
    inits = {"wa": rand(rng, 8, 3, 3, 3), "ba": rand(rng, 8), "wb": rand(rng, 4, 8, 1, 1), **(extra or {})}
    return build(nodes, {"x": ["N", 3, 4, 4]}, {"y": ["N", 4, 4, 4], **(outputs or {})}, inits)


def _branch(op: str) -> onnx.GraphProto:
    out = helper.make_tensor_value_info("m_" + op, onnx.TensorProto.FLOAT, ["N", 8, 4, 4])
    return helper.make_graph([helper.make_node(op, ["r"], ["m_" + op])], op, [], [out])


def test_unsafe_groups_are_left_alone_and_reported(rng):
    x = {"x": rand(rng, 2, 3, 4, 4)}
    cases = {
        "LRN": ([helper.make_node("LRN", ["r"], ["m"], size=3)], None, None, "not known to keep channels apart"),
        "shape": ([helper.make_node("Identity", ["r"], ["m"]), helper.make_node("Shape", ["r"], ["sh"]),
                   helper.make_node("Gather", ["sh", "one"], ["count"], axis=0)],
                  {"one": np.array([1], dtype=np.int64)}, {"count": [1]}, "reads the channel count"),
        "output": ([helper.make_node("Relu", ["r"], ["m"])], None, {"r": ["N", 8, 4, 4]}, "reaches graph output r"),
        "softmax": ([helper.make_node("Softmax", ["r"], ["m"], axis=1)], None, None, "normalizes over the channel"),
        "subgraph": ([helper.make_node("If", ["flag"], ["m"], then_branch=_branch("Relu"), else_branch=_branch("Neg"))],
                     {"flag": np.array(True)}, None, "reads r inside a subgraph"),
    }
    for name, (middle, extra, outs, reason) in cases.items():
        model = _chain(rng, middle, extra, {k: v for k, v in (outs or {}).items()})
        if outs and "count" in outs:  # an int64 output
            model.graph.output[-1].type.tensor_type.elem_type = I64
        result = prune(model, x, ratio=0.5)
        row = row_of(result, "a")
        assert row["channels_after"] == 8 and row["status"].startswith("unsafe"), name
        assert any(reason in r for r in result.notes["unsafe"]["a"]), (name, result.notes["unsafe"])
        assert not result.modified and result.model is model


def test_flatten_with_a_computed_batch_dim_is_followed(rng):
    """``x.view(x.size(0), -1)``: Shape -> Gather(0) -> Concat(-1) -> Reshape -> Gemm."""
    nodes = [conv("a", "x", "wa", "ba", "c"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Shape", ["r"], ["sh"]), helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
             helper.make_node("Concat", ["n", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["r", "target"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fw"], ["y"], name="fc", transB=1)]
    inits = {"wa": rand(rng, 8, 3, 3, 3), "ba": rand(rng, 8), "zero": np.array([0], dtype=np.int64),
             "rest": np.array([-1], dtype=np.int64), "fw": rand(rng, 5, 128)}
    model = build(nodes, {"x": ["N", 3, 4, 4]}, {"y": ["N", 5]}, inits)
    x = {"x": rand(rng, 2, 3, 4, 4)}
    result = prune(model, x, ratio=0.5)
    gone = removed(result, "c")
    assert len(gone) == 4 and weight(result.model, "fc").shape == (5, 64)
    assert_same(result.model, zeroed(model, [("fc", 1, 1, [c * 16 + s for c in gone for s in range(16)])]), x)
    heads = [helper.make_node("Reshape", ["r", "split"], ["m4"]), helper.make_node("Reshape", ["m4", "back"], ["m"])]
    model = _chain(rng, heads, {"split": np.array([-1, 2, 4, 16], dtype=np.int64),
                                "back": np.array([-1, 8, 4, 4], dtype=np.int64)})
    x = {"x": rand(rng, 2, 3, 4, 4)}
    result = prune(model, x, ratio=0.5)
    # 8 channels split into 2 blocks of 4 and merged back: a block (a head) goes whole
    assert row_of(result, "a")["status"] == "pruned" and row_of(result, "a")["channels_after"] == 4
    gone = removed(result, "c")
    assert sorted(gone) in ([0, 1, 2, 3], [4, 5, 6, 7])
    assert_same(result.model, zeroed(model, [("b", 1, 1, sorted(gone))]), x)  # = the block's reader zeroed


def test_nhwc_flatten_with_a_tf2onnx_computed_target(rng):
    """tf2onnx: Transpose to NHWC, target = Concat(Slice(Cast(Gather(Shape))), folded 128) -> MatMul."""
    i32 = onnx.TensorProto.INT32
    nodes = [conv("a", "x", "wa", "ba", "c"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Shape", ["r"], ["sh"]), helper.make_node("Gather", ["sh", "nhwc"], ["g"], axis=0),
             helper.make_node("Cast", ["g"], ["g32"], to=i32),
             helper.make_node("Slice", ["g32", "zero", "one", "zero"], ["n"]),
             helper.make_node("Concat", ["n", "folded"], ["cat"], axis=0, name="cat"),
             helper.make_node("Cast", ["cat"], ["target"], to=I64),
             helper.make_node("Reshape", ["t", "target"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["y"], name="fc")]
    inits = {"wa": rand(rng, 8, 3, 3, 3), "ba": rand(rng, 8), "nhwc": np.array([0, 2, 3, 1], dtype=np.int64),
             "zero": np.array([0], dtype=np.int64), "one": np.array([1], dtype=np.int64),
             "folded": np.array([128], dtype=np.int32), "w": rand(rng, 128, 5)}
    model = build(nodes, {"x": ["N", 3, 4, 4]}, {"y": ["N", 5]}, inits)
    x = {"x": rand(rng, 2, 3, 4, 4)}
    result = prune(model, x, ratio=0.5)
    gone = removed(result, "c")
    assert len(gone) == 4 and weight(result.model, "fc").shape == (64, 5)
    assert weight(result.model, "cat", 1).tolist() == [64]  # the folded size, rewritten where it lives
    rows = [(h * 4 + w) * 8 + c for h in range(4) for w in range(4) for c in gone]  # NHWC flatten order
    assert_same(result.model, zeroed(model, [("fc", 1, 0, rows)]), x)
    leak = [helper.make_node("Shape", ["r"], ["sh"]), helper.make_node("Gather", ["sh", "nhwc"], ["g"], axis=0),
            helper.make_node("Slice", ["g", "one", "four"], ["hwc"]),  # H, W, C: the channel count survives
            helper.make_node("ReduceProd", ["hwc"], ["size"], keepdims=1),
            helper.make_node("Reshape", ["r", "size"], ["flat"]), helper.make_node("Reshape", ["flat", "back"], ["m"])]
    extra = {"nhwc": inits["nhwc"], "one": inits["one"], "four": np.array([4], dtype=np.int64),
             "back": np.array([-1, 8, 4, 4], dtype=np.int64)}
    result = prune(_chain(rng, leak, extra), x, ratio=0.5)
    assert any("reads the channel count" in r for r in result.notes["unsafe"]["a"])


def test_layernorm_over_the_features_alone_follows_them_but_not_over_more_axes(rng):
    def model(axis: int) -> onnx.ModelProto:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
                 helper.make_node("LayerNormalization", ["h", "s", "bias"], ["n"], axis=axis),
                 helper.make_node("MatMul", ["n", "w2"], ["y"], name="fc2")]
        shape = [8] if axis == -1 else [5, 8]
        return build(nodes, {"x": ["N", 5, 4]}, {"y": ["N", 5, 3]},
                     {"w1": rand(rng, 4, 8), "w2": rand(rng, 8, 3), "s": np.ones(shape, np.float32),
                      "bias": np.zeros(shape, np.float32)})

    x = {"x": rand(rng, 2, 5, 4)}
    # over the features alone (a transformer's stream, as Torch-Pruning prunes it): scale and bias follow
    result = prune(model(-1), x, ratio=0.5)
    assert row_of(result, "fc1")["status"] == "pruned" and row_of(result, "fc1")["channels_after"] == 4
    ln = next(n for n in result.model.graph.node if n.op_type == "LayerNormalization")
    assert [list(i.dims) for i in result.model.graph.initializer if i.name in ln.input[1:]] == [[4], [4]]
    assert run(result.model, x)["y"].shape == (2, 5, 3)
    assert any("normalizes" in r for r in prune(model(1), x).notes["unsafe"]["fc1"])  # axis 1..2 holds it too


def test_options_are_validated():
    with pytest.raises(InputError, match="ratio"):
        Prune({"ratio": 1.0})
    with pytest.raises(InputError, match="unknown option"):
        Prune({"ratios_": {}})
    with pytest.raises(InputError, match="ratios"):
        Prune({"ratios": {"conv*": 1.5}})
    assert get_pass("prune") is Prune


def test_data_driven_options_need_calibration(rng):
    model = _chain(rng, [helper.make_node("Identity", ["r"], ["m"])])
    for cfg in ({"importance": "activation"}, {"reconstruct": True}):
        with pytest.raises(InputError, match="calibration"):
            Prune(cfg).apply(model, PassContext())


def test_activation_importance_removes_dead_channels(rng):
    ba = rand(rng, 8) + 0.5
    ba[[1, 4, 6]] = -50.0  # never positive: Relu kills them on any input, whatever their weights
    model = _chain(rng, [helper.make_node("Identity", ["r"], ["m"])], {"ba": ba})
    batches = [{"x": rand(rng, 4, 3, 4, 4, scale=1.0)} for _ in range(3)]
    ctx = PassContext(check_inputs=batches[:1], calibration=lambda: iter(batches))
    result = Prune({"ratio": 0.375, "importance": "activation", "round_to": 1}).apply(model, ctx)
    assert sorted(removed(result, "c")) == [1, 4, 6]
    for a, b in zip(run(model, batches[0]).values(), run(result.model, batches[0]).values()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # dead channels: exactly the same outputs


def test_compare_checks_names_shapes_finiteness_and_agreement():
    p = Prune({"min_agreement": 0.75})
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 0.0, 2.0], [0.0, 0.0, 5.0]], np.float32)
    near = logits + 0.1
    assert all(c.ok for c in p.compare([{"y": logits}], [{"y": near}]))
    swapped = logits.copy()
    swapped[:2] = swapped[:2, ::-1]
    bad = p.compare([{"y": logits}], [{"y": swapped}])[0]
    assert not bad.ok and "top-1 agreement 0.500" in bad.detail
    assert not p.compare([{"y": logits}], [{"y": logits[:, :2]}])[0].ok
    nan = near.copy()
    nan[0, 0] = np.nan
    assert "non-finite" in p.compare([{"y": logits}], [{"y": nan}])[0].detail
    assert not p.compare([{"y": logits}], [{"y": near.astype(np.float64)}])[0].ok
    assert not p.compare([{"y": logits}], [{"z": logits}])[0].ok
    tied = np.ones((3, 4), np.float32)  # every row tied: top-1 says nothing, cosine judges
    c = p.compare([{"y": tied}], [{"y": tied * 2}])[0]
    assert c.ok and "cosine 1.0000" in c.detail and "top-1" not in c.detail.split("(")[0]
    assert not p.compare([{"y": tied}], [{"y": -tied}])[0].ok


def test_pipeline_keeps_a_good_pruning_and_rolls_back_a_bad_one(rng):
    model = _chain(rng, [helper.make_node("Identity", ["r"], ["m"])])
    inputs = [{"x": rand(rng, 4, 3, 4, 4)}]
    good = optimize(model, [{"prune": {"ratio": 0.25, "min_agreement": 0.1, "round_to": 1}}], check_inputs=inputs,
                    measure_latency=False)
    stage = good.stages[1]
    assert stage.kept and stage.notes["totals"]["channels_after"] == 6 + 4  # b feeds the output: kept
    assert row_of(stage, "a")["channels_after"] == 6
    assert stage.notes["totals"]["params_after"] < stage.notes["totals"]["params_before"]
    strict = optimize(model, [{"prune": {"ratio": 0.875, "min_agreement": 1.0, "agreement": "cosine", "round_to": 1}}],
                      check_inputs=inputs, measure_latency=False)
    assert not strict.stages[1].kept and "cosine" in strict.stages[1].reason


def test_conv_patches_match_onnx_runtime(rng):
    cases = [dict(strides=[2, 2], pads=[1, 0, 2, 1]), dict(dilations=[2, 1], pads=[2, 1, 2, 1]),
             dict(auto_pad="SAME_UPPER", strides=[2, 2]), dict(auto_pad="VALID")]
    for attrs in cases:
        node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], **attrs)
        model = build([node], {"x": [2, 4, 7, 6]}, {"y": [2, 5, None, None]}, {"w": rand(rng, 5, 4, 3, 3)})
        x = rand(rng, 2, 4, 7, 6, scale=1.0)
        y = run(model, {"x": x})["y"]
        p, idx = conv_patches(x.astype(np.float64), node, (3, 3), 10_000, np.random.default_rng(0))
        w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
        got = p @ w.reshape(5, -1).T
        np.testing.assert_allclose(got, y[(idx[0], slice(None), *idx[1:])], rtol=1e-4, atol=1e-4)
        few, fidx = conv_patches(x.astype(np.float64), node, (3, 3), 7, np.random.default_rng(0))
        assert few.shape[0] == 7 and len(set(zip(*[i.tolist() for i in fidx]))) == 7


def _net(rng: np.random.Generator) -> onnx.ModelProto:
    """A small conv net with a grouped conv, a strided conv, Flatten and a Gemm head."""
    nodes = [conv("a", "x", "wa", "ba", "c"), helper.make_node("Relu", ["c"], ["r"]),
             conv("b", "r", "wb", "bb", "d", group=2), helper.make_node("Relu", ["d"], ["s"]),
             conv("c3", "s", "wc", "bc", "e", strides=[2, 2]), helper.make_node("Relu", ["e"], ["t"]),
             helper.make_node("Flatten", ["t"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)]
    inits = {"wa": rand(rng, 12, 2, 3, 3), "ba": rand(rng, 12) + 0.3, "wb": rand(rng, 12, 6, 3, 3, scale=0.3),
             "bb": rand(rng, 12) + 0.3, "wc": rand(rng, 16, 12, 3, 3, scale=0.2), "bc": rand(rng, 16) + 0.3,
             "fw": rand(rng, 6, 256, scale=0.1), "fb": rand(rng, 6)}
    return build(nodes, {"x": ["N", 2, 8, 8]}, {"y": ["N", 6]}, inits)


def test_reconstruct_recovers_the_outputs(rng):
    model = _net(rng)
    calib = [{"x": rand(rng, 32, 2, 8, 8, scale=1.0)} for _ in range(16)]
    held = {"x": rand(rng, 64, 2, 8, 8, scale=1.0)}
    ref = run(model, held)["y"]
    ctx = PassContext(check_inputs=calib[:1], calibration=lambda: iter(calib), metric=lambda m: 1.0)
    plain = Prune({"ratio": 0.5, "round_to": 1}).apply(model, ctx)
    fitted = Prune({"ratio": 0.5, "reconstruct": True, "round_to": 1}).apply(model, ctx)
    assert weight(fitted.model, "b").shape == (6, 3, 3, 3) and weight(fitted.model, "fc").shape == (6, 128)
    layers = fitted.notes["reconstruct"]["layers"]
    assert [entry["op"] for entry in layers] == ["Conv", "Conv", "Gemm"]
    assert all(entry["kept"] and entry["error_after"] < entry["error_before"] for entry in layers)
    assert fitted.notes["reconstruct"]["metric_before"] == 1.0
    err_plain = np.linalg.norm(run(plain.model, held)["y"] - ref)
    err_fit = np.linalg.norm(run(fitted.model, held)["y"] - ref)
    assert err_fit < 0.75 * err_plain, (err_fit, err_plain)  # on data the refit never saw


def test_reconstruct_skips_layers_over_the_feature_limit(rng):
    model = _net(rng)
    calib = [{"x": rand(rng, 8, 2, 8, 8)}]
    ctx = PassContext(check_inputs=calib, calibration=lambda: iter(calib))
    result = Prune({"ratio": 0.5, "reconstruct": True, "reconstruct_max_features": 40, "round_to": 1}).apply(model, ctx)
    notes = {entry["layer"]: entry for entry in result.notes["reconstruct"]["layers"]}
    # b: 3 inputs per group x 3x3 + bias = 28 features; c3: 6 x 3x3 + 1 = 55; fc: 8 x 4x4 / 2 + 1 = 129
    assert [notes[k]["features"] for k in ("b", "c3", "fc")] == [28, 55, 129]
    assert notes["b"]["kept"] and "skipped" in notes["c3"]["note"] and "skipped" in notes["fc"]["note"]


def _light(name: str) -> onnx.ModelProto:
    from onnxpipe.passes.simplify import Simplify

    path = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", f"light_{name}.onnx")
    return Simplify({"skip": ["onnxslim", "ort"]}).apply(onnx.load(path), PassContext()).model


@pytest.mark.parametrize("name", ["squeezenet", "shufflenet"])
def test_real_architectures_prune_without_breaking(name):
    model = _light(name)
    x = {model.graph.input[0].name: np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    result = prune(model, x, ratio=0.3)
    totals = result.notes["totals"]
    assert totals["params_after"] <= totals["params_before"]  # never grows
    onnx.checker.check_model(result.model)
    before, after = run(model, x), run(result.model, x)
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    if name == "shufflenet":
        # the light model reuses one tensor as the weight of many layers: pruned apart, their copies
        # would outgrow it, so each shared weight is pruned once for all its readers or not at all
        assert "shared_weights" in result.notes
        return
    assert totals["macs_after"] < 0.9 * totals["macs_before"]
    assert len([r for r in result.notes["groups"] if r["status"] == "pruned"]) >= 10
