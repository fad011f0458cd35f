"""Everything a user hands us, read through one guard: Python files by path (factories, data
functions, metrics), ``.npz``/``.npy`` arrays, text and JSON files. A file that does not parse is
one line naming it (:class:`InputError`), never a traceback."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from onnxpipe.core.errors import InputError, OnnxpipeError


def first_line(exc: BaseException, limit: int = 300) -> str:
    """A short one-line description of an exception for messages and reports."""
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    msg = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def split_spec(spec: str) -> tuple[Path, str] | None:
    """``path/to/file.py:build`` -> (path, "build"); anything else -> None."""
    head, sep, name = str(spec).rpartition(":")
    if sep and head.endswith(".py") and name.isidentifier():
        return Path(head), name
    if str(spec).endswith(".py"):
        raise InputError(f"{spec} names a Python file but no function",
                         hint=f"write it as {spec}:name, naming the function to call")
    return None


def import_file(path: Path, *, what: str) -> ModuleType:
    """Import ``path`` once per process under a name unique to its location.

    The file's folder is importable while it runs, so it can import its sibling modules.
    """
    if not path.exists():
        raise InputError(f"no such file or directory: {path}", hint="check the path")
    module_name = f"_onnxpipe_user_{abs(hash(str(path.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"cannot import {path} as a Python module", hint="check that it is a .py file")
    module = importlib.util.module_from_spec(spec)
    parent = str(path.resolve().parent)
    added = parent not in sys.path
    if added:
        sys.path.insert(0, parent)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise InputError(f"importing {path} ({what}) failed: {first_line(exc)}",
                         hint="fix the module (run with --debug for the traceback)") from exc
    finally:
        if added:
            sys.path.remove(parent)
    sys.modules[module_name] = module
    return module


def load_callable(spec: str, *, what: str) -> Callable[..., Any]:
    """``path/to/file.py:name`` -> that function, or a one-line error naming what exists."""
    parsed = split_spec(spec)
    if parsed is None:
        raise InputError(f"{what} {spec!r} is not of the form path/to/file.py:function",
                         hint="name a Python file and a function in it")
    path, name = parsed
    module = import_file(path, what=what)
    fn = getattr(module, name, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                        and getattr(v, "__module__", None) == module.__name__)
        raise InputError(f"{path} has no {what} named {name!r}",
                         hint=f"callables defined there: {', '.join(public) or 'none'}")
    if not callable(fn):
        raise InputError(f"{path}:{name} is not callable", hint=f"name a function for the {what}")
    return fn


# the guarded reader: every file and function a user hands us ------------------------------------


@contextlib.contextmanager
def reading(path: str | Path, what: str, hint: str = "check the file") -> Iterator[None]:
    """Turn any failure while reading the user's ``path`` into one line naming it.

    Example:
        >>> with reading("x.npz", "data"):  # doctest: +SKIP
        ...     np.load("x.npz")
    """
    try:
        yield
    except OnnxpipeError:
        raise
    except MemoryError:
        raise InputError(f"{what} {path} does not fit in memory", hint="split it into smaller files") from None
    except RecursionError:
        raise InputError(f"{what} {path} is nested too deeply to read", hint=hint) from None
    except Exception as exc:  # a corrupt zip, a bad header, bytes where text belongs: all the file's fault
        raise InputError(f"cannot read {what} {path}: {first_line(exc, 200)}", hint=hint) from exc


def read_npz(path: str | Path, *, what: str = "data") -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (or the one of an ``.npy``, under its stem), never unpickling objects."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what}: no such file {p}", hint="check the path")
    with reading(p, what, hint="save it with numpy.savez, numeric arrays only"):
        if p.suffix == ".npy":
            return {p.stem: np.load(p, allow_pickle=False)}
        with np.load(p, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("a single array, not an .npz archive")
            return {k: z[k] for k in z.files}


def read_text(path: str | Path, *, what: str) -> str:
    """A text file (UTF-8); a binary or unreadable file is one line naming it."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no such {what}: {p}", hint="check the path")
    with reading(p, what):
        raw = p.read_bytes()
        if b"\0" in raw:
            raise ValueError("it is a binary file, not text")
        return raw.decode("utf-8")


def read_json(path: str | Path, *, what: str) -> Any:
    """A JSON document from a user's file."""
    import json

    text = read_text(path, what=what)
    with reading(path, what, hint="it must be JSON"):
        return json.loads(text)


def numeric(value: Any, *, what: str, name: str) -> np.ndarray:
    """``value`` as a numeric or boolean array; strings and objects are refused naming ``name``."""
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise InputError(f"{what}: {name!r} is not an array ({first_line(exc, 120)})",
                         hint="give numpy arrays of numbers") from None
    if arr.dtype.kind not in "biufc":
        raise InputError(f"{what}: {name!r} holds {arr.dtype} values ({'objects' if arr.dtype.kind == 'O' else 'text'}), "
                         "not numbers", hint="give numpy arrays of numbers")
    return arr


def user_batches(fn: Callable[[], Any], spec: str, *, what: str) -> Iterator[dict[str, np.ndarray]]:
    """The batches a user's function returns or yields, every failure one line naming ``spec``.

    Checks: the call does not raise, the result is iterable, each item is a dict of numeric arrays.
    """
    try:
        result = fn()
    except OnnxpipeError:
        raise
    except Exception as exc:
        raise InputError(f"{what} {spec} raised {first_line(exc, 200)}",
                         hint="fix the function (run with --debug for the traceback)") from exc
    if isinstance(result, (str, bytes)) or not hasattr(result, "__iter__"):
        raise InputError(f"{what} {spec} returned a {type(result).__name__}, not an iterable of input dicts",
                         hint="return or yield {input name: array} batches")
    items = iter(result)
    k = 0
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except OnnxpipeError:
            raise
        except Exception as exc:
            raise InputError(f"{what} {spec} raised {first_line(exc, 200)} at batch {k}",
                             hint="fix the function (run with --debug for the traceback)") from exc
        if not isinstance(item, Mapping) or not all(isinstance(n, str) for n in item):
            raise InputError(f"{what} {spec}: batch {k} is a {type(item).__name__}, not a dict of arrays by input name",
                             hint="yield {input name: array} batches")
        yield {n: numeric(v, what=f"{what} {spec} batch {k}", name=n) for n, v in item.items()}
        k += 1
