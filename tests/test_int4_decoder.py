"""int4 weight-only quantization of a real KV-cache decoder export: optimize, perplexity, generate."""

from __future__ import annotations

import json

import hf_tiny
import numpy as np
import pytest
from conftest import run_cli

pytest.importorskip("transformers")

PROMPT = [5, 17, 33, 44, 91, 100, 7, 8, 120, 3]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(transformers model, converted text-generation folder) of a 2-layer random Llama."""
    from transformers import AutoModelForCausalLM

    src, folder = hf_tiny.converted("llama", tmp_path_factory.mktemp("llama"), layers=2)
    return AutoModelForCausalLM.from_pretrained(str(src)).eval(), folder


def test_generated_check_inputs_of_a_decoder_are_consistent_steps(llama):
    from onnxpipe.core.modelio import load_model
    from onnxpipe.pipeline.stages import generated_inputs, reference_outputs

    model = load_model(llama[1] / "model.onnx")
    steps = generated_inputs(model)
    prompt, step = steps
    assert prompt["past_key_values.0.key"].shape[2] == 0 and prompt["attention_mask"].shape[1] == 8
    assert step["past_key_values.1.value"].shape[2] == 8 and step["input_ids"].shape[1] == 1
    assert step["attention_mask"].shape[1] == 9 and step["position_ids"].tolist() == [[8]] * 2
    outs = reference_outputs(model, steps)  # runs: no "need real values"
    assert outs[1]["present.0.key"].shape[2] == 9


def test_perplexity_with_an_empty_cache_matches_transformers(llama):
    import torch

    from onnxpipe.core.perplexity import evaluate_model

    model, folder = llama
    ids = np.random.default_rng(0).integers(1, 256, size=(3, 24)).astype(np.int64)
    with torch.no_grad():
        loss = model(torch.tensor(ids), labels=torch.tensor(ids)).loss.item()
    got = evaluate_model(folder / "model.onnx", {"input_ids": ids}, ids)
    assert got == pytest.approx(np.exp(loss), rel=1e-3)


def test_int4_decoder_folder_still_generates_on_both_engines(llama, tmp_path):
    from onnxpipe.core.modelio import load_model
    from onnxpipe.core.perplexity import evaluate_model
    from onnxpipe.runtimes.generate import TextGenerator

    _, folder = llama
    out = tmp_path / "int4" / "model.onnx"
    r = run_cli("optimize", str(folder / "model.onnx"), "-o", str(out), "--pass", "quantize:{mode: int4, exclude_lm_head: true}",
                "--report", str(tmp_path / "report"))
    assert r.returncode == 0, r.stderr + r.stdout
    for name in ("genai_config.json", "tokenizer.json", "config.json"):
        assert (out.parent / name).is_file(), name
    stage = json.loads((tmp_path / "report" / "report.json").read_text())["stages"][1]
    assert stage["kept"], stage
    notes = stage["notes"]
    assert notes["layout_check"]["ok"] and notes["matmuls"] == {"int4": 14, "int8": 0, "float": 1}
    assert sum(n.op_type == "MatMulNBits" for n in load_model(out).graph.node) == 14
    assert stage["tokens_per_s"] > 0 and notes["size_bytes"]["after"] < 0.6 * notes["size_bytes"]["before"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "kept in float: /inner/lm_head/MatMul" in md and "layout check: ok" in md and "tokens/s" in md

    tokens = {}
    for engine in ("genai", "ort"):
        gen = TextGenerator(out.parent, engine=engine).generate(PROMPT, max_new_tokens=16)
        assert len(gen.tokens) == 16 and all(0 <= t < 256 for t in gen.tokens)
        tokens[engine] = gen.tokens
    assert tokens["genai"] == tokens["ort"]  # both run ONNX Runtime's MatMulNBits kernels

    ids = np.random.default_rng(1).integers(1, 256, size=(2, 24)).astype(np.int64)
    ppl_float = evaluate_model(folder / "model.onnx", {"input_ids": ids}, ids)
    ppl_int4 = evaluate_model(out, {"input_ids": ids}, ids)
    assert ppl_int4 != ppl_float and abs(ppl_int4 / ppl_float - 1) < 0.05  # random weights: near-uniform logits


def test_a_recipe_on_a_converted_decoder_keeps_the_generation_files(llama, tmp_path):
    _, folder = llama
    recipe = tmp_path / "int4.yaml"
    recipe.write_text(f"model: {{source: {folder / 'model.onnx'}}}\n"
                      "passes:\n  - quantize: {mode: int4}\n"
                      f"validate: {{providers: [cpu], atol: 0.5, rtol: 0.1, latency: false}}\noutput: {tmp_path / 'out'}\n")
    r = run_cli("run", str(recipe))
    assert r.returncode == 0, r.stderr + r.stdout
    for name in ("genai_config.json", "tokenizer.json", "config.json", "model.onnx"):
        assert (tmp_path / "out" / name).is_file(), name


def test_optimize_to_another_file_name_points_genai_config_at_it(llama, tmp_path):
    _, folder = llama
    out = tmp_path / "q" / "decoder_int4.onnx"
    r = run_cli("optimize", str(folder / "model.onnx"), "-o", str(out), "--pass", "quantize:{mode: int4}")
    assert r.returncode == 0, r.stderr + r.stdout
    config = json.loads((out.parent / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "decoder_int4.onnx"
    assert json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.onnx"
