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
    cut = int(round(len(texts) * (1 - HELD_OUT)))
    return texts[:cut], texts[cut:]
