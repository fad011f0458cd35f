"""prune on what exporters write: constants behind Identity/Constant nodes, shared weights, latency.

The last tests export small `transformers` models (random weights, from configs) with
``torch.onnx.export`` once per session and prune them with no data, as a new user would.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from onnxpipe.core.analysis import summarize
from onnxpipe.core.compare import outputs_on
from onnxpipe.passes.base import Pass, PassContext, PassResult
from onnxpipe.passes.normalize import normalize
from onnxpipe.passes.prune import Prune
from onnxpipe.pipeline import optimize


def exported_style_model() -> onnx.ModelProto:
    """Two 16-channel convs as TorchScript writes them: weights behind Constant and Identity nodes.

    Both convs read the same bias through Identity copies; the second conv's weight is a Constant
    node; the first conv's pads come from constant shape arithmetic (ConstantOfShape, Concat).
    """
    rng = np.random.default_rng(0)
    w2 = ", ".join(f"{v:.4f}" for v in rng.standard_normal(256) * 0.3)
    model = onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 8, 8] x) => (float[N, 4] y) {{
        zeros = ConstantOfShape <value = int64[1] {{0}}> (four)
        pads = Concat <axis = 0> (zeros, ones)
        xp = Pad (x, pads)
        b1 = Identity (bias)
        b2 = Identity (bias)
        w2 = Constant <value = float[16, 16, 1, 1] {{{w2}}}> ()
        c1 = Conv <kernel_shape = [3, 3]> (xp, w1, b1)
        r1 = Relu (c1)
        c2 = Conv (r1, w2, b2)
        r2 = Relu (c2)
        g2 = GlobalAveragePool (r2)
        f = Flatten (g2)
        y = Gemm <transB = 1> (f, fw)
    }}
    """)
    model.graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array([4], np.int64), "four"),
        onnx.numpy_helper.from_array(np.array([0, 0, 1, 1], np.int64), "ones"),
        onnx.numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        onnx.numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "bias"),
        onnx.numpy_helper.from_array((rng.standard_normal((4, 16)) * 0.3).astype(np.float32), "fw")])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_normalize_makes_exporter_constants_plain_initializers():
    model = exported_style_model()
    plain, counts = normalize(model)
    assert counts == {"constant_nodes": 1, "identities": 2, "folded": 2, "shared_initializers": 1}
    ops = [n.op_type for n in plain.graph.node]
    assert "Identity" not in ops and "Constant" not in ops and "Concat" not in ops
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(outputs_on(plain, [x])[0]["y"], outputs_on(model, [x])[0]["y"], rtol=1e-6, atol=1e-6)


def test_prune_sees_through_exporter_constants_without_simplify():
    model = exported_style_model()
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    result = Prune({"ratio": 0.5, "round_to": 1, "check_latency": False}).apply(model, PassContext(check_inputs=[x]))
    assert result.notes["normalized"]["identities"] == 2
    statuses = {r["group"]: r["status"] for r in result.notes["groups"]}
    assert list(statuses.values()).count("pruned") == 2, statuses  # both convs, shared bias and all
    totals = result.notes["totals"]
    assert totals["params_after"] < totals["params_before"] and totals["macs_after"] < 0.6 * totals["macs_before"]
    assert outputs_on(result.model, [x])[0]["y"].shape == (2, 4)


def test_a_slower_pruned_model_is_rolled_back_unless_kept(monkeypatch):
    from onnxpipe.passes import prune as prune_module

    monkeypatch.setattr(prune_module, "side_by_side_ms", lambda *a, **k: (1.0, 1.5, 1.5))
    model = exported_style_model()
    inputs = [{"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}]
    spec = {"ratio": 0.5, "round_to": 1, "min_agreement": 0.05}
    slow = optimize(model, [{"prune": spec}], check_inputs=inputs, measure_latency=True).stages[1]
    assert not slow.kept and "slower" in slow.reason and slow.notes["latency"]["ratio"] == 1.5
    kept = optimize(model, [{"prune": {**spec, "keep_if_slower": True}}], check_inputs=inputs,
                    measure_latency=True).stages[1]
    assert kept.kept and any("keep_if_slower" in h for h in kept.notes["hints"])
    monkeypatch.setattr(prune_module, "side_by_side_ms", lambda *a, **k: (1.0, 0.8, 0.8))
    fast = optimize(model, [{"prune": spec}], check_inputs=inputs, measure_latency=True).stages[1]
    assert fast.kept and not fast.notes["latency"]["slower"]


def test_a_structural_pass_that_adds_parameters_is_rolled_back():
    class Grow(Pass):
        name = "grow"
        structural = True

        def apply(self, model, ctx):
            out = onnx.ModelProto()
            out.CopyFrom(model)
            out.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(10, np.float32), "unused"))
            return PassResult(out)

    stage = optimize(exported_style_model(), [Grow({})], measure_latency=False).stages[1]
    assert not stage.kept and "would add parameters" in stage.reason


def test_default_round_to_follows_the_cpu():
    from onnxpipe.core.hardware import channel_multiple

    model = exported_style_model()
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    result = Prune({"ratio": 0.3, "check_latency": False}).apply(model, PassContext(check_inputs=[x]))
    assert result.notes["round_to"] == channel_multiple("cpu")
    for row in result.notes["groups"]:
        if row["status"] == "pruned":
            assert row["channels_after"] % result.notes["round_to"] == 0


# --- exports of transformers architectures ------------------------------------------------------

def _export(kind: str, path: str, dynamo: bool) -> str:
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "resnet":
        # the backbone: with random weights a classifier's top-1 says nothing, its features' cosine does
        cfg = transformers.ResNetConfig(embedding_size=32, hidden_sizes=[64, 128], depths=[1, 1], layer_type="basic")
        model = transformers.ResNetModel(cfg).eval()
        args, names, dyn = (torch.randn(2, 3, 32, 32),), ["pixel_values"], {"pixel_values": {0: "batch"}}
    else:
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=32)
        model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
        ids = torch.randint(0, 100, (2, 8))
        args, names = (ids, torch.ones_like(ids), torch.zeros_like(ids)), ["input_ids", "attention_mask", "token_type_ids"]
        dyn = {n: {0: "batch", 1: "seq"} for n in names}

    class Out(torch.nn.Module):  # the first output only: last_hidden_state
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *a):
            return self.m(*a)[0]

    torch.onnx.export(Out(model), args, path, input_names=names, output_names=["out"],
                      dynamic_axes=None if dynamo else dyn, dynamo=dynamo, opset_version=18 if dynamo else 17)
    return path


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """Exports made on first use and kept for the session: (kind, dynamo) -> path."""
    folder = tmp_path_factory.mktemp("exports")
    cache: dict[tuple[str, bool], str] = {}

    def get(kind: str, dynamo: bool = False) -> str:
        if (kind, dynamo) not in cache:
            cache[(kind, dynamo)] = _export(kind, str(folder / f"{kind}{'_dynamo' if dynamo else ''}.onnx"), dynamo)
        return cache[(kind, dynamo)]

    return get


def test_torchscript_resnet_prunes_a_quarter_of_its_macs_with_no_data(exports):
    model = onnx.load(exports("resnet"))
    result = optimize(model, [{"prune": {"ratio": 0.3}}], measure_latency=False)
    stage = result.stages[1]
    assert stage.kept, stage.reason
    before, after = summarize(model), summarize(result.model)
    assert after.macs <= 0.75 * before.macs and after.params < before.params
    assert stage.notes["normalized"]["identities"] > 0  # the exporter's shared constants were seen through


def test_bert_export_runs_the_no_data_recipe(exports, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ONNX Runtime's quantizer writes scratch files in the working directory
    model = onnx.load(exports("bert"))
    result = optimize(model, ["simplify", {"prune": {"ratio": 0.3}}, {"quantize": {"mode": "dynamic"}}],
                      measure_latency=False)
    assert [s.name for s in result.stages] == ["input", "simplify", "prune", "quantize"]
    assert all(s.kept for s in result.stages), [s.reason for s in result.stages]
    assert result.stages[2].notes["totals"]["params_after"] < result.stages[2].notes["totals"]["params_before"]
    onnx.checker.check_model(result.model)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resnet", "bert"])
def test_dynamo_exports_prune_too(exports, kind):
    model = onnx.load(exports(kind, dynamo=True))
    stage = optimize(model, [{"prune": {"ratio": 0.3}}], measure_latency=False).stages[1]
    assert stage.kept and stage.notes["totals"]["macs_after"] < stage.notes["totals"]["macs_before"]


@pytest.mark.slow
def test_onnxpipe_run_on_a_bert_export_without_data(exports, tmp_path):
    from tests.conftest import run_cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{source: {exports('bert')}}}\npasses: [simplify, {{prune: {{ratio: 0.3}}}}, "
                      f"{{quantize: {{mode: dynamic}}}}, strip]\noutput: {tmp_path / 'out'}\n")
    proc = run_cli("run", str(recipe), cwd=tmp_path)  # ORT's quantizer leaves scratch files in the working directory
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    onnx.checker.check_model(onnx.load(str(tmp_path / "out" / "model.onnx")))
