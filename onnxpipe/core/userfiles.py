"""Import users' Python files by path: factories, data functions and metrics."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from onnxpipe.core.errors import InputError


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
