"""tiny_transformer: a small PyTorch transformer encoder over sklearn's digits read as 64 tokens.

Input ``tokens``: Nx64 int64, each 8x8 image row-major, token id = pixel intensity 0..16 (vocab 17).
Token embedding + learned positional embedding -> 2 pre-LayerNorm encoder layers (d_model 64,
4 heads, GELU MLP 128) -> LayerNorm -> mean over the sequence -> Linear(64 -> 10) logits.

The attention is written out on purpose (Linear q/k/v, split heads, q @ k^T * scale, softmax,
@ v, merge heads, output Linear) so the exported ONNX graph is plain MatMul/Softmax/Transpose
instead of the fused ``nn.MultiheadAttention`` fast path.

``build()`` trains on first use (fixed seed) and caches the state_dict in
``$ONNXPIPE_CACHE_DIR/zoo`` (default ``platformdirs.user_cache_dir("onnxpipe")/zoo``).
Seed 0 reaches ~92 % test accuracy after 8 epochs (~25 s on one CPU thread).
Nothing is printed on stdout.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from onnxpipe_zoo import _common
from onnxpipe_zoo.tiny_transformer import data as _data

log = logging.getLogger("onnxpipe.zoo.tiny_transformer")

NAME = "tiny_transformer"
CODE_VERSION = 1  # bump when the architecture or training loop changes: it is part of the cache key
# pos_std: the learned positional embedding starts at the scale of the token embedding (N(0, 1));
# with the usual 0.02 the model sees a near bag-of-pixels at first and needs ~3x the epochs.
CONFIG = {"code_version": CODE_VERSION, "seed": 0, "epochs": 8, "batch": 32, "lr": 5e-3,
          "weight_decay": 0.01, "d_model": 64, "heads": 4, "ffn": 128, "layers": 2, "pos_std": 1.0,
          "vocab": _data.VOCAB, "seq_len": _data.SEQ_LEN, "split_seed": _common.SPLIT_SEED}
TRAIN_CALLS = 0  # how many times this process trained (the tests check that the cache is reused)


def _net(cfg: dict | None = None):
    import torch
    from torch import nn

    cfg = cfg or CONFIG
    d, h, ffn = cfg["d_model"], cfg["heads"], cfg["ffn"]

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads, self.head_dim = h, d // h
            self.q = nn.Linear(d, d)
            self.k = nn.Linear(d, d)
            self.v = nn.Linear(d, d)
            self.out = nn.Linear(d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, s, _ = x.shape
            q = self.q(x).reshape(n, s, self.heads, self.head_dim).transpose(1, 2)  # N,H,S,Dh
            k = self.k(x).reshape(n, s, self.heads, self.head_dim).transpose(1, 2)
            v = self.v(x).reshape(n, s, self.heads, self.head_dim).transpose(1, 2)
            att = torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim)), dim=-1)
            y = (att @ v).transpose(1, 2).reshape(n, s, d)
            return self.out(y)

    class EncoderLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(d)
            self.attn = SelfAttention()
            self.ln2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class TinyTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(cfg["vocab"], d)
            self.pos = nn.Parameter(torch.zeros(1, cfg["seq_len"], d))
            nn.init.normal_(self.pos, std=cfg["pos_std"])
            self.layers = nn.ModuleList(EncoderLayer() for _ in range(cfg["layers"]))
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, 10)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # the ONNX input is named after `tokens`
            x = self.embed(tokens) + self.pos
            for layer in self.layers:
                x = layer(x)
            return self.head(self.norm(x).mean(dim=1))

    return TinyTransformer()


def train(seed: int = 0, cfg: dict | None = None):
    """Train a fresh model on the TRAIN split (deterministic for a given seed); returns it in eval mode."""
    global TRAIN_CALLS
    import torch

    from onnxpipe_zoo import _torch

    cfg = dict(cfg or CONFIG, seed=seed)
    start = time.perf_counter()
    with _torch.deterministic(seed):
        model = _net(cfg)
        inputs, labels = _data.train_set()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n != "pos"]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n != "pos")]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                 {"params": rest, "weight_decay": 0.0}], lr=cfg["lr"])
        _torch.fit(model, torch.from_numpy(inputs["tokens"]), torch.from_numpy(labels), opt,
                   epochs=cfg["epochs"], batch=cfg["batch"], seed=seed, pct_start=0.2, clip=1.0)
    TRAIN_CALLS += 1
    log.info("trained %s in %.1f s", NAME, time.perf_counter() - start)
    return model.eval()


def cache_file() -> Path:
    """Where the trained state_dict is cached (depends on CONFIG and ``ONNXPIPE_CACHE_DIR``)."""
    return _common.cache_path(NAME, CONFIG, ".pt")


def load_trained():
    """The trained model (eval mode): from the cache, else trained now and cached atomically."""
    from onnxpipe_zoo import _torch

    return _torch.load_or_train(cache_file(), _net, lambda: train(CONFIG["seed"]))


def build():
    """``(model in eval mode, (tokens,))`` with ``tokens`` four TEST sequences, 4x64 int64."""
    import torch

    model = load_trained()
    inputs, _ = _data.evaluation()
    return model, (torch.from_numpy(np.ascontiguousarray(inputs["tokens"][:4])),)
