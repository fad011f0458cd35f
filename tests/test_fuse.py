"""fuse: transformer exports from both torch exporters get every attention layer fused, checked and timed."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conv_gemm_model
from onnx import TensorProto, helper

from onnxpipe.core.compare import outputs_on
from onnxpipe.core.errors import InputError
from onnxpipe.passes import get_pass
from onnxpipe.passes.base import PassContext
from onnxpipe.passes.fuse import Fuse, timing_feeds
from onnxpipe.passes.fuse_graph import detect, expand_ort_only_ops, fused_counts, gemm_to_matmul

LAYERS, HIDDEN, HEADS = 2, 64, 4
KINDS = ("bert", "vit", "gpt2", "llama")
EXPECTED_TYPE = {"bert": "bert", "vit": "vit", "gpt2": "gpt2", "llama": "llama"}


def _hf_model(kind: str):
    import transformers as T

    if kind == "bert":
        return T.BertModel(T.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        intermediate_size=128, vocab_size=100))
    if kind == "vit":
        return T.ViTModel(T.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      intermediate_size=128, image_size=32, patch_size=8))
    if kind == "gpt2":
        return T.GPT2Model(T.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=100, n_positions=64,
                                        bos_token_id=0, eos_token_id=0))
    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                            num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                            max_position_embeddings=64, bos_token_id=0, eos_token_id=0))


def _inputs(kind: str, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "vit":
        return {"pixel_values": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)}
    mask = np.ones((batch, seq), np.int64)
    if kind == "bert":
        mask[-1, seq * 3 // 4:] = 0  # padding in the last row (right-padded, as tokenizers write it)
    return {"input_ids": rng.integers(0, 100, (batch, seq)).astype(np.int64), "attention_mask": mask}


def _export(kind: str, exporter: str, path: Path) -> onnx.ModelProto:
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = _hf_model(kind).eval()

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = hf

        def forward(self, *args):
            if kind == "vit":
                return self.m(pixel_values=args[0], return_dict=False)[0]
            extra = {"use_cache": False} if kind in ("gpt2", "llama") else {}
            return self.m(input_ids=args[0], attention_mask=args[1], return_dict=False, **extra)[0]

    feeds = _inputs(kind)
    names = list(feeds)
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = {0: torch.export.Dim.AUTO} if kind == "vit" else {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
            torch.onnx.export(Wrapped(), args, str(path), input_names=names, output_names=["out"], dynamo=True,
                              dynamic_shapes=(tuple(dims for _ in names),), verbose=False)
        else:
            axes = {n: ({0: "batch"} if kind == "vit" else {0: "batch", 1: "seq"}) for n in names}
            torch.onnx.export(Wrapped(), args, str(path), input_names=names, output_names=["out"], dynamo=False,
                              dynamic_axes=axes, opset_version=17)
    return onnx.load(str(path))


@pytest.fixture(scope="session")
def hf_export(tmp_path_factory):
    """``hf_export(kind, exporter)``: a 2-layer export, made once per test session."""
    cache: dict[tuple[str, str], onnx.ModelProto] = {}
    folder = tmp_path_factory.mktemp("hf-exports")

    def get(kind: str, exporter: str) -> onnx.ModelProto:
        if (kind, exporter) not in cache:
            cache[kind, exporter] = _export(kind, exporter, folder / f"{kind}-{exporter}.onnx")
        return cache[kind, exporter]
    return get


def _fuse_and_check(model: onnx.ModelProto, kind: str, **options) -> dict:
    ctx = PassContext(check_inputs=[_inputs(kind, seed=1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a partial or failed fusion warns: that fails these tests
        result = Fuse({"measure": False, **options}).apply(model, ctx)
    notes = result.notes
    assert notes["expected_attention"] == LAYERS
    assert notes["fused_attention"] == LAYERS, notes
    assert notes["status"] == "fused"
    assert result.modified
    feeds = _inputs(kind, batch=3, seq=24, seed=2) if kind != "vit" else _inputs(kind, batch=3, seed=2)
    before, after = outputs_on(model, [feeds])[0], outputs_on(result.model, [feeds])[0]
    for name in before:
        np.testing.assert_allclose(after[name], before[name], atol=1e-4, rtol=1e-3)
    onnx.checker.check_model(result.model)
    return notes


@pytest.mark.parametrize("kind,exporter", [("bert", "torchscript"), ("vit", "dynamo")])
def test_every_attention_layer_fused(hf_export, kind, exporter):
    notes = _fuse_and_check(hf_export(kind, exporter), kind)
    assert notes["model_type"] == EXPECTED_TYPE[kind]
    assert notes["num_heads"] == HEADS and notes["hidden_size"] == HIDDEN
    assert notes["fused"].get("SkipLayerNormalization") == 2 * LAYERS


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_attention_layer_fused_both_exporters(hf_export, kind, exporter):
    notes = _fuse_and_check(hf_export(kind, exporter), kind)
    assert notes["model_type"] == EXPECTED_TYPE[kind]
    norm = "SkipSimplifiedLayerNormalization" if kind == "llama" else "SkipLayerNormalization"
    assert notes["fused"].get(norm) == 2 * LAYERS


def test_fused_model_kept_only_where_it_pays(hf_export):
    model = hf_export("vit", "dynamo")
    ctx = PassContext(check_inputs=[_inputs("vit")])
    # no model is 1000x faster fused: the unfused one comes back, with both timings
    slow = Fuse({"backends": ["onnxscript"], "min_speedup": 1000, "budget_s": 0.3}).apply(model, ctx)
    assert not slow.modified and slow.model is model
    timing = slow.notes["timing"]
    assert timing["unfused_ms"] > 0 and timing["fused_ms"] > 0
    assert slow.notes["status"].startswith("fused, not kept")
    kept = Fuse({"backends": ["onnxscript"], "min_speedup": 1000, "budget_s": 0.3, "keep_if_slower": True}).apply(model, ctx)
    assert kept.modified and fused_counts(kept.model).get("Attention") == LAYERS
    assert kept.notes["status"] == "fused" and "speedup" in kept.notes["timing"]


def test_timing_feeds_resize_batch_and_sequence():
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s"])]))
    template = {"ids": np.arange(6, dtype=np.int64).reshape(2, 3)}
    feeds = timing_feeds(model, template, batch=5, seq=7)
    assert feeds["ids"].shape == (5, 7)
    assert set(np.unique(feeds["ids"])) <= set(range(6))  # tiled from the template, never invented
    assert timing_feeds(model, template, batch=None, seq=None)["ids"].shape == (2, 3)


def _unfusable_attention() -> onnx.ModelProto:
    """softmax(q k) v on rank-3 tensors: attention-shaped, but no fuser's pattern (rank 4, heads)."""
    nodes = [helper.make_node("MatMul", ["q", "k"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "q"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", 4, 8]),
                                       helper.make_tensor_value_info("k", TensorProto.FLOAT, ["b", 8, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 8])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _unfusable_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"q": rng.standard_normal((2, 4, 8)).astype(np.float32), "k": rng.standard_normal((2, 8, 4)).astype(np.float32)}


def test_nothing_fused_says_so_loudly():
    model = _unfusable_attention()
    ctx_lines: list[str] = []
    ctx = PassContext(check_inputs=[_unfusable_inputs()], log=ctx_lines.append)
    with pytest.warns(UserWarning, match="nothing fused .* 1 attention layers"):
        result = Fuse({"measure": False}).apply(model, ctx)
    assert result.model is model and not result.modified
    assert result.notes["status"] == "not fused"
    assert "nothing fused" in result.notes["warning"]
    assert any(line.startswith("warning: fuse: nothing fused") for line in ctx_lines)


def test_no_attention_nothing_to_fuse():
    model = conv_gemm_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = Fuse({}).apply(model, PassContext())
    assert not result.modified and result.notes["status"] == "nothing to fuse"
    assert detect(model).layers == 0


def test_a_model_on_disk_is_read_in_only_when_there_is_attention_to_fuse(hf_export, tmp_path, monkeypatch):
    from onnxpipe.core import external
    from onnxpipe.core.modelio import load_model, save_model

    plain = save_model(conv_gemm_model(), tmp_path / "plain" / "model.onnx", external_data=True, threshold=0)
    bert = save_model(hf_export("bert", "torchscript"), tmp_path / "bert" / "model.onnx", external_data=True)
    read = []
    original = external.materialize
    monkeypatch.setattr(external, "materialize", lambda m: read.append(1) or original(m))
    result = Fuse({}).apply(load_model(plain, load_external_data=False), PassContext())
    assert result.notes["status"] == "nothing to fuse" and read == []  # detection reads no weight
    lazy = load_model(bert, load_external_data=False)
    notes = _fuse_and_check(lazy, "bert")
    assert read == [1] and notes["fused_attention"] == LAYERS


def test_warning_reaches_the_pipeline_report():
    import onnxpipe
    from onnxpipe.pipeline import report

    with pytest.warns(UserWarning):
        result = onnxpipe.optimize(_unfusable_attention(), [{"fuse": {"measure": False}}], measure_latency=False)
    stage = result.stages[1]
    assert stage.kept and stage.notes["status"] == "not fused"
    text = report.markdown(result.stages)
    assert "NOT FUSED: 0 of 1 attention layers" in text and "warning: fuse: nothing fused" in text


def test_gemm_to_matmul_keeps_numbers():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])],
                          [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = {"x": rng.standard_normal((3, 4)).astype(np.float32)}
    expected = outputs_on(model, [x])[0]["y"]
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    assert gemm_to_matmul(changed) == 1
    assert [n.op_type for n in changed.graph.node] == ["MatMul", "Add"]
    np.testing.assert_allclose(outputs_on(changed, [x])[0]["y"], expected, rtol=1e-6, atol=1e-6)


def test_options_are_checked():
    assert get_pass("fuse") is Fuse
    with pytest.raises(InputError, match="unknown option"):
        Fuse({"heads": 4})
    with pytest.raises(InputError, match="model_type"):
        Fuse({"model_type": "resnet"})
    with pytest.raises(InputError, match="unknown target"):
        Fuse({"target": "tpu"}).apply(_unfusable_attention(), PassContext())


@pytest.mark.parametrize("opset,stash_type", [(17, 1), (20, 0)])
def test_ort_only_onnx_domain_op_written_portably(opset, stash_type):
    """ONNX Runtime's SimplifiedLayerNormalization sits in the ONNX domain, which onnx.checker rejects."""
    rng = np.random.default_rng(0)
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "s"], ["y"], axis=-1, epsilon=1e-5,
                            stash_type=stash_type)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
                          [onnx.numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "s")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    x = {"x": rng.standard_normal((3, 8)).astype(np.float32)}
    expected = outputs_on(model, [x])[0]["y"]
    assert expand_ort_only_ops(model) == 1
    onnx.checker.check_model(model)
    np.testing.assert_allclose(outputs_on(model, [x])[0]["y"], expected, rtol=1e-5, atol=1e-6)


def test_pipeline_checks_fused_ops_on_cpu(hf_export):
    """The pipeline's before/after check runs the com.microsoft ops on ONNX Runtime's CPU provider."""
    import onnxpipe

    model = hf_export("vit", "dynamo")
    fuse = {"fuse": {"backends": ["onnxscript"], "measure": False}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second run finds nothing left to fuse: no alarm for that
        result = onnxpipe.optimize(model, [fuse, fuse], check_inputs=[_inputs("vit", seed=3)],
                                   measure_latency=False)
    stage = result.stages[1]
    assert stage.kept, stage.reason
    assert stage.op_delta.get("Attention") == LAYERS and stage.op_delta.get("Softmax") == -LAYERS
    assert stage.max_abs is not None and stage.max_abs < 1e-4
    assert stage.notes["outcome"].startswith("fused, attention 2/2")
    assert any(n.domain == "com.microsoft" for n in result.model.graph.node)
    again = result.stages[2]
    assert again.kept and again.notes["status"] == "already fused" and not again.op_delta
