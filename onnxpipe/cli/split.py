"""``onnxpipe split``: cut a model into pipeline stages, checked against the whole model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from onnxpipe.cli._checks import batch, count, number, one_of, output_dir
from onnxpipe.cli._common import console_for


def register(app: typer.Typer) -> None:
    @app.command()
    def split(
        model: Annotated[Path, typer.Argument(help="An .onnx model, or a text-generation folder from "
                                                     "`onnxpipe convert --task text-generation`.")],
        output: Annotated[Path, typer.Option("-o", "--output", callback=output_dir, help="Folder for part<k>.onnx and pipeline.json.")],
        parts: Annotated[int | None, typer.Option("--parts", "-n", callback=count(2, 1 << 16), help="Number of stages (default 2).")] = None,
        max_part_bytes: Annotated[str | None, typer.Option("--max-part-bytes", help="Instead of --parts: as many stages as "
                                                           "needed, each holding at most this much (weights + what it "
                                                           "receives and sends), e.g. 1GB or 512MiB.")] = None,
        balance: Annotated[str, typer.Option("--balance", callback=one_of("flops", "params", "memory"), help="flops (speed), params (weight bytes) or memory "
                                                              "(weights + peak activations).")] = "flops",
        cut: Annotated[list[str] | None, typer.Option("--cut", help="Cut after this tensor (repeatable); "
                                                                       "replaces the search.")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", callback=batch, help="Batch the costs and sizes are counted at.")] = 1,
        dim: Annotated[list[str] | None, typer.Option("--dim", help="NAME=VALUE for a named symbolic dim, repeatable.")] = None,
        atol: Annotated[float, typer.Option("--atol", callback=number(lo=0), help="Absolute tolerance of the sequence-vs-whole check.")] = 1e-4,
        rtol: Annotated[float, typer.Option("--rtol", callback=number(lo=0), help="Relative tolerance of the sequence-vs-whole check.")] = 1e-3,
        at_layers: Annotated[bool | None, typer.Option("--at-layers/--anywhere", help="Cut only between decoder layers "
                                                       "(default for models with a KV cache: each stage keeps whole "
                                                       "layers and their cache).")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print pipeline.json's content on stdout.")] = False,
        data: Annotated[str | None, typer.Option("--data", help="Inputs for the parts-vs-whole check (.npz, a folder, or "
                                                                 "file.py:function; its first batch): needed where random "
                                                                 "inputs are not valid, e.g. token ids or indices.")] = None,
    ) -> None:
        """Cut a model into stages where few, small tensors cross, balanced by FLOPs or memory; check and write them."""
        from onnxpipe.cli._common import check_dims, model_runs, parse_bytes, parse_dims, sample_inputs
        from onnxpipe.core.errors import InputError
        from onnxpipe.core.modelio import load_model
        from onnxpipe.partition.split import split_model

        cap = parse_bytes(max_part_bytes, "--max-part-bytes") if max_part_bytes is not None else None
        side: list[Path] = []
        if model.is_dir():  # a text-generation folder: split its decoder, keep tokenizer and configs beside
            if not (model / "model.onnx").is_file():
                raise InputError(f"{model} is a folder without model.onnx",
                                 hint="give an .onnx file, or a folder written by `onnxpipe convert --task text-generation`")
            side = [f for f in sorted(model.iterdir()) if f.is_file() and not f.name.startswith("model.onnx")]
            model = model / "model.onnx"
        header = load_model(model, load_external_data=False)  # no weight bytes read
        if at_layers is None:
            from onnxpipe.partition.layers import kv_layer_count

            at_layers = not cut and kv_layer_count([i.name for i in header.graph.input]) > 1
        if cap is not None and parts is not None:
            raise InputError("--parts and --max-part-bytes both set the number of stages", hint="give one of them")
        dims = parse_dims(dim)
        check_dims(header, dims)
        sample = sample_inputs(data, header)
        console = console_for(json_out)
        with model_runs(data):
            result = split_model(model, output, parts=parts or 2, balance=balance, cuts=cut or (), batch=batch_size,
                                 dims=dims, atol=atol, rtol=rtol, max_part_bytes=cap, at_layers=at_layers,
                                 side_files=side, inputs=sample)
        console.print(result.table())
        for c in result.spec.extra.get("cuts", []):
            names = ", ".join(f"{t['name']} {t['shape'] or ''}" for t in c["tensors"])
            console.print(f"cut after part {c['after_part']}: {escape(names)}")
        for note in result.notes:
            console.print(f"[dim]note: {escape(note)}[/]")
        if json_out:
            print(json.dumps(result.as_dict(), indent=2))
        console.print(f"run it: onnxpipe infer {escape(str(output))} --devices "
                      + ",".join(f"cpu:{k}" for k in range(len(result.spec.parts))) + " --data ... -o ...")
