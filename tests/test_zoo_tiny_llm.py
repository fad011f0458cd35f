"""The zoo's tiny_llm: trained once on pydoc topics, cached, convertible, and better than chance."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("transformers")


def _module():
    spec = importlib.util.spec_from_file_location("tiny_llm_model", ROOT / "models" / "tiny_llm" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_held_out_split_is_disjoint_and_stdlib_only():
    from onnxpipe_zoo.tiny_llm import data

    train, held = data.split()
    assert len(held) >= 5 and len(train) > 5 * len(held)
    assert not set(train) & set(held)


@pytest.mark.slow
def test_trains_once_caches_and_learns(tmp_path):
    mod = _module()
    path = mod.folder()
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    calls = mod.TRAIN_CALLS
    assert mod.folder() == path and mod.TRAIN_CALLS == calls  # the cache is reused
    model, tokenizer = mod.load_trained()
    ppl = mod.perplexity(model, tokenizer)
    assert ppl < 0.2 * mod.CONFIG["vocab"], ppl  # uniform guessing would be the vocabulary size
    assert math.isfinite(ppl)

    from onnxpipe.converter.huggingface import convert_folder

    result = convert_folder(path, tmp_path / "onnx")
    assert result.check.ok and result.task == "text-generation"


@pytest.mark.slow
def test_recipe_runs_and_generates(tmp_path):
    from onnxpipe.pipeline import run
    from onnxpipe.runtimes.generate import generate

    result = run(ROOT / "models" / "tiny_llm" / "pipeline.yaml", tmp_path / "run")
    assert all(s.kept for s in result.pipeline.stages)
    assert all(row["ok"] for row in result.validation)
    out = generate(tmp_path / "run", "The for statement is used to", max_new_tokens=16)
    assert out.tokens and out.text.strip()


@pytest.mark.slow
def test_int4_recipe_holds_perplexity_and_size_and_generates(tmp_path):
    from onnxpipe.pipeline import run
    from onnxpipe.runtimes.generate import generate

    result = run(ROOT / "models" / "tiny_llm" / "int4.yaml", tmp_path / "run")
    before, after = result.pipeline.stages
    assert after.kept and after.notes["budget_met"] and after.notes["layout_check"]["ok"]
    assert after.metric <= 1.05 * before.metric  # perplexity: lower is better
    assert after.size_bytes <= 0.3 * before.size_bytes and after.notes["embeddings_quantized"] == 1
    assert before.tokens_per_s and after.tokens_per_s
    for engine in ("genai", "ort"):
        out = generate(tmp_path / "run", "The for statement is used to", max_new_tokens=16, engine=engine)
        assert len(out.tokens) == 16 and out.text.strip()
