"""``onnxpipe tune``: the fastest session setup and batch size per device, written to tuned.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from onnxpipe.cli._checks import batch, device_list, number, one_of, output_file
from onnxpipe.cli._common import check_dims, console_for, model_runs, parse_bytes, parse_dims, sample_inputs
from onnxpipe.cli.runtime import DEVICES_HELP, int_list


def register(app: typer.Typer) -> None:
    @app.command()
    def tune(
        model: Annotated[Path, typer.Argument(help="An .onnx model.")],
        devices: Annotated[str, typer.Option("--devices", callback=device_list, help=DEVICES_HELP + " Options given are kept.")] = "cpu",
        batch_sizes: Annotated[str | None, typer.Option("--batch-sizes", help="Batch sizes to consider, e.g. 1,8,32 "
                                                                                 "(throughput default: doubling up to what fits).")] = None,
        objective: Annotated[str, typer.Option("--objective", callback=one_of("latency", "throughput"), help="latency (one run) or throughput (samples/s).")] = "latency",
        budget_s: Annotated[float, typer.Option("--budget-s", callback=number(0, 7 * 86400, lo_open=True), help="Seconds for the whole search, all devices.")] = 120.0,
        output: Annotated[Path, typer.Option("-o", "--output", callback=output_file, help="Where to write the tuned config.")] = Path("tuned.json"),
        chart: Annotated[Path | None, typer.Option("--chart", callback=output_file, help="Latency vs throughput chart (default: tune.png beside the output).")] = None,
        memory_cap: Annotated[str | None, typer.Option("--memory-cap", help="Memory a session may use, e.g. 4GiB "
                                                                               "(default: half the free RAM, 90% of a GPU's free memory).")] = None,
        max_batch: Annotated[int, typer.Option("--max-batch", callback=batch, help="Never consider batches above this.")] = 4096,
        dim: Annotated[list[str] | None, typer.Option("--dim", help="NAME=VALUE for a named symbolic dim, repeatable.")] = None,
        try_: Annotated[list[str] | None, typer.Option("--try", help="Also try this setup, e.g. 'cpu[threads=1,spinning=false]', repeatable.")] = None,
        atol: Annotated[float | None, typer.Option("--atol", callback=number(lo=0), help="How close a candidate's outputs must be to the default's.")] = None,
        rtol: Annotated[float | None, typer.Option("--rtol", callback=number(lo=0), help="Relative tolerance of that check.")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print the tuned config as JSON on stdout.")] = False,
        data: Annotated[str | None, typer.Option("--data", help="Inputs to tune on (.npz, a folder, or file.py:function; "
                                                                 "its first batch is used): needed where random inputs "
                                                                 "are not valid, e.g. token ids or indices.")] = None,
    ) -> None:
        """Search the fastest ONNX Runtime setup (threads, execution mode, optimization, arena, spinning;
        cuDNN, IO binding, CUDA graphs; TensorRT precision and builder level) and batch size per device."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from onnxpipe.core.errors import InputError
        from onnxpipe.core.modelio import load_model
        from onnxpipe.runtimes.providers import Device, split_devices
        from onnxpipe.runtimes.tune import tune as do_tune
        from onnxpipe.runtimes.tune_report import candidates_table, summary_table
        from onnxpipe.runtimes.tune_report import chart as draw
        from onnxpipe.runtimes.tuned import save_tuned

        console = console_for(json_out)
        if objective not in ("latency", "throughput"):
            raise InputError(f"unknown --objective {objective!r}", hint="use latency or throughput")
        if max_batch < 1:
            raise InputError(f"--max-batch must be >= 1, received {max_batch}", hint="e.g. --max-batch 256")
        sizes = int_list(batch_sizes, "--batch-sizes") if batch_sizes else None
        cap = parse_bytes(memory_cap, "--memory-cap") if memory_cap else None
        parsed = [Device.parse(d) for d in split_devices(devices)]
        extra = [Device.parse(t) for t in try_ or []]
        proto = load_model(model, load_external_data=False)  # sessions memory-map the weights
        dims = parse_dims(dim)
        check_dims(proto, dims)
        sample = sample_inputs(data, proto)
        start = time.perf_counter()
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=console_for(True), transient=True) as progress:
            task = progress.add_task("tuning", total=budget_s)

            def on_event(line: str) -> None:
                progress.update(task, description=escape(line), completed=min(budget_s, time.perf_counter() - start))

            with model_runs(data):
                report = do_tune(proto, parsed, objective=objective, batch_sizes=sizes,  # type: ignore[arg-type]
                                 budget_s=budget_s, memory_cap=cap, max_batch=max_batch, dims=dims,
                                 atol=atol, rtol=rtol, cache_dir=output.parent / f"{output.stem}.trt_cache"
                                 if any(d.kind == "tensorrt" for d in parsed) else None, extra=extra, on_event=on_event,
                                 inputs=sample)
        report.model = str(model)
        tuned = report.to_file()
        save_tuned(tuned, output)
        chart_path = draw(report, chart or output.with_name("tune.png"))
        console.print(candidates_table(report))
        console.print(summary_table(report))
        for d in report.devices:
            for note in d.notes:
                console.print(f"[dim]{d.default.label}: {escape(note)}[/]")
        console.print(f"tuned config: {output} · chart: {chart_path} · use it with "
                      f"`onnxpipe bench {model} --config {output}` (also infer, serve, recipes' runtime:)")
        if json_out:
            print(json.dumps(tuned.model_dump(mode="json"), indent=2))
