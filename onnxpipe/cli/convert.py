"""``onnxpipe convert``: framework model to checked ONNX."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from onnxpipe.cli._checks import not_the_input, number, opset_version, output_path
from onnxpipe.cli._common import check_table, console_for


def register(app: typer.Typer) -> None:
    @app.command()
    def convert(
        source: Annotated[str, typer.Argument(help="file.py:factory, model.onnx, model.pt (TorchScript), "
                                                   "model.pt2 (torch.export), model.keras, a SavedModel dir, "
                                                   "or a Hugging Face save_pretrained folder.")],
        output: Annotated[Path, typer.Option("-o", "--output", callback=output_path, help="Where to write the ONNX model "
                                                                    "(a folder for --task text-generation).")],
        task: Annotated[Optional[str], typer.Option(
            help="Hugging Face folders: feature-extraction | text-classification | image-classification | "
                 "text-generation (default: from the config's architectures).")] = None,
        framework: Annotated[Optional[str], typer.Option(help="torch | tensorflow | onnx (default: detect).")] = None,
        input: Annotated[Optional[list[str]], typer.Option(
            "--input", help="NAME:1x3x224x224:float32, repeatable; for sources without example inputs.")] = None,
        dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch/--static-batch",
                                                    help="Make the first axis symbolic.")] = True,
        opset: Annotated[Optional[int], typer.Option(callback=opset_version, help="Target opset (default 18; an .onnx keeps its own).")] = None,
        atol: Annotated[float, typer.Option(callback=number(lo=0), help="Absolute tolerance of the check.")] = 1e-4,
        rtol: Annotated[float, typer.Option(callback=number(lo=0), help="Relative tolerance of the check.")] = 1e-3,
        check: Annotated[bool, typer.Option("--check/--no-check", help="Compare outputs with the framework.")] = True,
        json_out: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")] = False,
        trust: Annotated[bool, typer.Option("--trust", help="Load a source that runs code while it loads (a pickled "
                                                            "module, pickled objects in a .pt2, a SavedModel with file or "
                                                            "Python ops, a .keras lambda layer). Only for files you trust.")] = False,
    ) -> None:
        """Convert a framework model to ONNX and prove its outputs match the framework's."""
        from onnxpipe.converter import convert as do_convert
        from onnxpipe.core.errors import CheckFailedError

        console = console_for(json_out)
        not_the_input(Path(source), output)
        try:
            result = do_convert(source, output, framework=framework, inputs=input or (), dynamic_batch=dynamic_batch,
                                opset=opset, atol=atol, rtol=rtol, check=check, task=task, trust=trust)
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
    if getattr(result, "files", None):
        console.print("wrote " + ", ".join(result.files))
    if result.check is not None:
        console.print(check_table(result.check))
    if json_out:
        print(json.dumps(result.as_dict(), indent=2))
