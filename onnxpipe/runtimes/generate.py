"""Text generation with a converted decoder folder: onnxruntime-genai first, an own ORT loop beside it.

The folder is what ``onnxpipe convert DIR --task text-generation`` writes: ``model.onnx`` with a
flat KV cache, ``genai_config.json``, the tokenizer files and the generation config.

Two engines, one interface (:class:`TextGenerator`):

- ``genai``: onnxruntime-genai (``og.Model`` / ``og.Generator``). It keeps the KV cache, samples
  (greedy, temperature, top-k, top-p, seed), stops at EOS and is what the ecosystem runs. The
  default wherever it is installed and loads the folder.
- ``ort``: an own loop over one ONNX Runtime session: the prompt runs once with an empty past,
  each next token runs alone with the presents bound as the next pasts (IO binding, so the cache
  stays in ORT's buffers between steps). Used where onnxruntime-genai is missing or refuses the
  folder, and as the reference the engines are measured against (``benchmarks/generate.py``).

Example:
    >>> from onnxpipe.runtimes.generate import generate
    >>> out = generate("tiny_llm_onnx", "The for statement", max_new_tokens=16)  # doctest: +SKIP
    >>> out.text  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.core.errors import InputError
from onnxpipe.runtimes.generate_engines import (  # Sampling: the engines' input, imported from here by users
    MODEL_FILE,
    GenaiEngine,
    OrtEngine,
    Sampling,
    SplitDecoderEngine,
    choose_token,
)

ENGINES = ("auto", "genai", "ort")


@dataclass
class Generation:
    """One generated continuation with its timings."""

    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    prefill_s: float
    decode_s: float
    engine: str
    finish_reason: str  # "eos" or "length"
    token_times: list[float] = field(default_factory=list, repr=False)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first one, per second of decoding (the first comes out of the prefill)."""
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "tokens": self.tokens, "text": self.text,
                "timings": {"prefill_s": round(self.prefill_s, 6),
                            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3)},
                "engine": self.engine, "finish_reason": self.finish_reason}


def read_folder(path: str | os.PathLike) -> dict[str, Any]:
    """Check a decoder folder and return its ``genai_config.json``; a wrong folder is a one-line error."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"no such folder: {folder}",
                         hint="give the folder written by onnxpipe convert DIR --task text-generation -o FOLDER")
    split = (folder / "pipeline.json").is_file()  # a decoder split between layers by onnxpipe split
    if not ((folder / MODEL_FILE).is_file() or split) or not (folder / "genai_config.json").is_file():
        raise InputError(f"{folder} is not a text-generation folder (it needs {MODEL_FILE} and genai_config.json)",
                         hint="write one with onnxpipe convert DIR --task text-generation -o FOLDER")
    try:
        return json.loads((folder / "genai_config.json").read_text())
    except ValueError as exc:
        raise InputError(f"cannot read {folder / 'genai_config.json'}: {exc}", hint="convert the model again") from exc


class TextGenerator:
    """A decoder folder loaded once, generating any number of times.

    Args:
        path: the folder ``onnxpipe convert --task text-generation`` wrote.
        engine: ``auto`` (onnxruntime-genai where it loads the folder, else ``ort``), ``genai`` or ``ort``.
        threads: intra-op threads (None lets ONNX Runtime decide).
    """

    def __init__(self, path: str | os.PathLike, *, engine: str = "auto", threads: int | None = None,
                 devices: Any = None, backend: str = "local", address: str | None = None) -> None:
        if engine not in ENGINES:
            raise InputError(f"unknown engine {engine!r}", hint=f"use one of {', '.join(ENGINES)}")
        self.path = Path(path)
        self.config = read_folder(self.path)
        model_cfg = self.config["model"]
        eos = model_cfg.get("eos_token_id", [])
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.vocab_size = int(model_cfg.get("vocab_size", 0))
        self.context_length = int(model_cfg.get("context_length", 0) or 0)
        self.threads = threads
        self.why_not_genai = ""
        self._impl: GenaiEngine | OrtEngine
        if (self.path / "pipeline.json").is_file():  # split between layers: one stage per device
            if engine not in ("auto", "ort"):
                raise InputError(f"{self.path} is a split decoder: onnxruntime-genai cannot run it",
                                 hint="leave --engine at auto; the stages run on onnxpipe's own loop")
            self._impl = SplitDecoderEngine(self.path, self.config, devices, backend, threads, address)
        elif devices is not None and len(str(devices).split(",")) > 1:
            raise InputError(f"{self.path} is one decoder: several devices need a split folder",
                             hint=f"split it first: onnxpipe split {self.path} --parts 2 -o PARTS")
        elif engine in ("auto", "genai"):
            try:
                self._impl = GenaiEngine(self.path, self.config, threads)
            except Exception as exc:
                if engine == "genai":
                    raise InputError(f"onnxruntime-genai cannot run {self.path}: {str(exc).strip()}",
                                     hint="pip install onnxruntime-genai, or use --engine ort") from exc
                self.why_not_genai = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self._impl = OrtEngine(self.path, self.config, threads)
        else:
            self._impl = OrtEngine(self.path, self.config, threads)
        self.engine = self._impl.name

    def encode(self, text: str) -> list[int]:
        return self._impl.encode(text)

    def close(self) -> None:
        """Stop what the engine started (a split decoder's stage workers); nothing otherwise."""
        close = getattr(self._impl, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> TextGenerator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def decode(self, tokens: list[int]) -> str:
        return self._impl.decode(tokens)

    def generate(self, prompt: str | list[int], *, max_new_tokens: int = 64, sampling: Sampling | None = None,
                 on_text: Callable[[str], None] | None = None, min_new_tokens: int = 0,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """Continue ``prompt`` (text or token ids) by up to ``max_new_tokens``, stopping at EOS.

        ``on_text`` receives each new piece of text as soon as its token is chosen (streaming).
        ``on_token`` receives each token id (EOS included) as it is chosen.
        ``min_new_tokens`` forbids EOS before that many tokens (as transformers does), e.g. to
        time a fixed number of steps.
        """
        sampling = sampling or Sampling()
        sampling.validate()
        if max_new_tokens < 1:
            raise InputError(f"max-new-tokens must be >= 1, got {max_new_tokens}", hint="e.g. --max-new-tokens 32")
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise InputError("the prompt encodes to no tokens", hint="give a non-empty --prompt")
        if self.context_length and len(ids) + max_new_tokens > self.context_length:
            raise InputError(f"prompt ({len(ids)} tokens) + max-new-tokens ({max_new_tokens}) exceed the model's "
                             f"context of {self.context_length}", hint="shorten the prompt or lower --max-new-tokens")
        start = time.perf_counter()
        tokens: list[int] = []
        times: list[float] = []
        finish = "length"
        stream = TextStream(self.decode)
        for token in self._impl.tokens(ids, max_new_tokens, sampling, min(min_new_tokens, max_new_tokens)):
            times.append(time.perf_counter() - start)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in self.eos_ids:
                finish = "eos"
                break
            if on_text is not None:
                on_text(stream(token))
            if len(tokens) >= max_new_tokens:
                break
        text_tokens = tokens[:-1] if finish == "eos" else tokens
        text = self.decode(text_tokens)
        if on_text is not None:
            on_text(stream.flush(text))
        prefill = times[0] if times else 0.0
        decode = (times[-1] - times[0]) if len(times) > 1 else 0.0
        return Generation(ids, tokens, text, prefill, decode, self.engine, finish, times)


def generate(path: str | os.PathLike, prompt: str | list[int], *, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, engine: str = "auto", threads: int | None = None,
             on_text: Callable[[str], None] | None = None, devices: Any = None,
             backend: str = "local", address: str | None = None) -> Generation:
    """Load the decoder folder ``path`` and continue ``prompt``; see :class:`TextGenerator`.

    Example:
        >>> import onnxpipe
        >>> onnxpipe.generate("tiny_llm_onnx", "A class definition", max_new_tokens=8).text  # doctest: +SKIP
    """
    gen = TextGenerator(path, engine=engine, threads=threads, devices=devices, backend=backend, address=address)
    try:
        return gen.generate(prompt, max_new_tokens=max_new_tokens, on_text=on_text,
                            sampling=Sampling(do_sample, temperature, top_k, top_p, seed))
    finally:
        gen.close()


class TextStream:
    """New text per token: decodes everything so far and hands out what was not handed out yet.

    A byte-level token can end inside a UTF-8 character; such a tail decodes to U+FFFD and is held
    back until the next token completes it (or :meth:`flush` at the end).
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._sent = ""

    def __call__(self, token: int) -> str:
        self._tokens.append(token)
        text = self._decode(self._tokens)
        if text.endswith("\ufffd") or not text.startswith(self._sent):
            return ""
        new, self._sent = text[len(self._sent):], text
        return new

    def flush(self, text: str) -> str:
        new = text[len(self._sent):] if text.startswith(self._sent) else ""
        self._sent = text
        return new



class BatchDecoder:
    """Several prompts decoded together in one ORT session: left-padded, one step for all rows.

    What a server needs to serve concurrent requests together: a batch of B rows costs little
    more than one row on a small decoder. Prompts are left-padded (``attention_mask`` 0, pads
    at position 1 as transformers does); each row stops at its own EOS or ``max_new`` and its
    tokens go to ``on_token(row, token)`` as they come; finished rows are dropped from the batch.

    Example:
        >>> BatchDecoder("tiny_llm_onnx").run([[5, 6], [7]], [8, 8], on_token=print)  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        folder = Path(path)
        self.engine = OrtEngine(folder, read_folder(folder), threads)

    def run(self, prompts: list[list[int]], max_new: list[int], *, on_token: Callable[[int, int], None],
            samplings: list[Sampling] | None = None) -> list[list[int]]:
        """Decode every prompt; returns each row's new tokens (EOS included where it came)."""
        e = self.engine
        n = len(prompts)
        samplings = samplings or [Sampling() for _ in prompts]
        rngs = [np.random.default_rng(sp.seed) for sp in samplings]
        width = max(len(p) for p in prompts)
        ids = np.zeros((n, width), np.int64)
        mask = np.zeros((n, width), np.int64)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        pos = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
        past = [np.zeros((n, e.kv_heads, 0, e.head_size), np.float32) for _ in e.past]
        rows = list(range(n))  # batch row -> request index
        out: list[list[int]] = [[] for _ in prompts]
        while rows:
            feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **dict(zip(e.past, past))}
            logits, *present = e.session.run(None, feeds)
            keep, next_ids = [], []
            for b, req in enumerate(rows):
                token = choose_token(logits[b, -1], samplings[req], rngs[req])
                out[req].append(token)
                on_token(req, token)
                if token not in e.eos_ids and len(out[req]) < max_new[req]:
                    keep.append(b)
                    next_ids.append(token)
            if not keep:
                break
            idx = np.asarray(keep)
            rows = [rows[b] for b in keep]
            mask = np.concatenate([mask[idx], np.ones((len(keep), 1), np.int64)], axis=1)
            pos = pos[idx, -1:] + 1
            ids = np.asarray(next_ids, np.int64)[:, None]
            past = [p[idx] for p in present]
        return out
