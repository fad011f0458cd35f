"""What the command modules share: consoles and tables."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def console_for(json_mode: bool = False) -> Console:
    """stdout for people, or stderr when ``--json`` keeps stdout for the JSON document.

    Piped into a file or a CI log, rich would fold tables to 80 columns; give them room.
    """
    console = Console(stderr=json_mode, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=json_mode, highlight=False, width=160)
    return console


def fmt(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.3g}"


def check_table(check, title: str = "check against the framework") -> Table:
    """Per-output max abs/rel diff and pass/fail of a :class:`CheckReport`."""
    table = Table(title=f"{title} (atol={check.atol:g}, rtol={check.rtol:g}; "
                        f"{len(check.runs)} runs: " + ", ".join(f"{r.label} b={r.batch}" for r in check.runs) + ")")
    for col in ("output", "max abs diff", "max rel diff", "out of tol", "result"):
        table.add_column(col, justify="left" if col == "output" else "right")
    for c in check.worst():
        table.add_row(c.name, fmt(c.max_abs), fmt(c.max_rel), f"{c.mismatched:.2%}",
                      "[green]pass[/]" if c.ok else f"[red]FAIL[/] {c.detail}".strip())
    return table


def parse_dims(items: list[str] | None) -> dict[str, int]:
    """``--dim seq=128`` options -> ``{"seq": 128}``; a malformed one is a one-line error."""
    from onnxpipe.core.errors import InputError

    dims = {}
    for d in items or []:
        name, sep, value = d.partition("=")
        if not sep or not value.strip().isdigit():
            raise InputError(f"cannot parse --dim {d!r}", hint="write it as NAME=VALUE, e.g. --dim seq=128")
        dims[name.strip()] = int(value)
    return dims


def parse_bytes(text: str) -> int:
    """``"4GiB"`` -> 4294967296, ``"1GB"`` -> 1000000000, or a one-line error."""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    from onnxpipe.core.errors import InputError

    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise InputError(f"cannot read the size {text!r}", hint="write it like 512MB, 1GB or 4GiB") from None
