"""``onnxpipe inspect``: how heavy a model is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from onnxpipe.cli._checks import batch
from onnxpipe.cli._common import check_dims, check_input_names, console_for, parse_dims


def register(app: typer.Typer) -> None:
    @app.command()
    def inspect(
        model: Annotated[Path, typer.Argument(help="An .onnx model.")],
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", callback=batch, help="Batch for symbolic first axes.")] = 1,
        dim: Annotated[Optional[list[str]], typer.Option(help="NAME=VALUE for a named symbolic dim, repeatable.")] = None,
        input: Annotated[Optional[list[str]], typer.Option(
            "--input", help="NAME:1x3x224x224 to fix one input's shape for the cost count.")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
        memory: Annotated[bool, typer.Option("--memory", help="Weight bytes and peak activation memory at the batch "
                                                             "(liveness analysis), with the node of the peak.")] = False,
    ) -> None:
        """Show a model's inputs, outputs, opsets, op histogram, parameters and compute cost."""
        from onnxpipe.core.analysis import summarize
        from onnxpipe.core.modelio import load_model
        from onnxpipe.core.tensors import InputSpec

        dims = parse_dims(dim)
        shapes = {s.name: s.shape for s in (InputSpec.parse(t) for t in input or [])}
        proto = load_model(model, load_external_data=False)  # no weight bytes read
        check_dims(proto, dims)
        check_input_names(proto, shapes)
        if memory:
            from onnxpipe.partition.memory import memory_report

            report = memory_report(proto, batch=batch_size, dims=dims, input_shapes=shapes or None)
            if json_out:
                print(json.dumps(report.as_dict(), indent=2))
            else:
                report.render(console_for(False))
            return
        summary = summarize(proto, batch=batch_size, dims=dims, input_shapes=shapes or None)
        if json_out:
            print(json.dumps(summary.as_dict(), indent=2))
        else:
            summary.render(console_for(False))
