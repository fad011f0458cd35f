"""Perplexity of a causal language model: token windows from text or arrays, scored window by window.

The data comes as a text file (tokenized with the tokenizer.json of the model's folder, cut into
windows of the model's context) or as token-id arrays (``.npz`` with ``input_ids`` of shape
[windows, tokens]). The score is ``exp(mean negative log-likelihood)`` of every next token, lower
is better. Logits are reduced batch by batch, so a large vocabulary never holds every window's
logits in memory at once.

Example:
    >>> ids = np.array([[1, 2, 1, 2]])
    >>> logits = np.zeros((1, 4, 3), np.float32)
    >>> round(perplexity([logits], ids), 3)  # uniform over 3 tokens
    3.0
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxpipe.core.errors import InputError
from onnxpipe.core.tensors import TensorInfo

TEXT_SUFFIXES = (".txt", ".text", ".md")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
IGNORE = -100  # label value that is not scored (the Hugging Face convention)
WINDOWS_PER_RUN = 4


def nll_sum(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods and the number of tokens scored.

    ``logits`` [batch, tokens, vocab] predicts ``labels`` [batch, tokens] shifted by one: the
    logits at position t score the label at t + 1. Labels equal to -100 are skipped.
    """
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels).reshape(logits.shape[:-1])
    pred, target = logits[:, :-1].astype(np.float64), labels[:, 1:].astype(np.int64)
    keep = target != IGNORE
    if not keep.any():
        return 0.0, 0
    top = pred.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(pred - top).sum(axis=-1)) + top[..., 0]
    picked = np.take_along_axis(pred, np.where(keep, target, 0)[..., None], axis=-1)[..., 0]
    return float(((log_z - picked) * keep).sum()), int(keep.sum())


def perplexity(outputs: Sequence[np.ndarray], labels: np.ndarray) -> float:
    """The metric form ``(outputs, labels) -> float``: the first output holds the logits."""
    total, count = nll_sum(outputs[0], labels)
    return math.exp(total / count) if count else math.nan


def _logits_name(names: Sequence[str]) -> str:
    return next((n for n in names if "logits" in n.lower()), names[0])


def _fill(info: TensorInfo, ids: np.ndarray) -> np.ndarray:
    """A value for an input the token windows do not give: masks, positions, an empty KV cache."""
    batch, tokens = ids.shape
    name = info.name.lower()
    if "mask" in name:
        return np.ones((batch, tokens), dtype=info.dtype)
    if "position" in name:
        return np.broadcast_to(np.arange(tokens, dtype=info.dtype), (batch, tokens)).copy()
    if ("past" in name or "cache" in name) and info.shape is not None:
        # [batch, heads, past tokens, head dim]: fixed dims as exported, the batch, no past tokens
        shape = [d if isinstance(d, int) and d > 0 else (batch if axis == 0 else 0)
                 for axis, d in enumerate(info.shape)]
        return np.zeros(shape, dtype=info.dtype)
    raise InputError(f"perplexity: cannot make a value for input {info.name!r} ({info.dtype} {info.shape_str()})",
                     hint="evaluate on a model whose inputs are input_ids (+ attention_mask, position_ids, "
                          "past key values), or give every input in a .npz")


def evaluate_model(model: onnx.ModelProto | str | os.PathLike, inputs: Mapping[str, np.ndarray],
                   labels: np.ndarray, *, windows_per_run: int = WINDOWS_PER_RUN) -> float:
    """Perplexity of ``model`` on token windows, a few windows per run (logits never all in memory).

    ``inputs`` holds ``input_ids`` [windows, tokens] and optionally any other input; masks,
    positions and an empty KV cache are filled in for inputs it lacks.
    """
    from onnxpipe.core.session import Session

    ids = np.asarray(inputs.get("input_ids", next(iter(inputs.values()))))
    total, count = 0.0, 0
    with Session(model) as s:
        logits = _logits_name(s.output_names)
        for start in range(0, len(ids), windows_per_run):
            chunk = ids[start:start + windows_per_run]
            feeds = {}
            for info in s.inputs:
                given = inputs.get(info.name)
                if info.name == "input_ids" or (given is None and np.issubdtype(info.dtype, np.integer)
                                                and "id" in info.name.lower() and "position" not in info.name):
                    feeds[info.name] = chunk.astype(info.dtype)
                elif given is not None:
                    feeds[info.name] = np.asarray(given)[start:start + windows_per_run]
                else:
                    feeds[info.name] = _fill(info, chunk)
            out = s.run(feeds, [logits])[logits]
            t, c = nll_sum(out, np.asarray(labels)[start:start + windows_per_run])
            total, count = total + t, count + c
    return math.exp(total / count) if count else math.nan


# the pipeline and the passes read these: perplexity is lower-is-better and streams its batches
perplexity.higher_is_better = False  # type: ignore[attr-defined]
perplexity.evaluate_model = evaluate_model  # type: ignore[attr-defined]


def model_folder(model: str | os.PathLike | None) -> Path | None:
    """The folder holding the model's tokenizer and config: the model's own folder, or the model if a folder."""
    if model is None:
        return None
    text = str(model).partition(".py:")[0]
    p = Path(text + (".py" if ".py:" in str(model) else ""))
    return p if p.is_dir() else p.parent


def find_tokenizer(folder: Path | None) -> Path:
    """tokenizer.json in the model's folder (or the folder above, for a model in a subfolder)."""
    for d in ([folder, folder.parent] if folder is not None else []):
        if (d / "tokenizer.json").is_file():
            return d / "tokenizer.json"
    raise InputError(f"perplexity on text needs the model's tokenizer: no tokenizer.json in {folder}",
                     hint="save the tokenizer (tokenizer.save_pretrained) beside the model, "
                          "or give token ids as a .npz with input_ids")


def model_context(folder: Path | None, default: int = 512) -> int:
    """The model's context length from config.json in its folder (``max_position_embeddings`` ...)."""
    for d in ([folder, folder.parent] if folder is not None else []):
        cfg = d / "config.json"
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
            except (OSError, ValueError):
                continue
            for key in CONTEXT_KEYS:
                if isinstance(data.get(key), int) and data[key] > 1:
                    return int(data[key])
    return default


def text_windows(path: str | os.PathLike, model: str | os.PathLike | None, *,
                 context: int | None = None, max_windows: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({"input_ids": [windows, context]}, labels)`` from a text file, tokenized with the model's tokenizer.

    The text is encoded whole and cut into consecutive windows of the model's context (from its
    config.json, else 512 tokens); the tail shorter than a window is dropped unless it is all there is.
    """
    from onnxpipe.core.deps import require

    require("tokenizers")
    from tokenizers import Tokenizer

    path = Path(path)
    folder = model_folder(model)
    tok_path = find_tokenizer(folder)
    try:
        tokenizer = Tokenizer.from_file(str(tok_path))
    except Exception as exc:  # noqa: BLE001 - a corrupt tokenizer file is the user's to fix
        raise InputError(f"cannot read tokenizer {tok_path}: {str(exc).splitlines()[0]}",
                         hint="save it again with tokenizer.save") from exc
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read evaluation text {path}: {exc}", hint="give a UTF-8 text file") from exc
    ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)
    n = context or model_context(folder)
    if len(ids) < 2:
        raise InputError(f"evaluation text {path} has {len(ids)} token(s): nothing to score",
                         hint="give a longer text")
    if len(ids) < n:
        windows = ids[None, :]
    else:
        windows = ids[: len(ids) // n * n].reshape(-1, n)
    if max_windows is not None:
        windows = windows[:max_windows]
    return {"input_ids": windows}, windows.copy()


def token_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``(inputs, labels)`` from token-id arrays: ``input_ids`` (or ``tokens``), labels = the ids unless given."""
    ids = arrays.get("input_ids", arrays.get("tokens"))
    if ids is None or ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError("token-id arrays need an integer 'input_ids' of shape [windows, tokens]",
                         hint="np.savez(path, input_ids=ids)")
    inputs = {k: v for k, v in arrays.items() if k not in ("labels", "tokens")}
    inputs["input_ids"] = ids.astype(np.int64)
    labels = arrays["labels"] if "labels" in arrays else ids.astype(np.int64)
    return inputs, np.asarray(labels)
