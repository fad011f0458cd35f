"""The one validation layer of the command line: every number and every output path, checked while
the options are parsed, before any command does work or creates anything.

Numbers: ``callback=count()`` (an integer >= 1), ``callback=number(lo=0)`` (finite, >= 0) and so on;
a bad value is click's usage error naming the option ("Invalid value for '--atol': nan is not a
finite number"), printed as one line by :func:`onnxpipe.cli.main`.

Outputs: ``callback=output_file`` / ``output_dir`` check that the place can be written (its nearest
existing ancestor is a writable folder, the path itself is not a folder where a file goes, or a file
where a folder goes) without creating anything.

Example:
    >>> atol: Annotated[float, typer.Option("--atol", callback=number(lo=0))] = 1e-4  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

MAX_BATCH = 1 << 20  # samples in one batch: beyond this a generated batch alone needs terabytes
MAX_COUNT = 1 << 31  # runs, batches, shards, attempts: a typo past this only burns time


def _bad(message: str) -> typer.BadParameter:
    return typer.BadParameter(message)


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           integer: bool = False) -> Callable[[Any], Any]:
    """A callback accepting finite numbers in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); None passes.

    Example:
        >>> number(lo=0)(float("nan"))
        Traceback (most recent call last):
        click.exceptions.BadParameter: nan is not a finite number
    """

    def check(value: Any) -> Any:
        if value is None:
            return value
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if not integer and not math.isfinite(v):
                raise _bad(f"{v} is not a finite number")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise _bad(f"{v} must be {'>' if lo_open else '>='} {lo:g}")
            if hi is not None and v > hi:
                raise _bad(f"{v} must be <= {hi:g}")
        return value

    return check


def count(lo: int = 1, hi: int = MAX_COUNT) -> Callable[[Any], Any]:
    """A callback accepting integers in ``[lo, hi]``."""
    return number(lo, hi, integer=True)


def batch(value: Any) -> Any:
    """A batch size: 1 .. :data:`MAX_BATCH`."""
    return number(1, MAX_BATCH, integer=True)(value)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        if p.is_symlink():  # a dangling link: what it points to would be created
            break
        p = p.parent
    return p


def _writable_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise _bad(f"{folder} is not a folder, so {what} cannot be created in it")
    try:  # access() says yes to root on read-only mounts and pseudo file systems; a real probe does not lie
        fd, probe = tempfile.mkstemp(prefix=".onnxpipe-probe-", dir=folder)
    except OSError as exc:
        raise _bad(f"cannot write {what}: {folder} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def output_file(value: Path | None) -> Path | None:
    """An output file: not a folder, and its folder (or the nearest existing ancestor) writable."""
    if value is None:
        return value
    path = Path(value)
    if path.is_dir():
        raise _bad(f"{path} is a folder; give a file path")
    if str(path).endswith(("/", os.sep)):
        raise _bad(f"{path} ends with a separator; give a file path")
    _writable_folder(_nearest_existing(path.parent) if not path.parent.exists() else path.parent, str(path))
    if path.exists() and not os.access(path, os.W_OK):
        raise _bad(f"{path} exists and cannot be overwritten")
    return value


def output_path(value: Path | None) -> Path | None:
    """An output that is a file or a folder, as the command decides (convert: a folder for a decoder)."""
    if value is not None and Path(value).is_dir():
        _writable_folder(Path(value), str(value))
        return value
    return output_file(value)


def output_dir(value: Path | None) -> Path | None:
    """An output folder: a folder or nothing yet, inside a writable folder."""
    if value is None:
        return value
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise _bad(f"{path} exists and is not a folder")
    _writable_folder(path if path.is_dir() else _nearest_existing(path), str(path))
    return value


def opset_version(value: int | None) -> int | None:
    """An ONNX opset this onnx package knows (7 .. its newest)."""
    if value is None:
        return value
    import onnx.defs

    newest = onnx.defs.onnx_opset_version()
    if not 7 <= value <= newest:
        raise _bad(f"opset {value} is not one this onnx ({onnx.__version__}) knows: 7 to {newest}")
    return value


def not_the_input(source: Path, output: Path) -> None:
    """Refuse an output that would overwrite the input it is made from."""
    from onnxpipe.core.errors import InputError

    try:
        same = Path(source).exists() and Path(output).exists() and Path(source).samefile(output)
    except OSError:
        same = False
    if same:
        raise InputError(f"the output {output} is the input model itself", hint="write to another path with -o")


def model_name(value: str | None) -> str | None:
    """A model name that is safe as a folder and a URL segment."""
    import re

    if value is None:
        return value
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}", value) or value in (".", ".."):
        raise _bad(f"{value[:40]!r} is not a model name: use 1-128 letters, digits, '_', '-' or '.', "
                   "not starting with '.' or '-'")
    return value


def one_of(*choices: str) -> Callable[[Any], Any]:
    """A callback accepting only ``choices``."""

    def check(value: Any) -> Any:
        if value is not None and value not in choices:
            raise _bad(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


def device_list(value: str | None) -> str | None:
    """A device list: each device once (``cpu,cpu`` would start two workers fighting for the same cores)."""
    if value is None:
        return value
    from onnxpipe.runtimes.providers import split_devices

    items = split_devices(value)
    if not items:
        raise _bad("no device given; e.g. cpu, cpu:0,cpu:1 or cuda:0")
    seen: dict[str, int] = {}
    for d in items:
        seen[d] = seen.get(d, 0) + 1
    twice = [f"{name} ({n} times)" for name, n in seen.items() if n > 1]
    if twice:
        raise _bad(f"devices given more than once: {', '.join(twice[:3])}; name each once (cpu:0,cpu:1 are two workers)")
    return value
