"""``onnxpipe optimize``, ``run`` and ``passes``: passes with or without a recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from onnxpipe.cli._checks import not_the_input, output_dir, output_file
from onnxpipe.cli._common import console_for, sample_inputs


def parse_pass(text: str) -> str | dict:
    """``simplify``, ``opset:version=17`` or ``fp16:{keep_fp32_ops: [Softmax]}`` -> a pass spec."""
    import yaml

    from onnxpipe.core.errors import InputError

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


def register(app: typer.Typer) -> None:
    @app.command()
    def optimize(
        model: Annotated[Path, typer.Argument(help="An .onnx model.")],
        output: Annotated[Path, typer.Option("-o", "--output", callback=output_file, help="Where to write the optimized model.")],
        passes: Annotated[list[str], typer.Option("--pass", "-p", help="A pass, repeatable, in order: simplify, "
                                                                     "fp16, opset:version=17, 'fix-shapes:{dims: {batch: 1}}'.")],
        data: Annotated[Optional[str], typer.Option(help="Calibration/check data: .npz, a folder, or file.py:function.")] = None,
        report_dir: Annotated[Optional[Path], typer.Option("--report", callback=output_dir, help="Also write every stage and report.* here.")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print the stages as JSON on stdout.")] = False,
    ) -> None:
        """Run passes over an ONNX model, checking the outputs after each one."""
        from onnxpipe.converter.hf_common import copy_generation_files
        from onnxpipe.core.data import calibration_source
        from onnxpipe.core.files import write_json, write_text
        from onnxpipe.core.modelio import load_model, save_model
        from onnxpipe.pipeline import optimize as do_optimize
        from onnxpipe.pipeline import report
        from onnxpipe.pipeline.stages import make_pass

        console = console_for(json_out)
        not_the_input(model, output)
        specs = [make_pass(parse_pass(p)) for p in passes]  # bad names fail before any work
        calibration = calibration_source(data) if data else None
        proto = load_model(model, load_external_data=False)  # weights in external data stay on disk
        sample_inputs(data, proto)  # the first batch fits the model, or one line naming the data

        def on_event(message: str, stage) -> None:
            if stage is not None and stage.index > 0:
                console.print(f"{stage.index:02d} {stage.name}: " + ("kept" if stage.kept else f"[red]rolled back[/]: {stage.reason}"))
                if stage.notes.get("warning"):
                    console.print(f"[yellow]warning[/]: {stage.notes['warning']}")

        result = do_optimize(proto, specs, calibration=calibration, outdir=report_dir, on_event=on_event)
        save_model(result.model, output)
        kept = copy_generation_files(model, output)  # a text-generation folder's tokenizer and genai_config.json
        console.print(report.table(result.stages, title=f"onnxpipe optimize -> {output}"))
        if kept:
            console.print(f"kept beside it for onnxpipe generate: {', '.join(kept)}")
        if report_dir is not None:
            write_json(result.as_dict(), report_dir / "report.json")
            write_text(report.markdown(result.stages), report_dir / "report.md")
            report.chart(result.stages, report_dir / "report.png")
        if json_out:
            print(json.dumps(result.as_dict(), indent=2))


    @app.command()
    def run(
        recipe: Annotated[Path, typer.Argument(help="A YAML recipe (see models/digits_cnn/pipeline.yaml).")],
        output: Annotated[Optional[Path], typer.Option("-o", "--output", callback=output_dir, help="Output folder (default: the recipe's).")] = None,
    ) -> None:
        """Convert, optimize, validate and report, as a recipe says."""
        from onnxpipe.pipeline import run as do_run

        result = do_run(recipe, output, console=console_for())
        if not all(row["ok"] for row in result.validation):
            from onnxpipe.core.errors import CheckFailedError

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
        console_for().print(table)
