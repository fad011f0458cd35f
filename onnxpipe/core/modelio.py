"""Load and save ONNX models safely: clear errors, external data, atomic writes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx

from onnxpipe.core import external
from onnxpipe.core.errors import InputError
from onnxpipe.core.files import atomic_output

# protobuf cannot serialize a message of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the model's initializers (raw data or typed fields), external data included."""
    return sum(external.nbytes(init) for init in _all_initializers(model.graph))


def _all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    from onnxpipe.core.graph import subgraphs

    yield from graph.initializer
    for node in graph.node:
        for g in subgraphs(node):
            yield from _all_initializers(g)


def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file, turning every failure into one clear line.

    Example:
        >>> model = load_model("model.onnx")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file: {p}", hint="check the path")
    if p.is_dir():
        raise InputError(f"{p} is a directory, not an .onnx file", hint="give the path of the .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=load_external_data)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ... depending on damage
        raise InputError(
            f"{p} is not a readable ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'parse failed'})",
            hint="the file may be truncated or not ONNX; re-export it",
        ) from exc
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{p} holds no ONNX graph (empty or not an ONNX file)", hint="re-export the model")
    if not load_external_data:  # weights stay on disk: remember where, for sessions and streaming writes
        external.remember_folder(model, p)
    return model


def run_checker(model: onnx.ModelProto) -> None:
    """``onnx.checker`` on any model: a lazily loaded one through a header beside sparse placeholders of its
    data files (no weight is read), one over protobuf's limit not at all (it cannot be serialized).

    Raises:
        onnx.checker.ValidationError: the graph is not valid ONNX.
    """
    if external.has_external_refs(model):  # the checker finds data files from a path, not a proto
        import tempfile

        with tempfile.TemporaryDirectory(prefix="onnxpipe-check-") as tmp:
            onnx.checker.check_model(str(external.ort_model_path(model, tmp, placeholders=True)), full_check=False)
    elif tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD and model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        onnx.checker.check_model(model, full_check=False)  # tensor_bytes first: ByteSize raises over 2 GB


def check_model(model: onnx.ModelProto, *, what: str = "model") -> None:
    """Run ``onnx.checker`` (:func:`run_checker`); an invalid graph is one line naming ``what``."""
    try:
        run_checker(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"{what} is not a valid ONNX model: {first}", hint="re-export it or fix the graph") from exc


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    threshold: int | None = None,
) -> Path:
    """Write ``model`` atomically; weights go to ``<name>.data`` when over protobuf's limit.

    Args:
        model: the model to write.
        path: destination ``.onnx`` file.
        external_data: force (True) or forbid (False) external data; None decides by size.
        threshold: initializer bytes above which external data is used (default ~1.8 GB).

    Example:
        >>> save_model(model, "out/model.onnx")  # doctest: +SKIP
    """
    dest = Path(path)
    limit = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    use_external = tensor_bytes(model) > limit if external_data is None else external_data
    lazy = external.has_external_refs(model)
    with atomic_output(dest) as tmp:
        target = tmp / dest.name
        if lazy:  # weights still on disk: copy them tensor by tensor, never all in memory
            external.write_streaming(model, target)
        elif use_external:
            model = _copy_with_data(model)
            onnx.save_model(
                model,
                str(target),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=f"{dest.name}.data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(target))
    if lazy:
        external.remember_folder(model, dest)  # the written data file, now at its final place
    elif not use_external:
        stale = dest.parent / f"{dest.name}.data"
        stale.unlink(missing_ok=True)
    return dest


def _copy_with_data(model: onnx.ModelProto) -> onnx.ModelProto:
    # onnx.save_model with external data mutates the proto in place (moves raw_data out);
    # work on a copy so the caller's model keeps its weights.
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def model_size_bytes(path: str | os.PathLike) -> int:
    """Size on disk of an ONNX file plus its external-data files."""
    p = Path(path)
    total = p.stat().st_size
    data = p.parent / f"{p.name}.data"
    if data.exists():
        total += data.stat().st_size
    return total
