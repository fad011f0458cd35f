"""Weight-only int4/int8 quantization (MatMulNBits), its layout proof, the perplexity metric and the budget."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxpipe.core import hardware
from onnxpipe.core.compare import outputs_on
from onnxpipe.core.data import evaluation_source
from onnxpipe.core.errors import InputError
from onnxpipe.core.perplexity import evaluate_model, nll_sum, perplexity, text_windows
from onnxpipe.passes.base import PassContext
from onnxpipe.passes.quant_layout import check_layout, read_blocks
from onnxpipe.passes.quant_targets import lm_head, weight_matmuls
from onnxpipe.passes.quant_weight_only import WeightOnlyQuantize
from onnxpipe.passes.quantize import Quantize
from onnxpipe.pipeline import optimize

VOCAB = 256


def mlp_model(k: int = 96, hidden: int = 64, n: int = 40, seed: int = 0) -> onnx.ModelProto:
    """x[B, k] -> MatMul(k x hidden) -> Relu -> MatMul(hidden x n) -> y; K of 96 leaves an odd block count at 32/64."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((k, hidden)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((hidden, n)) * 0.2).astype(np.float32)
    w1[:, 3] *= 25.0  # one column of outliers: blocks of very different scales
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", n])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _x(batch: int = 8, k: int = 96, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, k)).astype(np.float32)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A random-initialised LlamaForCausalLM (2 layers, vocab 256) exported by torch.onnx (dynamo), logits only,
    in a folder with a tokenizer.json trained on stdlib text and the model's config.json."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    cfg.save_pretrained(folder)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    ids = torch.randint(0, VOCAB, (2, 16))
    torch.onnx.export(Logits().eval(), (ids,), str(folder / "model.onnx"), input_names=["input_ids"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "b", 1: "s"}, "logits": {0: "b", 1: "s"}}, dynamo=True,
                      verbose=False)
    from pydoc_data.topics import topics

    text = "\n".join(list(topics.values())[:40])
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[UNK]"]))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "eval.txt").write_text(text[:6000])
    return folder


def _token_batches(n: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    batches = [{"input_ids": rng.integers(0, VOCAB, (2, 16)).astype(np.int64)} for _ in range(n)]
    return lambda: iter(batches)


# -- the layout proof ------------------------------------------------------------------------

@pytest.mark.parametrize("mode,symmetric,block", [("int4", False, 32), ("int4", True, 64), ("int8-weight-only", False, 32),
                                                  ("int8-weight-only", True, 16)])
def test_stored_blocks_dequantize_to_the_weights_within_their_scale(mode, symmetric, block):
    model = mlp_model()
    p = Quantize({"mode": mode, "symmetric": symmetric, "block_size": block})
    result = p.apply(model, PassContext())
    q = result.model
    nodes = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 and not any(n.op_type == "MatMul" for n in q.graph.node)
    lay = result.notes["layout_check"]
    assert lay["ok"] and lay["nodes"] == 2, lay
    assert lay["worst_block_error_steps"] <= (1.0 if symmetric else 0.5) + 1e-3
    assert lay["runtime_readback_max_diff"] < 1e-5
    # our reading of the blocks against the original weights, element by element
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    blocks = read_blocks(nodes[0], inits)
    step = np.repeat(np.abs(blocks.scales), block, axis=1)[:, : w1.shape[0]].T
    assert np.all(np.abs(blocks.dequantize() - w1) <= step * (1.0 if symmetric else 0.5) + 1e-6)
    cos = next(c for c in p.compare(outputs_on(model, [_x()]), outputs_on(q, [_x()])) if c.name == "y")
    assert cos.ok


def test_a_misread_layout_fails_the_check_and_rolls_the_pass_back():
    model = mlp_model()
    q = Quantize({"mode": "int4"}).apply(model, PassContext()).model
    assert check_layout(model, q, "rtn", False).ok
    bad = onnx.ModelProto()
    bad.CopyFrom(q)
    for init in bad.graph.initializer:  # scales stored [blocks, N] instead of [N, blocks]
        if init.name == "w1_scales":
            arr = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr.T).reshape(arr.shape), init.name))
    lay = check_layout(model, bad, "rtn", False)
    assert not lay.ok and "fc1_Q4" in lay.failures[0] and lay.worst_steps > 1.0

    class Broken(WeightOnlyQuantize):  # a quantizer that writes the scales in the wrong layout
        def quantize(self, *args, **kwargs):
            out = super().quantize(*args, **kwargs)
            for init in out.graph.initializer:
                if init.name == "w1_scales":
                    arr = numpy_helper.to_array(init)
                    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr.T).reshape(arr.shape), init.name))
            return out

    result = optimize(model, [Broken({"mode": "int4", "min_cosine": -1.0})], check_inputs=[_x()], measure_latency=False)
    stage = result.stages[1]
    assert not stage.kept and "weight blocks" in stage.reason
    assert any(n.op_type == "MatMul" for n in result.model.graph.node)


def test_hardware_picks_an_accuracy_level_and_the_pass_reports_it():
    level, _, why = hardware.weight_only_advice(4)
    assert level in (0, 4) and hardware.cpu().model in why
    notes = Quantize({"mode": "int4"}).apply(mlp_model(), PassContext()).notes
    assert notes["accuracy_level"] == level and notes["hardware"] == why
    if level:
        q = Quantize({"mode": "int4"}).apply(mlp_model(), PassContext()).model
        assert all(any(a.name == "accuracy_level" and a.i == level for a in n.attribute)
                   for n in q.graph.node if n.op_type == "MatMulNBits")
    slow = Quantize({"mode": "int8-weight-only", "accuracy_level": 0}).apply(mlp_model(), PassContext()).notes
    assert any("8-bit MatMulNBits has no float kernel" in w for w in slow["warnings"])


def test_options_that_cannot_work_are_one_line_errors():
    model = mlp_model()
    with pytest.raises(InputError, match="did you mean fc1"):
        Quantize({"mode": "int4", "exclude_nodes": ["fc_1"]}).apply(model, PassContext())
    with pytest.raises(InputError, match="calibration data"):
        Quantize({"mode": "int4", "algorithm": "gptq"}).apply(model, PassContext())
    with pytest.raises(InputError, match="4 bits only"):
        Quantize({"mode": "int8-weight-only", "algorithm": "hqq"}).apply(model, PassContext())
    with pytest.raises(InputError, match="power of two"):
        Quantize({"mode": "int4", "block_size": 24}).apply(model, PassContext())
    with pytest.raises(InputError, match="nothing to quantize"):
        Quantize({"mode": "int4", "exclude_nodes": ["fc1", "fc2"]}).apply(model, PassContext())
    with pytest.raises(InputError, match="unknown option"):
        Quantize({"mode": "int4", "per_channel": True})
    assert Quantize({"mode": "dynamic"}).config.mode == "dynamic"  # the int8 modes are untouched


def test_gptq_takes_calibration_and_leaves_odd_block_counts_to_rtn():
    rng = np.random.default_rng(3)
    batches = [{"x": rng.standard_normal((8, 96)).astype(np.float32)} for _ in range(3)]
    result = Quantize({"mode": "int4", "algorithm": "gptq"}).apply(mlp_model(), PassContext(calibration=lambda: iter(batches)))
    # fc1: K 96 = 3 blocks of 32 per column, whose zero points ORT's GPTQ cannot pack; fc2: K 64 = 2 blocks
    assert result.notes["gptq_rtn_fallback"] == ["fc1"]
    assert result.notes["layout_check"]["ok"] and result.notes["matmuls"]["int4"] == 2
    names = {n.name: list(n.input) for n in result.model.graph.node}
    assert names["fc2_Q4"][1] == "w2_Q4G32" and names["fc1_Q4"][1] == "w1_Q4"  # ORT's GPTQ and rtn tensor names
    # ORT's GPTQ ignores nodes_to_exclude: the pass still keeps an excluded node in float
    kept = Quantize({"mode": "int4", "algorithm": "gptq", "symmetric": True, "exclude_nodes": ["fc2"]}).apply(
        mlp_model(), PassContext(calibration=lambda: iter(batches)))
    ops = {n.name: n.op_type for n in kept.model.graph.node}
    assert ops["fc2"] == "MatMul" and ops["fc1_Q4"] == "MatMulNBits" and "Identity" not in ops.values()


def test_exclusions_keep_nodes_in_float():
    q = Quantize({"mode": "int4", "exclude_nodes": ["fc2"]}).apply(mlp_model(), PassContext())
    ops = {n.name: n.op_type for n in q.model.graph.node}
    assert ops["fc2"] == "MatMul" and ops["fc1_Q4"] == "MatMulNBits"
    assert q.notes["matmuls"] == {"int4": 1, "int8": 0, "float": 1}


# -- the perplexity metric ---------------------------------------------------------------------

def test_perplexity_is_exp_of_the_mean_next_token_loss():
    ids = np.array([[0, 1, 2, 1]])
    assert perplexity([np.zeros((1, 4, 5), np.float32)], ids) == pytest.approx(5.0)
    logits = np.full((1, 4, 5), -30.0, np.float32)
    logits[0, np.arange(3), ids[0, 1:]] = 30.0  # every next token predicted with certainty
    assert perplexity([logits], ids) == pytest.approx(1.0, abs=1e-6)
    total, count = nll_sum(np.zeros((1, 4, 5)), np.array([[0, -100, 2, 1]]))
    assert count == 2 and total == pytest.approx(2 * math.log(5))


def test_evaluation_text_is_tokenized_with_the_models_tokenizer(llama, tmp_path):
    inputs, labels = evaluation_source(llama / "eval.txt", model=llama / "model.onnx")
    assert inputs["input_ids"].shape[1] == 32 and inputs["input_ids"].shape[0] >= 4  # the model's context
    assert np.array_equal(labels, inputs["input_ids"]) and inputs["input_ids"].max() < VOCAB
    np.savez(tmp_path / "ids.npz", input_ids=inputs["input_ids"][:2])
    _, l2 = evaluation_source(tmp_path / "ids.npz")
    assert np.array_equal(l2, inputs["input_ids"][:2])
    with pytest.raises(InputError, match="tokenizer.json"):
        text_windows(llama / "eval.txt", tmp_path / "elsewhere.onnx")
    ppl = evaluate_model(str(llama / "model.onnx"), inputs, labels)
    assert 0.5 * VOCAB < ppl < 2 * VOCAB  # a random model is about uniform over its vocabulary


# -- the LLM fixture: algorithms, LM head, embeddings, budget ---------------------------------

def test_llama_int4_through_the_pipeline_with_perplexity(llama):
    model = onnx.load(str(llama / "model.onnx"))
    assert lm_head(model) is not None
    evaluation = evaluation_source(llama / "eval.txt", model=llama / "model.onnx")
    result = optimize(model, [{"quantize": {"mode": "int4", "exclude_lm_head": True, "quantize_embeddings": True}}],
                      calibration=_token_batches(), evaluation=evaluation, metric="perplexity", measure_latency=False)
    before, after = result.stages
    assert after.kept, after.reason
    assert abs(after.metric / before.metric - 1) < 0.05
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == len(weight_matmuls(model)) - 1
    head = after.notes["lm_head"]
    assert any(n.name == head and n.op_type == "MatMul" for n in result.model.graph.node)
    assert after.size_bytes < 0.45 * before.size_bytes  # the float head stays: 1/3 of this tiny model


@pytest.mark.parametrize("algorithm", ["hqq", "gptq"])
def test_llama_hqq_and_gptq(llama, algorithm):
    model = onnx.load(str(llama / "model.onnx"))
    ctx = PassContext(calibration=_token_batches())
    result = Quantize({"mode": "int4", "algorithm": algorithm}).apply(model, ctx)
    assert result.notes["layout_check"]["ok"], result.notes["layout_check"]
    assert result.notes["matmuls"]["int4"] == len(weight_matmuls(model))
    batch = [_token_batches()().__next__()]
    comps = Quantize({"mode": "int4", "algorithm": algorithm}).compare(outputs_on(model, batch),
                                                                        outputs_on(result.model, batch))
    assert all(c.ok for c in comps), comps
    if algorithm == "hqq":
        assert any("float zero points" in w for w in result.notes["warnings"])


def test_budget_moves_the_most_sensitive_matmuls_to_8_bits_then_float(llama):
    model = onnx.load(str(llama / "model.onnx"))
    ctx = PassContext(calibration=_token_batches())
    loose = Quantize({"mode": "int4", "max_drop": 0.5}).apply(model, ctx)
    assert loose.notes["budget_met"] and loose.notes["kept_8bit"] == [] and len(loose.notes["trials"]) == 1
    first = loose.notes["trials"][0]["drop"]
    assert first > 0
    tight = Quantize({"mode": "int4", "max_drop": first / 4}).apply(model, ctx)
    n = tight.notes
    assert n["budget_met"] and n["drop"] <= first / 4 and n["kept_8bit"], n["trials"]
    assert n["kept_8bit"] == [r["node"] for r in n["ranking"]][: len(n["kept_8bit"])]  # most sensitive first
    assert n["matmuls"]["int8"] == len(n["kept_8bit"]) and n["layout_check"]["ok"]
    assert n["trials"][0]["stage"] == "all int4" and len(n["trials"]) >= 2
    got = outputs_on(tight.model, [_token_batches()().__next__()])  # the assembled model runs
    assert np.isfinite(got[0]["logits"]).all()
    never = Quantize({"mode": "int4", "max_drop": 0.0}).apply(model, ctx)
    assert not never.modified and not never.notes["budget_met"]
    assert any(t["stage"] == "most sensitive in float" for t in never.notes["trials"])


def test_recipe_scores_perplexity_on_a_text_file_beside_the_model(llama, tmp_path):
    from onnxpipe.pipeline import run

    recipe = tmp_path / "llm.yaml"
    recipe.write_text(f"""
model: {{source: {llama / 'model.onnx'}}}
data: {{evaluation: {llama / 'eval.txt'}}}
passes:
  - quantize: {{mode: int4, max_drop: 0.05, exclude_lm_head: true}}
validate: {{providers: [cpu], metric: perplexity, latency: false}}
""")
    result = run(str(recipe), tmp_path / "out")
    before, after = result.pipeline.stages
    assert result.pipeline.metric_name == "perplexity" and after.kept, after.reason
    assert after.notes["budget_met"] and after.notes["metric"].startswith("perplexity (relative increase)")
    assert after.notes["trials"][0]["drop"] == pytest.approx(after.metric / before.metric - 1, abs=1e-6)
    assert (tmp_path / "out" / "model.onnx").exists()
