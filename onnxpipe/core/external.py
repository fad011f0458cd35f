"""Weights that stay on disk: models loaded without their external data, written back in bounded memory.

A model over protobuf's 2 GB limit keeps its weights in external data files. Loading them all to
inspect the graph, cut it, or copy it to another folder costs as much memory as the weights (and
twice that while protobuf copies them). Here a model is loaded *lazily*: every initializer that
lives in an external file keeps its reference (``location``, ``offset``, ``length``) and gains a
``basepath`` entry, the folder the location is relative to (the key ONNX's own
``ExternalDataInfo`` reads). Such a model can then be

- written to another place by :func:`write_streaming`: one tensor at a time is copied from its
  file, in chunks, never the whole weights in memory;
- run by ONNX Runtime through :func:`ort_model_path`: a header file in a scratch folder with
  hard links to the data files (ORT refuses symbolic links that leave the model's folder, and
  unknown keys such as ``basepath``); a copy where a hard link cannot be made (another
  file system), which costs disk and time, not memory;
- read tensor by tensor with :func:`tensor_array` (memory-mapped).

Example:
    >>> model = load_model("llm/model.onnx", load_external_data=False)  # doctest: +SKIP
    >>> write_streaming(model, "copy/model.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import onnx

from onnxpipe.core.errors import InputError

log = logging.getLogger("onnxpipe.external")

T = TypeVar("T")
BASEPATH = "basepath"
ALIGN = 4096  # data offsets aligned to the page size, so ONNX Runtime can memory-map every tensor
CHUNK = 16 << 20  # bytes copied at a time
INLINE_BELOW = 1024  # tensors smaller than this stay inside the .onnx file


def initializers(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every initializer of the model, subgraphs (If/Loop/Scan bodies) and Constant nodes included."""
    yield from model.graph.initializer
    yield from _inner_tensors(model)


def _inner_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The tensors of subgraphs and of Constant nodes: every initializer but the top graph's own."""
    from onnxpipe.core.graph import all_graphs

    for depth, g in enumerate(all_graphs(model.graph)):
        if depth:  # all_graphs yields the top graph first
            yield from g.initializer
        for node in g.node:  # Constant nodes may hold external tensors too
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def on_disk(t: onnx.TensorProto) -> bool:
    """Whether ``t``'s bytes are in its external file and not in memory (a lazily loaded or spilled tensor)."""
    return is_external(t) and not t.raw_data


def _link_or_copy(src: Path, dest: Path) -> None:
    """``dest`` as a hard link to ``src``: no bytes copied; a copy where no link is possible (another file system)."""
    try:
        os.link(src, dest)
    except OSError:
        log.warning("copying %s to %s (no hard link possible)", src, dest.parent)
        shutil.copyfile(src, dest)


def _info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _set_info(t: onnx.TensorProto, info: dict[str, str]) -> None:
    del t.external_data[:]
    for k, v in info.items():
        e = t.external_data.add()
        e.key, e.value = k, v


def has_external_refs(model: onnx.ModelProto) -> bool:
    """True when some initializer's bytes are not in memory but in an external file."""
    return any(on_disk(t) for t in initializers(model))


def source_file(t: onnx.TensorProto, base_dir: str | os.PathLike | None = None) -> Path:
    """The file holding an external tensor's bytes (its ``basepath`` wins over ``base_dir``)."""
    info = _info(t)
    location = info.get("location")
    if not location:
        raise InputError(f"tensor {t.name!r} is marked external but names no file", hint="re-export the model")
    base = info.get(BASEPATH) or (str(base_dir) if base_dir is not None else None)
    if base is None:
        raise InputError(f"tensor {t.name!r} lives in {location!r} but the model's folder is unknown",
                         hint="load the model from its file (load_model(path, load_external_data=False))")
    path = (Path(base) / location).resolve()
    if Path(base).resolve() not in path.parents:
        raise InputError(f"tensor {t.name!r} points outside the model's folder ({location!r})",
                         hint="external data must sit beside the model; a crafted path is refused")
    return path


def _span(t: onnx.TensorProto) -> tuple[int, int | None]:
    info = _info(t)
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError as exc:
        raise InputError(f"tensor {t.name!r} has a malformed external data offset/length",
                         hint="re-export the model") from exc
    return offset, length


def nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data from its dims and type (no data read)."""
    n = 1
    for d in t.dims:
        n *= d
    try:
        size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        size = 4
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * size


def remember_folder(model: onnx.ModelProto, path: str | os.PathLike) -> onnx.ModelProto:
    """Record on every external tensor the folder of ``path`` (the model file) and check its file exists.

    Raises:
        InputError: a reference to a data file that is missing or outside the model's folder.
    """
    p = Path(path)
    base = str(p.resolve().parent)
    for t in initializers(model):
        if is_external(t):
            _set_info(t, {**_info(t), BASEPATH: base})
            f = source_file(t)
            if not f.is_file():
                raise InputError(f"{p}: weights of {t.name!r} are in {f.name}, which is missing",
                                 hint=f"put {f.name} beside {p.name}")
    return model


def tensor_array(t: onnx.TensorProto, base_dir: str | os.PathLike | None = None) -> np.ndarray:
    """A tensor's values; external data is memory-mapped, not read."""
    if not on_disk(t):
        return onnx.numpy_helper.to_array(t)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    offset, length = _span(t)
    count = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
    if length is not None and length != count * dtype.itemsize:
        raise InputError(f"tensor {t.name!r}: external length {length} does not match its shape",
                         hint="re-export the model")
    mm = np.memmap(source_file(t, base_dir), dtype=dtype, mode="r", offset=offset, shape=(count,))
    return mm.reshape(tuple(t.dims))


def _move_out(t: onnx.TensorProto, out: BinaryIO, data_name: str) -> None:
    """Append the bytes of ``t`` (in memory, or copied in chunks from its file) to ``out`` at a page-aligned
    offset, and point ``t`` there: its in-memory bytes are released."""
    pad = (-out.tell()) % ALIGN
    out.write(b"\0" * pad)
    offset = out.tell()
    if on_disk(t):
        src_offset, length = _span(t)
        length = nbytes(t) if length is None else length
        with open(source_file(t), "rb") as src:
            src.seek(src_offset)
            left = length
            while left:
                chunk = src.read(min(CHUNK, left))
                if not chunk:
                    raise InputError(f"tensor {t.name!r}: its data file ends early",
                                     hint="the external data file is truncated; re-export the model")
                out.write(chunk)
                left -= len(chunk)
    else:
        raw = t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
        out.write(raw)
        length = len(raw)
        del raw
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                      "uint64_data", "string_data"):
            t.ClearField(field)
    t.data_location = onnx.TensorProto.EXTERNAL
    _set_info(t, {"location": data_name, "offset": str(offset), "length": str(length)})


def write_streaming(model: onnx.ModelProto, dest: str | os.PathLike, *, data_name: str | None = None,
                    inline_below: int = INLINE_BELOW) -> Path:
    """Write ``model`` to ``dest`` with its weights in ``<dest>.data``, one tensor at a time.

    Tensors held in memory are moved out of the model (the model is changed in place and then
    refers to the written file); external tensors are copied from their file in chunks. Offsets
    are page-aligned so ONNX Runtime can memory-map them. The caller provides atomicity (write
    into a temporary folder, then rename), as :func:`onnxpipe.core.modelio.save_model` does.
    """
    dest = Path(dest)
    data_name = data_name or f"{dest.name}.data"
    with open(dest.parent / data_name, "wb") as out:
        for t in initializers(model):
            if on_disk(t) or nbytes(t) >= inline_below:
                _move_out(t, out, data_name)
    with open(dest, "wb") as f:
        f.write(model.SerializeToString())
    base = str(dest.resolve().parent)
    for t in initializers(model):  # the in-memory model now reads from the written file
        if is_external(t):
            _set_info(t, {**_info(t), BASEPATH: base})
    return dest


# -- weights that a pass made in memory go to disk; weights a pass needs come back ----------------------

_spill_dir: Path | None = None


SPILL_ENV = "ONNXPIPE_SPILL_DIR"


def spill_folder() -> Path:
    """This process's folder for weights moved out of memory (removed when the process exits).

    It is made under ``$ONNXPIPE_SPILL_DIR`` if set, else the system's temporary folder (``$TMPDIR``).
    A temporary folder held in memory (tmpfs) would keep the spilled weights in memory: that is
    logged as a warning naming the variable to set.
    """
    global _spill_dir
    if _spill_dir is None or not _spill_dir.is_dir():
        import atexit
        import tempfile

        parent = os.environ.get(SPILL_ENV) or None
        if parent is not None and not Path(parent).is_dir():
            raise InputError(f"{SPILL_ENV}={parent} is not a folder", hint="point it at a folder on a disk with room")
        _spill_dir = Path(tempfile.mkdtemp(prefix="onnxpipe-weights-", dir=parent))
        atexit.register(shutil.rmtree, _spill_dir, ignore_errors=True)
        if _in_memory_fs(_spill_dir):
            log.warning("weights moved out of memory go to %s, which is held in memory (tmpfs); set %s to a folder "
                        "on disk to keep large models' memory bounded", _spill_dir, SPILL_ENV)
    return _spill_dir


def _in_memory_fs(path: Path) -> bool:
    """Whether ``path`` is on a tmpfs or ramfs mount (Linux; False where /proc/mounts is not readable)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines() if len(line.split()) > 2]
    except OSError:
        return False
    target = str(path.resolve())
    best = max((m for m in mounts if target == m[0] or target.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best is not None and best[1] in ("tmpfs", "ramfs")


class SpillFile:
    """A new data file in :func:`spill_folder` (or ``folder``) that tensors are moved into one by one.

    Example:
        >>> with SpillFile() as spill:  # doctest: +SKIP
        ...     spill.put(tensor)  # tensor now refers to the file; its bytes left memory
    """

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        import uuid

        self.folder = Path(folder) if folder is not None else spill_folder()
        self.name = f"spill-{uuid.uuid4().hex[:12]}.data"
        self._base = str(self.folder.resolve())
        self._file: BinaryIO | None = None
        self.moved = 0

    def put(self, t: onnx.TensorProto) -> None:
        """Move ``t``'s in-memory bytes to the file; ``t`` then refers to them there."""
        if self._file is None:
            self._file = open(self.folder / self.name, "wb")  # noqa: SIM115 - closed by close()
        self.moved += nbytes(t)
        _move_out(t, self._file, self.name)
        self._file.flush()  # readable at once (ORT, memory maps) while more tensors are appended
        _set_info(t, {**_info(t), BASEPATH: self._base})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SpillFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def adopt(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make a lazily loaded model independent of the folder its data files are in (a tool's scratch folder
    about to be removed): each data file gets a hard link (a copy where links are impossible) in
    :func:`spill_folder`, and the model refers to that, in place. Returns ``model``."""
    import uuid

    folder = spill_folder()
    moved: dict[Path, str] = {}
    for t in initializers(model):
        if not on_disk(t):
            continue
        src = source_file(t)
        if src not in moved:
            name = f"adopted-{uuid.uuid4().hex[:12]}-{src.name}"
            _link_or_copy(src, folder / name)
            moved[src] = name
        _set_info(t, {**_info(t), "location": moved[src], BASEPATH: str(folder.resolve())})
    return model


def spill(model: onnx.ModelProto, folder: str | os.PathLike | None = None, *,
          min_bytes: int = INLINE_BELOW) -> onnx.ModelProto:
    """The model with every in-memory initializer of at least ``min_bytes`` moved into a new data file in
    ``folder`` (default :func:`spill_folder`): it then reads them from disk like a lazily loaded model,
    and ONNX Runtime memory-maps them. ``model`` itself is emptied of those bytes; the returned model is
    a new message, so that the memory of the moved bytes goes back once ``model`` is dropped (protobuf
    keeps a message's memory until the message is freed). Returns ``model`` when nothing is moved.

    A large model whose pass made new weights in memory (quantized blocks, pruned layers) keeps
    only one copy of any weight in memory at a time this way.
    """
    big = [t for t in initializers(model) if not is_external(t) and nbytes(t) >= min_bytes]
    if not big:
        return model
    with SpillFile(folder) as out:
        for t in big:
            out.put(t)
    fresh = onnx.ModelProto()
    fresh.ParseFromString(model.SerializeToString())  # the weights are out: a small message
    return fresh


def load_tensor(t: onnx.TensorProto) -> None:
    """Read an external tensor's bytes into the proto, in place (it is no longer external)."""
    if not on_disk(t):
        return
    offset, length = _span(t)
    length = nbytes(t) if length is None else length
    with open(source_file(t), "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    if len(raw) != length:
        raise InputError(f"tensor {t.name!r}: its data file ends early",
                         hint="the external data file is truncated; re-export the model")
    t.raw_data = raw
    del raw
    del t.external_data[:]
    t.data_location = onnx.TensorProto.DEFAULT


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a lazily loaded model with every weight read into memory (for code that needs the bytes:
    ONNX Runtime's quantizers, onnxconverter's float16, the pruner). The model itself is unchanged."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # external tensors hold no bytes: a cheap copy
    for t in initializers(copy):
        load_tensor(t)
    return copy


def with_weights_if_needed(fn: Callable[[onnx.ModelProto], T], model: onnx.ModelProto) -> T:
    """``fn(model)``; if that fails on a model whose weights stay on disk, ``fn`` of a copy with them read in.

    For tools that rewrite nodes and only sometimes read a weight (onnx's version converter: a few
    adapters read constant inputs): the weights are read only when they are needed.
    """
    try:
        return fn(model)
    except Exception:
        if not lazy_bytes(model):
            raise
        log.info("reading the weights into memory: the tool needs their values")
        return fn(materialize(model))


def lazy_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the weights that stay on disk (0 for a model held in memory)."""
    return sum(nbytes(t) for t in initializers(model) if on_disk(t))


def ort_model_path(model: onnx.ModelProto, folder: str | os.PathLike, *, placeholders: bool = False) -> Path:
    """A file ONNX Runtime can load for a lazily loaded model: the header in ``folder``, data linked.

    Each distinct data file gets a hard link (a copy where links are not possible) in ``folder``;
    the header refers to those names. Nothing of the weights is read into memory. With
    ``placeholders`` the data files are sparse files of the same size instead (for ``onnx.checker``,
    which checks locations and sizes but refuses hard links). Tensors of subgraphs (If, Loop, Scan
    bodies) and Constant nodes are read into the header: ONNX Runtime checks their data files for
    hard links and refuses them.
    """
    folder = Path(folder)
    header = onnx.ModelProto()
    header.CopyFrom(model)  # external tensors hold no bytes: a cheap copy
    names: dict[Path, str] = {}
    for t in _inner_tensors(header):  # ORT refuses hard-linked data for these: read in (small, as a rule)
        load_tensor(t)
    for t in header.graph.initializer:
        if not on_disk(t):
            continue
        src = source_file(t)
        if src not in names:
            name = f"w{len(names)}_{src.name}"
            names[src] = name
            link = folder / name
            if placeholders:
                with open(link, "wb") as f:
                    f.truncate(src.stat().st_size)
            else:
                _link_or_copy(src, link)
        _set_info(t, {**{k: v for k, v in _info(t).items() if k != BASEPATH}, "location": names[src]})
    path = folder / "model.onnx"
    with open(path, "wb") as f:
        f.write(header.SerializeToString())
    return path
