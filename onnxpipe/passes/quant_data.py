"""Calibration data for int8 quantization, streamed batch by batch into ONNX Runtime's calibrators."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxpipe.core.deps import require
from onnxpipe.core.errors import InputError
from onnxpipe.core.tensors import TensorInfo, feed_mismatch

if TYPE_CHECKING:
    from onnxruntime.quantization import TensorsData

Batch = dict[str, np.ndarray]
Source = Callable[[], Iterable[Mapping[str, np.ndarray]]]

RECIPE_HINT = ("the recipe key data.calibration (or --data of onnxpipe optimize): file.py:function, "
               "a .npz, or a directory of .npy/.npz")


def _reader_base() -> type:
    require("onnxruntime")
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader


def check_batch(batch: Any, infos: Sequence[TensorInfo], index: int) -> list[Batch]:
    """One calibration batch, checked against the model inputs and cut to a fixed batch axis.

    A model with a fixed batch size ``b`` gets a batch of ``k * b`` samples as ``k`` batches;
    anything else that does not fit is an error naming the batch, the input, and what was
    expected and received.

    Example:
        >>> from onnxpipe.core.tensors import TensorInfo
        >>> info = TensorInfo("x", [1, 3], np.dtype("float32"))
        >>> len(check_batch({"x": np.zeros((4, 3), np.float32)}, [info], 0))
        4
    """
    where = f"calibration batch {index + 1}"
    if not isinstance(batch, Mapping):
        raise InputError(f"{where} is a {type(batch).__name__}, expected a dict of arrays by input name",
                         hint=f"check {RECIPE_HINT}")
    arrays: Batch = {k: np.asarray(v) for k, v in batch.items()}
    problem = feed_mismatch(arrays, infos, batch_multiple=True)  # a fixed batch axis: k * b samples make k batches
    if problem is not None:
        hint = {"unknown": f"key the arrays by the model's input names in {RECIPE_HINT}",
                "missing": f"give every model input in {RECIPE_HINT}",
                "dtype": f"cast the calibration data to {problem.expected}"}.get(
                    problem.kind, "reshape the calibration data to the model's inputs")
        raise InputError(f"{where}: {problem}", hint=hint)
    arrays = {i.name: arrays[i.name] for i in infos}
    leads = [(i.shape[0], arrays[i.name].shape[0]) for i in infos
             if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0]
    splits = max([1, *(got // lead for lead, got in leads)])
    if splits == 1:
        return [arrays]
    return [{k: v[i * (len(v) // splits):(i + 1) * (len(v) // splits)] for k, v in arrays.items()}
            for i in range(splits)]


class StreamingReader:
    """An ONNX Runtime ``CalibrationDataReader`` that pulls batches from a source only when asked.

    Nothing is stored: ``source()`` is iterated lazily, each batch checked against the model's
    inputs as it arrives. :meth:`chunk` hands ORT at most ``n`` batches at a time, so a
    calibrator's buffers stay bounded however large the data set is.

    Args:
        source: a callable returning a fresh iterable of input dicts.
        inputs: the model's inputs (names, dtypes, shapes) to check each batch against.
        max_batches: stop after this many batches (None: the whole source).
        on_batch: called with each batch as it is handed out (progress bars, counters).

    Example:
        >>> reader = StreamingReader(lambda: [{"x": x}], infos)  # doctest: +SKIP
        >>> calibrator.collect_data(reader.chunk(16))  # doctest: +SKIP
    """

    def __init__(self, source: Source, inputs: Sequence[TensorInfo], *, max_batches: int | None = None,
                 on_batch: Callable[[Batch], None] | None = None) -> None:
        self.source, self.inputs, self.max_batches = source, list(inputs), max_batches
        self.on_batch = on_batch or (lambda batch: None)
        self.batches = 0
        self.samples = 0
        self.total: int | None = None  # batches in the source, when it can tell without reading
        self._iter: Iterator[Batch] | None = None
        self._ahead: list[Batch] = []

    def _stream(self) -> Iterator[Batch]:
        try:
            iterable = self.source()
            iterator = iter(iterable)
            self.total = len(iterable) if hasattr(iterable, "__len__") else None
        except InputError:
            raise
        except TypeError as exc:
            raise InputError(f"calibration data is not iterable ({exc})", hint=f"check {RECIPE_HINT}") from exc
        for index, raw in enumerate(iterator):
            yield from check_batch(raw, self.inputs, index)

    def has_next(self) -> bool:
        """Whether another batch is left (reads one ahead)."""
        if self._ahead:
            return True
        if self.max_batches is not None and self.batches >= self.max_batches:
            return False
        if self._iter is None:
            self._iter = self._stream()
        nxt = next(self._iter, None)
        if nxt is None:
            return False
        self._ahead.append(nxt)
        return True

    def get_next(self) -> Batch | None:
        if not self.has_next():
            return None
        batch = self._ahead.pop()
        self.batches += 1
        self.samples += len(next(iter(batch.values()))) if batch and np.ndim(next(iter(batch.values()))) else 1
        self.on_batch(batch)
        return batch

    def rewind(self) -> None:
        """Start again from a fresh iterable of the source."""
        self._iter, self._ahead, self.batches, self.samples = None, [], 0, 0

    def chunk(self, n: int) -> Any:
        """A CalibrationDataReader that hands out at most ``n`` more batches of this stream."""
        outer = self

        class Chunk(_reader_base()):  # type: ignore[misc]
            def __init__(self) -> None:
                self.left = n

            def get_next(self) -> Batch | None:
                if self.left <= 0:
                    return None
                self.left -= 1
                return outer.get_next()

        return Chunk()


def progress_bar(title: str) -> Any:
    """A transient rich progress bar on stderr (shown on terminals only), e.g. ``progress_bar("calibrating")``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(TextColumn(title), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def take_batches(source: Source, inputs: Sequence[TensorInfo], n: int) -> list[Batch]:
    """The first ``n`` checked batches of a source (for measuring, never for the whole set)."""
    reader = StreamingReader(source, inputs, max_batches=n)
    return list(itertools.takewhile(lambda b: b is not None, iter(reader.get_next, None)))


def calibrate(model_path: Path, reader: StreamingReader, *, method: str, op_types: Sequence[str],
              symmetric: bool, percentile: float, workdir: Path, chunk_batches: int = 16,
              external_data: bool = False, progress: Callable[[int, int], None] | None = None) -> TensorsData:
    """Tensor ranges of ``model_path`` from the streamed calibration data, by ORT's calibrators.

    The data goes through in chunks of ``chunk_batches``: MinMax merges ranges and the
    histogram methods (entropy, percentile) merge histograms after each chunk, so memory is
    bounded by one chunk's activations.

    Raises:
        InputError: the source yields no batch at all.
    """
    require("onnxruntime")
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    extra: dict[str, Any] = {"symmetric": symmetric}
    if method == "percentile":
        extra["percentile"] = percentile
    calibrator = create_calibrator(model_path, list(op_types), augmented_model_path=str(workdir / "augmented.onnx"),
                                   calibrate_method=methods[method], use_external_data_format=external_data,
                                   extra_options=extra)
    try:
        while reader.has_next():
            calibrator.collect_data(reader.chunk(chunk_batches))
            if progress is not None:
                progress(reader.batches, reader.samples)
        if reader.batches == 0:
            raise InputError("the calibration data yielded no batch", hint=f"check {RECIPE_HINT}")
        return calibrator.compute_data()
    finally:
        del calibrator
