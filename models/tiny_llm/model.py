"""tiny_llm: a small Llama-style decoder and its byte-level BPE tokenizer, trained on pydoc topics.

Python's documentation topics (``pydoc_data.topics``, offline) train a 512-token byte-level BPE
tokenizer (``tokenizers``) and a 4-layer Llama (hidden 128, 4 heads over 2 KV heads: grouped-query
attention, rotary positions, tied embeddings, ~0.85M parameters) for a minute on one thread, so
that generation is not noise and perplexity means something.

``folder()`` trains on first use and caches a ``save_pretrained`` folder (model, tokenizer,
generation config) under ``$ONNXPIPE_CACHE_DIR/zoo`` (default ``platformdirs.user_cache_dir
("onnxpipe")/zoo``), named by a hash of the config; later calls return it. Convert it with
``onnxpipe convert $(python -c 'import ...; print(folder())') --task text-generation -o out``.
``build()`` returns ``(model, (input_ids,))`` for ``onnxpipe convert models/tiny_llm/model.py:build``
(logits only, no cache). Nothing is printed on stdout.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxpipe_zoo import _common
from onnxpipe_zoo.tiny_llm import data as _data

log = logging.getLogger("onnxpipe.zoo.tiny_llm")

NAME = "tiny_llm"
CODE_VERSION = 1  # bump when the architecture, tokenizer or training changes: it is part of the cache key
CONFIG = {"code_version": CODE_VERSION, "seed": 0, "vocab": 512, "hidden": 128, "ffn": 384, "layers": 4,
          "heads": 4, "kv_heads": 2, "context": 512, "seq_len": 128, "batch": 12, "steps": 200, "lr": 3e-3,
          "weight_decay": 0.01, "held_out": _data.HELD_OUT}
TRAIN_CALLS = 0  # how many times this process trained (the tests check that the cache is reused)
MARKER = "onnxpipe-zoo.txt"  # written last into the folder: a folder without it is incomplete


def cache_folder() -> Path:
    """Where the trained ``save_pretrained`` folder lives (it may not exist yet)."""
    return _common.cache_dir() / f"{NAME}-{_common.config_hash(CONFIG)}"


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` as id 0 (BOS, EOS and pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[_data.EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=_data.EOS, bos_token=_data.EOS,
                                   pad_token=_data.EOS)


def encode(tokenizer, texts: list[str]) -> np.ndarray:
    """Every text's ids followed by EOS, concatenated: one int64 stream."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [eos]
    return np.asarray(ids, dtype=np.int64)


def _config(cfg: dict):
    from transformers import GenerationConfig, LlamaConfig

    model_cfg = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["ffn"],
                            num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                            num_key_value_heads=cfg["kv_heads"], max_position_embeddings=cfg["context"],
                            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return model_cfg, GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=False)


def train(cfg: dict | None = None):
    """Train tokenizer and model from scratch: ``(model in eval mode, tokenizer, generation config)``."""
    global TRAIN_CALLS
    import torch
    from transformers import LlamaForCausalLM

    from onnxpipe_zoo import _torch

    cfg = cfg or CONFIG
    TRAIN_CALLS += 1
    start = time.perf_counter()
    train_texts, _ = _data.split()
    tokenizer = train_tokenizer(train_texts, cfg["vocab"])
    stream = torch.from_numpy(encode(tokenizer, train_texts))
    model_cfg, gen_cfg = _config(cfg)
    with _torch.deterministic(cfg["seed"]):
        model = LlamaForCausalLM(model_cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=cfg["steps"], pct_start=0.1)
        gen = torch.Generator().manual_seed(cfg["seed"])
        n, b = cfg["seq_len"] + 1, cfg["batch"]
        model.train()
        for _ in range(cfg["steps"]):
            starts = torch.randint(0, len(stream) - n, (b,), generator=gen)
            x = torch.stack([stream[s:s + n] for s in starts.tolist()])
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    log.info("tiny_llm trained in %.1fs (last loss %.3f)", time.perf_counter() - start, loss.item())
    return model.eval(), tokenizer, gen_cfg


def folder() -> Path:
    """The trained model's ``save_pretrained`` folder, training and caching it on first use."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    final = cache_folder()
    if (final / MARKER).is_file():
        return final
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model, tokenizer, gen_cfg = train()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        gen_cfg.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(f"{NAME} config hash {_common.config_hash(CONFIG)}\n")
        if final.exists():  # an incomplete folder from an interrupted run
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_trained():
    """``(LlamaForCausalLM in eval mode, tokenizer)`` from the cached folder (trained on first use)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = folder()
    return LlamaForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def perplexity(model=None, tokenizer=None, *, max_tokens: int = 4096) -> float:
    """Perplexity of the model on the held-out topics (first ``max_tokens`` tokens, windows of the training length)."""
    import torch

    if model is None or tokenizer is None:
        model, tokenizer = load_trained()
    _, held = _data.split()
    ids = torch.from_numpy(encode(tokenizer, held)[:max_tokens])
    n = CONFIG["seq_len"]
    losses, counts = [], []
    with torch.no_grad():
        for i in range(0, len(ids) - 1, n):
            chunk = ids[i:i + n + 1]
            if len(chunk) < 2:
                break
            out = model(input_ids=chunk[None, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits[0], chunk[1:], reduction="sum")
            losses.append(float(loss))
            counts.append(len(chunk) - 1)
    return float(np.exp(sum(losses) / sum(counts)))


def build():
    """``(module returning logits, (input_ids 1x16,))`` for ``onnxpipe convert models/tiny_llm/model.py:build``."""
    import torch

    model, tokenizer = load_trained()

    class Logits(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, use_cache=False).logits

    ids = tokenizer(_data.PROMPTS[0], return_tensors="pt")["input_ids"]
    return Logits(model).eval(), (ids,)
