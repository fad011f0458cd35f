"""Hugging Face folders to ONNX: decoders with a flat KV cache, and the single-file tasks."""

from __future__ import annotations

import json

import hf_tiny
import numpy as np
import onnx
import pytest
from conftest import run_cli

pytest.importorskip("transformers")


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_decoder_matches_transformers_on_prompt_and_cached_steps(tmp_path, family):
    from onnxpipe.converter.huggingface import convert_folder

    src = hf_tiny.decoder(family, tmp_path / "hf")
    result = convert_folder(src, tmp_path / "out")
    assert result.task == "text-generation" and result.task_inferred
    assert result.check.ok, result.check.as_dict()
    labels = [r.label for r in result.check.runs]
    assert labels == ["prompt"] + [f"decode {i}" for i in range(1, 9)]
    assert max(c.max_abs for c in result.check.worst()) < 1e-4
    out = tmp_path / "out"
    for name in ("model.onnx", "tokenizer.json", "config.json", "genai_config.json"):
        assert (out / name).is_file(), name
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    genai = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    kv_heads = 4 if family in ("phi", "gpt2") else 2
    assert (genai["num_key_value_heads"], genai["head_size"], genai["num_hidden_layers"]) == (kv_heads, 16, 2)
    key_shape = [d.dim_value or d.dim_param for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert key_shape[1] == kv_heads  # grouped KV heads stay grouped in the cache


def test_infer_task_from_architectures():
    from onnxpipe.converter.huggingface import infer_task
    from onnxpipe.core.errors import InputError

    assert infer_task({"architectures": ["Qwen2ForCausalLM"]}) == "text-generation"
    assert infer_task({"architectures": ["GPT2LMHeadModel"]}) == "text-generation"
    assert infer_task({"architectures": ["BertForSequenceClassification"]}) == "text-classification"
    assert infer_task({"architectures": ["ViTForImageClassification"]}) == "image-classification"
    assert infer_task({"architectures": ["BertModel"]}) == "feature-extraction"
    with pytest.raises(InputError, match="--task"):
        infer_task({})


def test_text_classification_folder_via_cli(tmp_path):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_labels=3)
    tf.BertForSequenceClassification(cfg).eval().save_pretrained(str(tmp_path / "bert"))
    proc = run_cli("convert", str(tmp_path / "bert"), "-o", str(tmp_path / "bert.onnx"), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["task"] == "text-classification" and doc["task_inferred"] is True
    assert doc["check"]["ok"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "bert.onnx"))
    ids = np.array([[5, 7, 9, 11]] * 3, np.int64)
    feeds = {i.name: (ids if i.name == "input_ids" else np.ones_like(ids) if i.name == "attention_mask"
                      else np.zeros_like(ids)) for i in sess.get_inputs()}
    (logits,) = sess.run(None, feeds)
    assert logits.shape == (3, 3)


def test_image_classification_folder(tmp_path):
    import torch
    import transformers as tf

    from onnxpipe.converter import convert

    torch.manual_seed(0)
    cfg = tf.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       image_size=16, patch_size=8, num_labels=4)
    tf.ViTForImageClassification(cfg).eval().save_pretrained(str(tmp_path / "vit"))
    result = convert(tmp_path / "vit", tmp_path / "vit.onnx", task="image-classification")
    assert result.check.ok and not result.task_inferred
    assert [o.name for o in result.check.worst()] == ["logits"]


def test_bad_task_and_bad_folder_are_one_line_errors(tmp_path):
    src = hf_tiny.decoder("llama", tmp_path / "hf", with_tokenizer=False)
    proc = run_cli("convert", str(src), "--task", "translation", "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown task 'translation'")
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    proc = run_cli("convert", str(tmp_path / "broken"), "-o", str(tmp_path / "o2"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot read") and "Traceback" not in proc.stderr
    (tmp_path / "m.onnx").write_bytes(b"")
    proc = run_cli("convert", str(tmp_path / "m.onnx"), "--task", "text-generation", "-o", str(tmp_path / "o3"))
    assert proc.returncode == 2 and "--task applies to Hugging Face model folders" in proc.stderr


def test_recipe_converts_a_folder_factory_quantizes_and_keeps_it_generating(tmp_path):
    from conftest import write_factory

    from onnxpipe.pipeline import run
    from onnxpipe.runtimes.generate import TextGenerator

    src = hf_tiny.decoder("qwen2", tmp_path / "hf")
    factory = write_factory(tmp_path, f"""
        import numpy as np

        def folder():
            return {str(src)!r}

        def feeds():
            rng = np.random.default_rng(0)
            out = []
            for past, new in ((0, 8), (5, 1)):
                d = {{"input_ids": rng.integers(1, 200, size=(1, new)),
                      "attention_mask": np.ones((1, past + new), np.int64),
                      "position_ids": np.arange(past, past + new)[None]}}
                for i in range(2):
                    for kv in ("key", "value"):
                        d[f"past_key_values.{{i}}.{{kv}}"] = rng.standard_normal((1, 2, past, 16)).astype(np.float32)
                out.append(d)
            return out
        """)
    recipe = {"model": {"source": f"{factory}:folder", "task": "text-generation"},
              "data": {"calibration": f"{factory}:feeds", "check_batches": 2},
              "passes": ["simplify", {"quantize": {"mode": "dynamic"}}],
              "validate": {"providers": ["cpu"], "atol": 1.0, "rtol": 0.5, "latency": False}}
    result = run(recipe, tmp_path / "run")
    assert result.conversion.task == "text-generation" and result.conversion.check.ok
    assert [s.kept for s in result.pipeline.stages[1:]] == [True, True]
    for name in ("model.onnx", "tokenizer.json", "genai_config.json", "config.json"):
        assert (tmp_path / "run" / name).is_file(), name
    out = TextGenerator(tmp_path / "run", engine="genai").generate([5, 6, 7], max_new_tokens=4, min_new_tokens=4)
    assert len(out.tokens) == 4
