"""digits_cnn: a small residual PyTorch CNN on sklearn's 8x8 digits (input ``x``: Nx1x8x8 float32 in [0, 1]).

Conv(1->16, 3, pad 1)/BN/ReLU -> residual block (Conv/BN/ReLU, Conv/BN, identity Add, ReLU)
-> Conv(16->32, 3, stride 2, pad 1)/BN/ReLU -> Flatten -> Linear(512 -> 10) logits. ~15k parameters.

``build()`` trains on first use (fixed seed, ~8 s on one CPU thread, ~98 % test accuracy) and
caches the state_dict in ``$ONNXPIPE_CACHE_DIR/zoo`` (default ``platformdirs.user_cache_dir("onnxpipe")/zoo``).
Nothing is printed on stdout.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from onnxpipe_zoo import _common
from onnxpipe_zoo.digits_cnn import data as _data

log = logging.getLogger("onnxpipe.zoo.digits_cnn")

NAME = "digits_cnn"
CODE_VERSION = 1  # bump when the architecture or training loop changes: it is part of the cache key
CONFIG = {"code_version": CODE_VERSION, "seed": 0, "epochs": 8, "batch": 32, "lr": 3e-3,
          "weight_decay": 1e-4, "width": 16, "width2": 32, "split_seed": _common.SPLIT_SEED}
TRAIN_CALLS = 0  # how many times this process trained (the tests check that the cache is reused)


def _net(width: int = 16, width2: int = 32):
    import torch
    from torch import nn

    class ResidualBlock(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + x)

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            self.block = ResidualBlock(width)
            self.down = nn.Sequential(nn.Conv2d(width, width2, 3, stride=2, padding=1, bias=False),
                                      nn.BatchNorm2d(width2), nn.ReLU())
            self.head = nn.Linear(width2 * 4 * 4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # the ONNX input is named after `x`
            return self.head(torch.flatten(self.down(self.block(self.stem(x))), 1))

    return DigitsCNN()


def train(seed: int = 0):
    """Train a fresh model on the TRAIN split (deterministic for a given seed); returns it in eval mode."""
    global TRAIN_CALLS
    import torch

    from onnxpipe_zoo import _torch

    cfg = dict(CONFIG, seed=seed)
    start = time.perf_counter()
    with _torch.deterministic(seed):
        model = _net(cfg["width"], cfg["width2"])
        inputs, labels = _data.train_set()
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        _torch.fit(model, torch.from_numpy(inputs["x"]), torch.from_numpy(labels), opt,
                   epochs=cfg["epochs"], batch=cfg["batch"], seed=seed)
    TRAIN_CALLS += 1
    log.info("trained %s in %.1f s", NAME, time.perf_counter() - start)
    return model.eval()


def cache_file() -> Path:
    """Where the trained state_dict is cached (depends on CONFIG and ``ONNXPIPE_CACHE_DIR``)."""
    return _common.cache_path(NAME, CONFIG, ".pt")


def load_trained():
    """The trained model (eval mode): from the cache, else trained now and cached atomically."""
    from onnxpipe_zoo import _torch

    return _torch.load_or_train(cache_file(), lambda: _net(CONFIG["width"], CONFIG["width2"]),
                                lambda: train(CONFIG["seed"]))


def build():
    """``(model in eval mode, (x,))`` with ``x`` four TEST images, 4x1x8x8 float32."""
    import torch

    model = load_trained()
    inputs, _ = _data.evaluation()
    return model, (torch.from_numpy(np.ascontiguousarray(inputs["x"][:4])),)
