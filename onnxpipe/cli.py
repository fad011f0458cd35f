"""The ``onnxpipe`` command line: user errors print one line and exit 2, bugs keep their traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from onnxpipe import __version__
from onnxpipe.errors import OnnxpipeError

app = typer.Typer(
    help="From a trained PyTorch or TensorFlow model to a fast, validated ONNX deployment.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"onnxpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    _state["debug"] = debug


def _console(json_mode: bool) -> Console:
    # with --json, stdout carries only the JSON document; people read stderr
    return Console(stderr=json_mode, highlight=False)


def _fmt(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.3g}"


def check_table(check, title: str = "check against the framework") -> Table:
    """Per-output max abs/rel diff and pass/fail of a :class:`CheckReport`."""
    table = Table(title=f"{title} (atol={check.atol:g}, rtol={check.rtol:g}; "
                        f"{len(check.runs)} runs: " + ", ".join(f"{r.label} b={r.batch}" for r in check.runs) + ")")
    for col in ("output", "max abs diff", "max rel diff", "out of tol", "result"):
        table.add_column(col, justify="left" if col == "output" else "right")
    for c in check.worst():
        table.add_row(c.name, _fmt(c.max_abs), _fmt(c.max_rel), f"{c.mismatched:.2%}",
                      "[green]pass[/]" if c.ok else f"[red]FAIL[/] {c.detail}".strip())
    return table


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="file.py:factory, model.onnx, model.pt (TorchScript), "
                                               "model.pt2 (torch.export), model.keras, or a SavedModel dir.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the ONNX model.")],
    framework: Annotated[Optional[str], typer.Option(help="torch | tensorflow | onnx (default: detect).")] = None,
    input: Annotated[Optional[list[str]], typer.Option(
        "--input", help="NAME:1x3x224x224:float32, repeatable; for sources without example inputs.")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch/--static-batch",
                                                help="Make the first axis symbolic.")] = True,
    opset: Annotated[Optional[int], typer.Option(help="Target opset (default 18; an .onnx keeps its own).")] = None,
    atol: Annotated[float, typer.Option(help="Absolute tolerance of the check.")] = 1e-4,
    rtol: Annotated[float, typer.Option(help="Relative tolerance of the check.")] = 1e-3,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Compare outputs with the framework.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")] = False,
) -> None:
    """Convert a framework model to ONNX and prove its outputs match the framework's."""
    from onnxpipe.converter import convert as do_convert
    from onnxpipe.errors import CheckFailedError

    console = _console(json_out)
    try:
        result = do_convert(source, output, framework=framework, inputs=input or (), dynamic_batch=dynamic_batch,
                            opset=opset, atol=atol, rtol=rtol, check=check)
    except CheckFailedError as err:
        result = getattr(err, "result", None)
        if result is not None:
            _print_conversion(result, console, json_out)
        raise
    _print_conversion(result, console, json_out)


def _print_conversion(result, console: Console, json_out: bool) -> None:
    for a in result.attempts:
        if not a.ok:
            console.print(f"[yellow]exporter {a.strategy} failed[/]: {a.error}")
    console.print(f"{result.framework} ({result.kind}) -> [bold]{result.path or 'memory'}[/] "
                  f"via {result.exporter} in {result.seconds:.1f}s")
    if result.check is not None:
        console.print(check_table(result.check))
    if json_out:
        print(json.dumps(result.as_dict(), indent=2))


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="An .onnx model.")],
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch for symbolic first axes.")] = 1,
    dim: Annotated[Optional[list[str]], typer.Option(help="NAME=VALUE for a named symbolic dim, repeatable.")] = None,
    input: Annotated[Optional[list[str]], typer.Option(
        "--input", help="NAME:1x3x224x224 to fix one input's shape for the cost count.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Show a model's inputs, outputs, opsets, op histogram, parameters and compute cost."""
    from onnxpipe.analysis import summarize
    from onnxpipe.errors import InputError
    from onnxpipe.modelio import load_model
    from onnxpipe.tensors import InputSpec

    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, received {batch_size}", hint="use a positive batch size")
    dims = {}
    for d in dim or []:
        name, sep, value = d.partition("=")
        if not sep or not value.strip().isdigit():
            raise InputError(f"cannot parse --dim {d!r}", hint="write it as NAME=VALUE, e.g. --dim seq=128")
        dims[name.strip()] = int(value)
    shapes = {s.name: s.shape for s in (InputSpec.parse(t) for t in input or [])}
    summary = summarize(load_model(model), batch=batch_size, dims=dims, input_shapes=shapes or None)
    if json_out:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        summary.render(_console(False))


def parse_pass(text: str) -> str | dict:
    """``simplify``, ``opset:version=17`` or ``fp16:{keep_fp32_ops: [Softmax]}`` -> a pass spec."""
    import yaml

    from onnxpipe.errors import InputError

    name, sep, opts = text.partition(":")
    if not sep:
        return name.strip()
    opts = opts.strip()
    try:
        if opts.startswith("{"):
            cfg = yaml.safe_load(opts)
        else:
            cfg = {}
            for item in filter(None, (o.strip() for o in opts.split(","))):
                key, eq, value = item.partition("=")
                if not eq:
                    raise ValueError(item)
                cfg[key.strip()] = yaml.safe_load(value)
    except (yaml.YAMLError, ValueError):
        raise InputError(f"cannot parse pass options in {text!r}",
                         hint="write --pass name:key=value,key=value or --pass 'name:{key: value}'") from None
    return {name.strip(): cfg}


@app.command()
def optimize(
    model: Annotated[Path, typer.Argument(help="An .onnx model.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the optimized model.")],
    passes: Annotated[list[str], typer.Option("--pass", "-p", help="A pass, repeatable, in order: simplify, "
                                                                 "fp16, opset:version=17, 'fix-shapes:{dims: {batch: 1}}'.")],
    data: Annotated[Optional[str], typer.Option(help="Calibration/check data: .npz, a folder, or file.py:function.")] = None,
    report_dir: Annotated[Optional[Path], typer.Option("--report", help="Also write every stage and report.* here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the stages as JSON on stdout.")] = False,
) -> None:
    """Run passes over an ONNX model, checking the outputs after each one."""
    from onnxpipe import report
    from onnxpipe.data import calibration_source
    from onnxpipe.modelio import load_model, save_model
    from onnxpipe.pipeline import make_pass, optimize as do_optimize

    console = _console(json_out)
    specs = [make_pass(parse_pass(p)) for p in passes]  # bad names fail before any work
    calibration = calibration_source(data) if data else None

    def on_event(message: str, stage) -> None:
        if stage is not None and stage.index > 0:
            console.print(f"{stage.index:02d} {stage.name}: " + ("kept" if stage.kept else f"[red]rolled back[/]: {stage.reason}"))

    result = do_optimize(load_model(model), specs, calibration=calibration, outdir=report_dir, on_event=on_event)
    save_model(result.model, output)
    console.print(report.table(result.stages, title=f"onnxpipe optimize -> {output}"))
    if report_dir is not None:
        report.write_json(result.as_dict(), report_dir / "report.json")
        report.write_text(report.markdown(result.stages), report_dir / "report.md")
        report.chart(result.stages, report_dir / "report.png")
    if json_out:
        print(json.dumps(result.as_dict(), indent=2))


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe (see models/digits_cnn/pipeline.yaml).")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output folder (default: the recipe's).")] = None,
) -> None:
    """Convert, optimize, validate and report, as a recipe says."""
    from onnxpipe.pipeline import run as do_run

    result = do_run(recipe, output, console=Console(highlight=False))
    if not all(row["ok"] for row in result.validation):
        from onnxpipe.errors import CheckFailedError

        raise CheckFailedError("validation across providers failed; see report.json", hint=str(result.outdir))


@app.command("passes")
def list_passes() -> None:
    """List the available passes and their options."""
    from onnxpipe.passes import available, get_pass

    table = Table(title="passes")
    table.add_column("pass")
    table.add_column("options")
    table.add_column("what it does")
    for name in available():
        cls = get_pass(name)
        opts = ", ".join(k for k in cls.Config.model_fields)
        table.add_row(name, opts, (cls.__doc__ or "").strip().splitlines()[0])
    Console(highlight=False).print(table)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``onnxpipe`` command."""
    args = sys.argv[1:] if argv is None else argv
    _state["debug"] = "--debug" in args
    try:
        app(args=args, prog_name="onnxpipe", standalone_mode=True)
    except OnnxpipeError as err:
        if _state["debug"]:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
