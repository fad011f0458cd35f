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
    from onnxpipe.cli._checks import MAX_BATCH
    from onnxpipe.core.errors import InputError

    dims = {}
    for d in items or []:
        name, sep, value = d.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit():
            raise InputError(f"cannot parse --dim {d!r}", hint="write it as NAME=VALUE, e.g. --dim seq=128")
        if not 1 <= int(value) <= MAX_BATCH:
            raise InputError(f"--dim {d!r}: the value must be 1 to {MAX_BATCH}", hint="e.g. --dim seq=128")
        dims[name.strip()] = int(value)
    return dims


def symbolic_dims(model) -> list[str]:
    """Names of the symbolic dims of a model's inputs, in order of appearance."""
    names: dict[str, None] = {}
    for i in model.graph.input:
        for d in i.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param:
                names[d.dim_param] = None
    return list(names)


def check_dims(model, dims: dict[str, int]) -> None:
    """Every ``--dim`` must name a symbolic dim of the model's inputs."""
    from onnxpipe.core.errors import InputError

    known = symbolic_dims(model)
    for name in dims:
        if name not in known:
            raise InputError(f"--dim {name}: the model has no symbolic dim {name!r}",
                             hint=f"its symbolic dims: {', '.join(known) or 'none'}")


def check_input_names(model, shapes: dict[str, object]) -> None:
    """Every ``--input NAME:...`` must name an input of the model."""
    from onnxpipe.core.errors import InputError

    inits = {t.name for t in model.graph.initializer}
    known = [i.name for i in model.graph.input if i.name not in inits]
    for name in shapes:
        if name not in known:
            raise InputError(f"--input {name}: the model has no input {name!r}", hint=f"its inputs: {', '.join(known)}")



def sample_inputs(data: str | None, model, rows: int = 64) -> dict | None:
    """Up to ``rows`` samples of ``--data`` (None without it), checked against the model's inputs.

    Read as ``infer`` reads its data: a single ``.npy`` is the model's single input.
    """
    if data is None:
        return None
    from onnxpipe.core.sources import first_chunk, open_source
    from onnxpipe.core.tensors import graph_inputs

    infos = graph_inputs(model)
    first = first_chunk(open_source(data, infos), infos, f"--data {data}")
    arrays = {**first.constant, **{k: v[:rows] for k, v in first.batched.items()}}
    return {i.name: arrays[i.name] for i in infos}


class _ModelRuns:
    """``with model_runs(data):`` ONNX Runtime failing on the inputs becomes one line that says which inputs."""

    def __init__(self, data: str | None) -> None:
        self.data = data

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        from onnxpipe.core.errors import InputError
        from onnxpipe.core.userfiles import first_line

        if exc is None or not type(exc).__module__.startswith("onnxruntime"):
            return False
        where = f"the inputs of --data {self.data}" if self.data else "generated random inputs"
        raise InputError(f"the model fails on {where}: {first_line(exc, 240)}",
                         hint="give inputs it accepts with --data" if not self.data else "check the data") from exc


def model_runs(data: str | None) -> _ModelRuns:
    return _ModelRuns(data)


def parse_bytes(text: str, option: str = "the size") -> int:
    """``"4GiB"`` -> 4294967296, ``"1GB"`` -> 1000000000, or a one-line error naming ``option``."""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    from onnxpipe.core.errors import InputError

    try:
        value = int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise InputError(f"cannot read {option} {text!r}", hint="write it like 512MB, 1GB or 4GiB") from None
    if value <= 0:
        raise InputError(f"{option} {text!r} must be above 0", hint="write it like 512MB, 1GB or 4GiB")
    return value
