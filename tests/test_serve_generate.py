"""The generate extension: /generate and /generate_stream on a text-generation folder, batched requests."""

from __future__ import annotations

import asyncio
import json

import hf_tiny
import pytest
from conftest import serving

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")

PROMPTS = ["The for statement", "A class definition", "Exceptions are raised", "The import statement",
           "The return statement", "x", "while loops run", "def f():"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    hf_tiny.converted("llama", tmp, dest=tmp / "repo" / "tiny")
    return tmp / "repo"


async def _post(session, url, path, doc):
    async with session.post(url + path, json=doc) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


def test_generate_batched_requests_match_greedy_and_stream(repo):
    aiohttp = pytest.importorskip("aiohttp")
    from onnxpipe.runtimes.generate import TextGenerator

    gen = TextGenerator(repo / "tiny", engine="ort")
    expected = {p: gen.generate(p, max_new_tokens=12).text for p in PROMPTS}

    async def main(url):
        async with aiohttp.ClientSession() as s:
            answers = await asyncio.gather(*[
                _post(s, url, "/v2/models/tiny/generate", {"text_input": p, "parameters": {"max_tokens": 12}})
                for p in PROMPTS])
            for p, (status, _, body) in zip(PROMPTS, answers):
                assert status == 200, body
                doc = json.loads(body)
                assert doc["model_name"] == "tiny" and doc["text_output"] == expected[p], p
            status, ctype, body = await _post(s, url, "/v2/models/tiny/generate_stream",
                                              {"text_input": PROMPTS[0], "parameters": {"max_tokens": 12}})
            assert status == 200 and ctype.startswith("text/event-stream")
            events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
            assert len(events) >= 2
            if "\ufffd" not in expected[PROMPTS[0]]:  # a random model may emit bytes that are no UTF-8 alone
                assert "".join(e["text_output"] for e in events) == expected[PROMPTS[0]]
            seeded = [json.loads((await _post(s, url, "/v2/models/tiny/generate",
                                              {"text_input": "x", "parameters": {"max_tokens": 8, "seed": 5,
                                                                                 "temperature": 1.5}}))[2])
                      for _ in range(2)]
            assert seeded[0] == seeded[1]
            status, _, body = await _post(s, url, "/v2/models/tiny/generate",
                                          {"text_input": "x", "parameters": {"max_tokens": 4, "bogus": 1}})
            assert status == 400 and "bogus" in json.loads(body)["error"]
            status, _, body = await _post(s, url, "/v2/models/nope/generate", {"text_input": "x"})
            assert status == 404
            status, _, body = await _post(s, url, "/v2/models/tiny/generate", {"parameters": {}})
            assert status == 400 and "text_input" in json.loads(body)["error"]

    with serving(repo, "cpu") as (url, _):
        asyncio.run(main(url))
