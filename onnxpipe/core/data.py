"""Calibration and evaluation data from a recipe: a Python function, a .npz, or a directory."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from onnxpipe.core.errors import InputError
from onnxpipe.core.userfiles import load_callable, read_npz, user_batches

Batch = dict[str, np.ndarray]


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    return read_npz(path, what="evaluation data")


def calibration_source(spec: str | Path | Callable[[], Iterable[Batch]], *,
                       batch_size: int = 32) -> Callable[[], Iterable[Batch]]:
    """A callable returning a fresh, lazily streamed iterable of input batches.

    Forms: ``file.py:function`` (returns an iterable of input dicts, used as its batches), a
    ``.npz`` of arrays by input name (samples along axis 0), or a directory of ``.npz`` files and
    ``.npy`` files (``<input>.npy``, or ``<input>_<k>.npy`` for group k). Files are read by the
    batch runner's streaming reader (:func:`onnxpipe.core.sources.open_source`) and cut into
    batches of ``batch_size``, so memory stays bounded however large the set is.
    """
    if callable(spec):
        return spec
    text = str(spec)
    if ".py:" in text:
        fn = load_callable(text, what="calibration data")
        return lambda: user_batches(fn, text, what="calibration data")
    path = Path(text)
    if not path.exists():
        raise InputError(f"calibration data: no such file or directory {path}", hint="check the path")
    from onnxpipe.core.sources import open_source

    source = open_source(path, [])

    def batches() -> Iterator[Batch]:
        for chunk in source.chunks():
            for start in range(0, chunk.rows, batch_size):
                yield {**chunk.constant,
                       **{k: np.ascontiguousarray(v[start:start + batch_size]) for k, v in chunk.batched.items()}}

    return batches


def evaluation_source(spec: str | Path | tuple, *, model: str | Path | None = None) -> tuple[Batch, np.ndarray]:
    """``(inputs by name, labels)``: from ``file.py:function``, or a ``.npz`` with a ``labels`` array.

    For language models (metric ``perplexity``): a text file (``.txt``), tokenized with the
    tokenizer.json in ``model``'s folder and cut into windows of its context, or a ``.npz`` of
    token ids ``input_ids`` [windows, tokens] (labels: the ids themselves unless given).
    """
    if isinstance(spec, tuple):
        inputs, labels = spec
        return dict(inputs), np.asarray(labels)
    text = str(spec)
    if ".py:" in text:
        fn = load_callable(text, what="evaluation data")
        try:
            result = fn()
        except Exception as exc:
            from onnxpipe.core.userfiles import first_line

            raise InputError(f"evaluation data {text} raised {first_line(exc, 200)}",
                             hint="fix the function (run with --debug for the traceback)") from exc
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Mapping)):
            raise InputError(f"evaluation data {text} must return (inputs dict, labels)",
                             hint="return ({'x': array}, labels)")
        return {k: np.asarray(v) for k, v in result[0].items()}, np.asarray(result[1])
    path = Path(text)
    if not path.is_file():
        raise InputError(f"evaluation data: no such file {path}", hint="give a .npz with the inputs and 'labels'")
    from onnxpipe.core import perplexity

    if path.suffix.lower() in perplexity.TEXT_SUFFIXES:
        return perplexity.text_windows(path, model)
    arrays = _npz_arrays(path)
    if "labels" not in arrays and "input_ids" in arrays:  # token ids of a language model
        return perplexity.token_arrays(arrays)
    if "labels" not in arrays:
        raise InputError(f"evaluation data {path} has no 'labels' array", hint="save the labels under the key 'labels'")
    labels = arrays.pop("labels")
    return arrays, labels


def take(source: Callable[[], Iterable[Batch]], n: int) -> list[Batch]:
    """The first ``n`` batches of a source."""
    return list(itertools.islice(source(), n))
