"""Inference inputs streamed in chunks: a ``.npz``, a folder of ``.npy``/``.npz``, a dict, or any iterable.

Samples run along axis 0. Arrays whose leading dim is the common one are batched; others (a
scalar option, a lookup table) go unchanged with every batch. Files are read piece by piece:
``.npy`` files are memory-mapped and ``.npz`` members are read from the zip stream a few
thousand rows at a time, so memory does not grow with the dataset.
"""

from __future__ import annotations

import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.core.errors import InputError
from onnxpipe.core.tensors import TensorInfo, feed_mismatch

READ_BYTES = 16 << 20  # rows read from an .npz member at a time: about this many bytes


@dataclass
class Chunk:
    """Consecutive samples (``batched``, all with the same leading dim) and the inputs every batch shares."""

    batched: dict[str, np.ndarray]
    constant: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        return next(iter(self.batched.values())).shape[0] if self.batched else 0


@dataclass
class Source:
    """A stream of chunks, with the number of samples when it is known (for the ETA)."""

    chunks: Callable[[], Iterator[Chunk]]
    total: int | None
    description: str


def split(arrays: Mapping[str, np.ndarray], leading: Mapping[str, int | None] | None = None) -> Chunk:
    """Batched arrays share the most common leading dim (the longest on a tie); the others are constant.

    Example:
        >>> c = split({"x": np.zeros((4, 3)), "scale": np.ones(())})
        >>> sorted(c.batched), sorted(c.constant)
        (['x'], ['scale'])
    """
    dims = leading if leading is not None else {k: (a.shape[0] if np.ndim(a) >= 1 else None) for k, a in arrays.items()}
    counts = Counter(d for d in dims.values() if d is not None)
    if not counts:
        raise InputError("no input has a sample axis (every array is a scalar)", hint="put samples along axis 0")
    batch = max(counts, key=lambda d: (counts[d], d))  # on a tie the longest axis holds the samples
    batched = {k: a for k, a in arrays.items() if dims[k] == batch}
    return Chunk(batched, {k: a for k, a in arrays.items() if k not in batched})


def _require(present: Iterable[str], keep: set[str] | None, where: str) -> None:
    """Every model input must be in the data: "the data has no X: expected ..., received ..."."""
    have = list(present)
    missing = sorted(keep - set(have)) if keep else []
    if missing:
        raise InputError(f"{where} has no {', '.join(missing)}: expected inputs {', '.join(sorted(keep or ()))}, "
                         f"received {', '.join(have) or 'none'}", hint="name the arrays after the model's inputs")


def _header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return np.lib.format._read_array_header(f, version)


def _npz_members(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype, bool]]:
    out = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if not name.endswith(".npy"):
                continue
            with z.open(name) as f:
                shape, fortran, dtype = _header(f)
            out[name[:-4]] = (tuple(shape), np.dtype(dtype), bool(fortran) or np.dtype(dtype).hasobject)
    return out


def _npz_chunks(path: Path, keep: set[str] | None) -> Iterator[Chunk]:
    """Read an .npz member by member in row blocks, all batched members in lockstep."""
    from onnxpipe.core.userfiles import reading

    with reading(path, "data", hint="save it with numpy.savez, numeric arrays only"):
        members = _npz_members(path)
        for n, (_shape, dtype, _slow) in members.items():
            if dtype.hasobject:
                raise ValueError(f"array {n!r} holds Python objects, which are not read (no unpickling)")
    _require(members, keep, str(path))
    names = [n for n in members if keep is None or n in keep]
    chunk = split({n: np.empty(members[n][0][:1] if members[n][0] else ()) for n in names},
                  {n: (members[n][0][0] if members[n][0] else None) for n in names})
    with reading(path, "data", hint="save it with numpy.savez, numeric arrays only"), np.load(path, allow_pickle=False) as z:
        constant = {n: z[n] for n in chunk.constant}
        slow = [n for n in chunk.batched if members[n][2]]  # Fortran order or objects: read whole
        whole = {n: z[n] for n in slow}
    total = members[next(iter(chunk.batched))][0][0]
    row_bytes = max(1, sum(int(np.prod(members[n][0][1:], dtype=np.int64)) * members[n][1].itemsize
                           for n in chunk.batched))
    step = max(1, READ_BYTES // row_bytes)
    with reading(path, "data"):
        z = zipfile.ZipFile(path)
    with z:
        streams = {}
        try:
            for n in chunk.batched:
                if n in whole:
                    continue
                with reading(path, "data"):
                    f = z.open(n + ".npy")
                    _header(f)
                streams[n] = f
            for start in range(0, total, step):
                rows = min(step, total - start)
                out = {}
                with reading(path, "data", hint="the file may be truncated; save it again with numpy.savez"):
                    for n in chunk.batched:
                        if n in whole:
                            out[n] = whole[n][start:start + rows]
                            continue
                        shape, dtype, _ = members[n]
                        need = rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                        data = streams[n].read(need)
                        out[n] = np.frombuffer(data, dtype=dtype).reshape((rows, *shape[1:]))
                yield Chunk(out, constant)
        finally:
            for f in streams.values():
                f.close()


def _npz_total(path: Path, keep: set[str] | None) -> int:
    from onnxpipe.core.userfiles import reading

    with reading(path, "data", hint="save it with numpy.savez, numeric arrays only"):
        members = _npz_members(path)
    names = [n for n in members if keep is None or n in keep]
    lead = [members[n][0][0] for n in names if members[n][0]]
    return max(sorted(set(lead)), key=lead.count) if lead else 0


def _array_chunks(arrays: Mapping[str, np.ndarray], step_bytes: int = READ_BYTES) -> Iterator[Chunk]:
    whole = split(arrays)
    row_bytes = max(1, sum(a[:1].nbytes for a in whole.batched.values()))
    step = max(1, step_bytes // row_bytes)
    for start in range(0, whole.rows, step):
        yield Chunk({k: np.asarray(a[start:start + step]) for k, a in whole.batched.items()}, whole.constant)


def _directory(path: Path, keep: set[str] | None) -> Source:
    files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
    if not files:
        raise InputError(f"{path} holds no .npy or .npz files", hint="put <input>.npy files or .npz chunks there")
    npz = [f for f in files if f.suffix == ".npz"]
    groups: dict[int, dict[str, Path]] = {}
    for f in (f for f in files if f.suffix == ".npy"):
        name, _, idx = f.stem.rpartition("_")
        key, input_name = (int(idx), name) if idx.isdigit() and name and (keep is None or name in keep) else (-1, f.stem)
        groups.setdefault(key, {})[input_name] = f

    _require({n for g in groups.values() for n in g} if not npz else keep or (), keep, str(path))

    def maps(k: int) -> dict[str, np.ndarray]:
        from onnxpipe.core.userfiles import reading

        out = {}
        for n, p in groups[k].items():
            if keep is None or n in keep:
                with reading(p, "data", hint="save it with numpy.save, numeric arrays only"):
                    out[n] = np.load(p, mmap_mode="r", allow_pickle=False)
        return out

    total = sum(_npz_total(f, keep) for f in npz) + sum(split(maps(k)).rows for k in groups)

    def chunks() -> Iterator[Chunk]:
        for f in npz:
            yield from _npz_chunks(f, keep)
        for k in sorted(groups):
            yield from _array_chunks(maps(k))

    return Source(chunks, total, f"{path}/ ({len(files)} files)")


def open_source(data: Any, inputs: list[TensorInfo]) -> Source:
    """A :class:`Source` for ``data``, keeping only the model's inputs when a file holds more.

    Forms: a ``.npz`` path, a folder (``<input>.npy`` files, memory-mapped; ``<input>_<k>.npy``
    groups; ``.npz`` chunks, in name order), ``file.py:function`` returning an iterable of input
    dicts, a dict of arrays, or an iterable of dicts (each a chunk of samples along axis 0).

    Example:
        >>> src = open_source({"x": np.zeros((10, 3), np.float32)}, [])
        >>> src.total
        10
    """
    keep = {i.name for i in inputs} or None
    if isinstance(data, Mapping):
        _require(data, keep, "the data")
        arrays = {k: np.asarray(v) for k, v in data.items() if keep is None or k in keep}
        return Source(lambda: _array_chunks(arrays), split(arrays).rows, "arrays")
    if isinstance(data, (str, Path)):
        text = str(data)
        if ".py:" in text:
            from onnxpipe.core.userfiles import load_callable, user_batches

            fn = load_callable(text, what="inference data")
            return _iterable(lambda: user_batches(fn, text, what="inference data"), None, text, keep)
        path = Path(text)
        if not path.exists():
            raise InputError(f"no such file or directory: {path}",
                             hint="give a .npz, a folder of .npy/.npz, or file.py:function")
        if path.is_dir():
            return _directory(path, keep)
        if path.suffix == ".npy":
            from onnxpipe.core.userfiles import reading

            name = inputs[0].name if len(inputs) == 1 else path.stem
            with reading(path, "data", hint="save it with numpy.save, numeric arrays only"):
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            return Source(lambda: _array_chunks({name: arr}), int(arr.shape[0]) if arr.ndim else 0, str(path))
        return Source(lambda: _npz_chunks(path, keep), _npz_total(path, keep), str(path))
    if isinstance(data, Iterable):
        total = None
        if hasattr(data, "__len__") and isinstance(data, (list, tuple)):
            try:
                total = sum(split({k: np.asarray(v) for k, v in d.items()}).rows for d in data)
            except InputError:
                total = None
        items = data
        return _iterable(lambda: iter(items), total, "iterable", keep)
    raise InputError(f"cannot read inference inputs from {type(data).__name__}",
                     hint="give a .npz, a folder, a dict of arrays or an iterable of input dicts")


def _iterable(make: Callable[[], Iterable[Any]], total: int | None, what: str, keep: set[str] | None) -> Source:
    def chunks() -> Iterator[Chunk]:
        for i, item in enumerate(make()):
            if not isinstance(item, Mapping):
                raise InputError(f"{what}: item {i} is a {type(item).__name__}, not a dict of arrays",
                                 hint="yield {input name: array with samples along axis 0}")
            _require(item, keep, f"{what} item {i}")
            from onnxpipe.core.userfiles import numeric

            yield split({k: numeric(v, what=f"{what} item {i}", name=k) for k, v in item.items() if keep is None or k in keep})

    return Source(chunks, total, what)


def name_batched(name: str, chunk: Chunk) -> bool:
    """Whether input ``name`` rides the sample axis in ``chunk`` (its leading dim is then any size)."""
    return name in chunk.batched


def check_chunk(chunk: Chunk, inputs: list[TensorInfo]) -> None:
    """Names, dtypes, ranks and fixed dims of a chunk against the model's inputs: "expected X, received Y".

    Example:
        >>> check_chunk(split({"x": np.zeros((2, 3), np.float32)}), [TensorInfo("x", ["N", 3], np.dtype("float32"))])
    """
    arrays = {**chunk.constant, **chunk.batched}
    # a batched array's axis 0 holds the samples (any count); every other fixed dim must match
    checked = [TensorInfo(i.name, ["N", *i.shape[1:]] if i.shape and name_batched(i.name, chunk) else i.shape, i.dtype)
               for i in inputs]
    problem = feed_mismatch(arrays, checked, allow_unknown=True, shapes="dims")
    if problem is None:
        return
    if problem.kind == "missing":
        raise InputError(f"the data has no {', '.join(problem.names)}: expected inputs {', '.join(i.name for i in inputs)}, "
                         f"received {', '.join(arrays) or 'none'}", hint="name the arrays after the model's inputs")
    if problem.kind == "dtype":
        raise InputError(str(problem), hint=f"cast the data to {problem.expected}")
    raise InputError(str(problem), hint="samples go along axis 0, one array per model input")


def first_chunk(source: Source, inputs: list[TensorInfo], what: str) -> Chunk:
    """The first chunk of ``source``, read before any work starts and checked against ``inputs``.

    Data that cannot be read, holds no sample or does not fit the model fails in a moment with
    one line that starts with ``what`` (the data's name as the user gave it).
    """
    chunks = source.chunks()
    try:
        first = next(chunks, None)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if first is None or first.rows == 0:
        raise InputError(f"{what} holds no samples", hint="give data with at least one sample")
    try:
        check_chunk(first, inputs)
    except InputError as exc:
        raise InputError(f"{what}: {exc.message}", hint=exc.hint) from None
    return first
