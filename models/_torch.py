"""Training and caching shared by the zoo's PyTorch models (imported only where torch is wanted)."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from onnxpipe_zoo import _common

log = logging.getLogger("onnxpipe.zoo")


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seeded, deterministic, one-thread training; the caller's torch settings come back afterwards.

    One thread: tiny batches gain nothing from more (on a 2-vCPU VM two threads were 1.5-10x
    slower), and the float sums then run in the same order everywhere: the same weights.
    """
    was_deterministic, was_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        np.random.seed(seed)
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(was_threads)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, *, epochs: int,
        batch: int, seed: int, pct_start: float = 0.3, clip: float | None = None) -> nn.Module:
    """Cross-entropy training with a one-cycle schedule over shuffled mini-batches; returns eval mode."""
    steps = epochs * -(-len(x) // batch)
    lr = max(g["lr"] for g in opt.param_groups)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
    return model.eval()


def load_or_train(path: Path, fresh: Callable[[], nn.Module], train: Callable[[], nn.Module]) -> nn.Module:
    """The cached weights in ``fresh()``'s architecture, else ``train()`` and cache it atomically."""
    if path.is_file():
        model = fresh()
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception as exc:  # a corrupt or stale file: retrain and overwrite it
            log.warning("ignoring unreadable cache %s (%s)", path, exc)
    model = train()
    with _common.atomic_target(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model
