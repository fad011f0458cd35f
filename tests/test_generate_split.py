"""A decoder split between layers generates the same tokens as the whole one, each stage keeping its cache."""

from __future__ import annotations

import json

import hf_tiny
import pytest
from conftest import run_cli

pytest.importorskip("transformers")

PROMPT = [5, 17, 33, 44, 91, 100, 7, 8, 120, 3]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(whole decoder folder, the same split in two between layers) of a 4-layer random Llama."""
    tmp = tmp_path_factory.mktemp("split_llama")
    _, whole = hf_tiny.converted("llama", tmp, layers=4)
    r = run_cli("split", str(whole), "--parts", "2", "-o", str(tmp / "parts"), "--json")
    assert r.returncode == 0, r.stderr
    return whole, tmp / "parts"


def test_split_decoder_keeps_whole_layers_and_their_cache(folders):
    _, parts = folders
    spec = json.loads((parts / "pipeline.json").read_text())
    layers = spec["layers"]
    assert sorted(sum(layers, [])) == [0, 1, 2, 3] and all(layers)
    for part, own in zip(spec["parts"], layers):
        pasts = {t for t in part["inputs"] if t.startswith("past_key_values.")}
        assert pasts == {f"past_key_values.{i}.{kv}" for i in own for kv in ("key", "value")}
    assert spec["check"]["ok"]  # checked on a cached step: 3 past positions, 2 new tokens
    assert (parts / "tokenizer.json").is_file() and (parts / "genai_config.json").is_file()


def test_split_decoder_generates_the_same_tokens_as_one_device(folders):
    from onnxpipe.runtimes.generate import TextGenerator

    whole, parts = folders
    expected = TextGenerator(whole, engine="ort").generate(PROMPT, max_new_tokens=24).tokens
    with TextGenerator(parts, devices="cpu:0,cpu:1") as gen:
        got = gen.generate(PROMPT, max_new_tokens=24)
        again = gen.generate(PROMPT, max_new_tokens=24)  # the caches are reset between prompts
    assert got.tokens == expected and again.tokens == expected
    assert got.engine == "onnxruntime (split)"


def test_split_decoder_cli_and_errors(folders):
    whole, parts = folders
    r = run_cli("generate", str(parts), "--prompt", "def f", "--max-new-tokens", "8", "--devices", "cpu:0,cpu:1", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["tokens"]) >= 1
    r = run_cli("generate", str(parts), "--prompt", "x", "--devices", "cpu:0")
    assert r.returncode == 2 and "2 stages but 1 device" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", str(parts), "--prompt", "x")
    assert r.returncode == 2 and "one device per stage" in r.stderr
    r = run_cli("generate", str(whole), "--prompt", "x", "--devices", "cpu:0,cpu:1")
    assert r.returncode == 2 and "split it first" in r.stderr


@pytest.mark.slow
def test_split_decoder_on_ray_gives_the_same_tokens(folders):
    pytest.importorskip("ray")
    import ray

    from onnxpipe.runtimes.generate import TextGenerator

    whole, parts = folders
    expected = TextGenerator(whole, engine="ort").generate(PROMPT, max_new_tokens=16).tokens
    try:
        with TextGenerator(parts, devices="cpu:0,cpu:1", backend="ray") as gen:
            assert gen.generate(PROMPT, max_new_tokens=16).tokens == expected
    finally:
        ray.shutdown()
