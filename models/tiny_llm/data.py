"""tiny_llm's text: Python's own documentation topics (``pydoc_data.topics``), shipped offline.

stdlib only (no torch, no transformers), so ONNX-only steps can use the prompts.
"""
from __future__ import annotations

EOS = "<|endoftext|>"
HELD_OUT = 0.1  # the last 10 % of the topics (sorted by name) are never trained on: perplexity is measured there

PROMPTS = ("The for statement is used to", "A class definition", "The return statement",
           "Exceptions are raised", "The import statement")


def topics() -> list[tuple[str, str]]:
    """``(name, text)`` of every pydoc topic, sorted by name (79 topics, ~465k characters)."""
    from pydoc_data.topics import topics as _topics

    return sorted(_topics.items())


def split() -> tuple[list[str], list[str]]:
    """``(train texts, held-out texts)``: a fixed split by topic."""
    texts = [t for _, t in topics()]
    cut = round(len(texts) * (1 - HELD_OUT))
    return texts[:cut], texts[cut:]


def decoder_feeds(n: int = 4, seed: int = 0) -> list[dict]:
    """Input dicts for the converted decoder (``model.onnx`` of a text-generation folder): half
    prompts with an empty cache, half single-token steps after a filled one, shapes consistent.

    For the pipeline's before/after checks of passes on the decoder, whose random inputs could not
    agree on the sequence lengths. numpy only; the geometry comes from ``model.CONFIG``.
    """
    import numpy as np

    from onnxpipe_zoo.tiny_llm.model import CONFIG

    rng = np.random.default_rng(seed)
    layers, heads, size = CONFIG["layers"], CONFIG["kv_heads"], CONFIG["hidden"] // CONFIG["heads"]
    feeds = []
    for i in range(n):
        past, new = (0, 16) if i % 2 == 0 else (24, 1)
        d = {"input_ids": rng.integers(1, CONFIG["vocab"], size=(1, new), dtype=np.int64),
             "attention_mask": np.ones((1, past + new), np.int64),
             "position_ids": np.arange(past, past + new, dtype=np.int64)[None]}
        for layer in range(layers):
            for kv in ("key", "value"):
                d[f"past_key_values.{layer}.{kv}"] = rng.standard_normal((1, heads, past, size)).astype(np.float32)
        feeds.append(d)
    return feeds


def held_out_windows(max_tokens: int = 4096, context: int = 128):
    """``({"input_ids": [windows, context]}, labels)``: the held-out topics tokenized with tiny_llm's
    tokenizer, for ``metric: perplexity`` (the decoder's cache is filled in empty)."""
    import numpy as np
    from tokenizers import Tokenizer

    from onnxpipe_zoo.tiny_llm.model import folder

    tok = Tokenizer.from_file(str(folder() / "tokenizer.json"))
    _, held = split()
    ids = np.asarray(tok.encode("\n".join(held)).ids[:max_tokens], dtype=np.int64)
    windows = ids[: len(ids) // context * context].reshape(-1, context)
    return {"input_ids": windows}, windows.copy()
