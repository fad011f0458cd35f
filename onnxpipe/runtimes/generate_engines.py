"""The engines behind :class:`onnxpipe.runtimes.generate.TextGenerator`: one per way a decoder folder runs.

- :class:`GenaiEngine`: onnxruntime-genai keeps the cache and samples.
- :class:`OrtEngine`: onnxpipe's own loop over one ONNX Runtime session, the cache bound between steps.
- :class:`SplitDecoderEngine`: the own loop over a decoder split between layers, one stage per device.

Each has ``encode``, ``decode`` and ``tokens(ids, max_new, sampling, min_new)``; the own loops share
the folder's tokenizer and :func:`choose_token`. :class:`Sampling` (how the next token is chosen)
lives here with them; users import it from ``generate``. Split out of ``generate`` so that module reads as
the public interface (TextGenerator, generate, Sampling, Generation, BatchDecoder).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.core.deps import require
from onnxpipe.core.errors import InputError

MODEL_FILE = "model.onnx"


@dataclass
class Sampling:
    """How the next token is chosen: greedy unless ``do_sample``.

    Attributes:
        do_sample: sample from the (tempered, truncated) distribution instead of taking the argmax.
        temperature: divides the logits before sampling (> 0).
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the smallest set whose probability reaches p (1.0: all).
        seed: seed of the sampler; None draws one.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature:g}", hint="use e.g. --temperature 0.8")
        if self.top_k < 0:
            raise InputError(f"top-k must be >= 0, got {self.top_k}", hint="0 keeps every token")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top-p must be in (0, 1], got {self.top_p:g}", hint="1.0 keeps every token")


class GenaiEngine:
    name = "onnxruntime-genai"

    def __init__(self, path: Path, config: dict[str, Any], threads: int | None) -> None:
        og = require("onnxruntime_genai")
        self.vocab_size = int(config["model"].get("vocab_size") or 1 << 20)
        config = og.Config(str(path))
        config.clear_providers()
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
        self._og = og
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(np.asarray(tokens, dtype=np.int32)) if tokens else ""

    def tokens(self, ids: list[int], max_new: int, s: Sampling, min_new: int) -> Iterator[int]:
        og = self._og
        params = og.GeneratorParams(self.model)
        options: dict[str, Any] = {"max_length": len(ids) + max_new, "do_sample": s.do_sample,
                                   "min_length": len(ids) + min_new}
        if s.do_sample:
            options.update(temperature=float(s.temperature), top_p=float(s.top_p))
            if s.top_k:
                options["top_k"] = int(s.top_k)
            else:
                options["top_k"] = self.vocab_size  # genai's default would cut to 50; 0 means "all" here
            options["random_seed"] = int(s.seed) if s.seed is not None else int(np.random.SeedSequence().entropy % (1 << 31))
        else:
            options.update(top_k=1)
        params.set_search_options(**options)
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])


class OwnLoop:
    """What onnxpipe's own loops share: the folder's tokenizer, its EOS ids, how a token is picked."""

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        self.tokenizer = hf_tokenizer(path)
        eos = config["model"].get("eos_token_id", [])
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def pick(self, logits: np.ndarray, step: int, min_new: int, s: Sampling, rng: np.random.Generator) -> int:
        """The next token from the last position's logits; EOS is forbidden before ``min_new`` tokens."""
        if step < min_new and self.eos_ids:
            logits = logits.copy()
            logits[sorted(self.eos_ids)] = -np.inf
        return choose_token(logits, s, rng)


class OrtEngine(OwnLoop):
    name = "onnxruntime"

    def __init__(self, path: Path, config: dict[str, Any], threads: int | None) -> None:
        super().__init__(path, config)
        ort = require("onnxruntime")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
        dec = config["model"]["decoder"]
        self.layers = int(dec["num_hidden_layers"])
        self.kv_heads = int(dec["num_key_value_heads"])
        self.head_size = int(dec["head_size"])
        self.past = [n for i in range(self.layers) for n in (f"past_key_values.{i}.key", f"past_key_values.{i}.value")]
        self.present = [n for i in range(self.layers) for n in (f"present.{i}.key", f"present.{i}.value")]

    def tokens(self, ids: list[int], max_new: int, s: Sampling, min_new: int) -> Iterator[int]:
        rng = np.random.default_rng(s.seed)
        binding = self.session.io_binding()
        n = len(ids)
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None]}
        empty = np.zeros((1, self.kv_heads, 0, self.head_size), np.float32)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in self.past:
            binding.bind_cpu_input(name, empty)
        for name in ["logits", *self.present]:
            binding.bind_output(name, "cpu")
        total = n
        for step in range(max_new):
            self.session.run_with_iobinding(binding)
            outputs = binding.get_outputs()
            token = self.pick(outputs[0].numpy()[0, -1], step, min_new, s, rng)
            yield token
            total += 1
            binding = self.session.io_binding()
            binding.bind_cpu_input("input_ids", np.asarray([[token]], np.int64))
            binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
            binding.bind_cpu_input("position_ids", np.asarray([[total - 1]], np.int64))
            for name, value in zip(self.past, outputs[1:]):
                binding.bind_ortvalue_input(name, value)  # the cache stays in ORT's buffers
            for name in ["logits", *self.present]:
                binding.bind_output(name, "cpu")


class SplitDecoderEngine(OwnLoop):
    """The own loop over a decoder split between layers: each stage and its cache on its device."""

    name = "onnxruntime (split)"

    def __init__(self, path: Path, config: dict[str, Any], devices: Any, backend: str, threads: int | None,
                 address: str | None) -> None:
        from onnxpipe.runtimes.generate_split import SplitEngine

        if devices is None:
            raise InputError(f"{path} is a split decoder: give one device per stage",
                             hint="e.g. --devices cpu:0,cpu:1")
        super().__init__(path, config)
        self.split = SplitEngine(path, devices, backend=backend, threads=threads, address=address)

    def tokens(self, ids: list[int], max_new: int, s: Sampling, min_new: int) -> Iterator[int]:
        rng = np.random.default_rng(s.seed)
        self.split.reset(1)
        n = len(ids)
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None]}
        for step in range(max_new):
            logits = self.split.step({k: v for k, v in feeds.items() if k in self.split.inputs})[0, -1]
            token = self.pick(logits, step, min_new, s, rng)
            yield token
            n += 1
            feeds = {"input_ids": np.asarray([[token]], np.int64), "attention_mask": np.ones((1, n), np.int64),
                     "position_ids": np.asarray([[n - 1]], np.int64)}

    def close(self) -> None:
        self.split.close()


def hf_tokenizer(path: Path) -> Any:
    tokenizers = require("tokenizers")
    file = path / "tokenizer.json"
    if not file.is_file():
        raise InputError(f"{path} has no tokenizer.json", hint="convert a folder that holds its tokenizer")
    return tokenizers.Tokenizer.from_file(str(file))


def choose_token(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """Greedy argmax, or a sample after temperature, top-k and top-p."""
    if not s.do_sample:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / s.temperature
    if s.top_k and s.top_k < x.size:
        cut = np.partition(x, -s.top_k)[-s.top_k]
        x = np.where(x < cut, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < s.top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))
