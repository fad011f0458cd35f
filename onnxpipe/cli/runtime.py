"""``onnxpipe providers``, ``infer``, ``validate`` and ``bench``: running models on this machine's devices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from onnxpipe.cli._checks import (
    MAX_BATCH,
    batch,
    count,
    device_list,
    number,
    one_of,
    output_dir,
    output_file,
)
from onnxpipe.cli._common import check_dims, console_for, model_runs, parse_dims, sample_inputs

DEVICES_HELP = "Devices, comma-separated: cpu, cpu:1, cuda:0, tensorrt:0[fp16,cache_dir=trt] (see `onnxpipe providers`)."
CONFIG_HELP = "A tuned.json from `onnxpipe tune`: its devices (with every tuned option) and batch size are used."


def int_list(text: str, what: str, hi: int = MAX_BATCH) -> list[int]:
    """``"1,8,32"`` -> [1, 8, 32], or a one-line error."""
    from onnxpipe.core.errors import InputError

    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"cannot read {what} {text!r}", hint=f"write {what} as integers joined by commas, e.g. 1,8,32") from None
    if not values or any(not 1 <= v <= hi for v in values):
        raise InputError(f"{what} must be integers from 1 to {hi}, received {text!r}", hint="e.g. 1,8,32")
    if len(set(values)) != len(values):
        raise InputError(f"{what} lists a value twice: {text!r}", hint="give each once")
    return values


def check_inputs(model: Any, *, data: str | None, load: Path | None, batches: int, batch_size: int, seed: int,
                 specs: list[str] | None) -> list[dict]:
    """Validation inputs: saved ones, the first batches of ``data``, or generated ones."""
    from onnxpipe.core.data import calibration_source, take
    from onnxpipe.core.errors import InputError
    from onnxpipe.core.inputs import example_inputs
    from onnxpipe.core.tensors import InputSpec
    from onnxpipe.runtimes.validate import split_batches

    if load is not None:
        from onnxpipe.core.userfiles import read_npz

        if not load.is_file():
            raise InputError(f"no such file: {load}", hint="give the .npz written by --save-inputs")
        from onnxpipe.core.sources import check_chunk, split
        from onnxpipe.core.tensors import graph_inputs

        got = split_batches(read_npz(load, what="saved inputs"), None, what=str(load))
        for b in got:
            try:
                check_chunk(split(b), graph_inputs(model))
            except InputError as exc:
                raise InputError(f"--load-inputs {load}: {exc.message}", hint=exc.hint) from None
        return got
    if data is not None:
        from onnxpipe.core.sources import check_chunk, split
        from onnxpipe.core.tensors import graph_inputs

        got = take(calibration_source(data, batch_size=batch_size), batches)
        if not got:
            raise InputError(f"{data} yields no batches", hint="check the data")
        infos = graph_inputs(model)
        for b in got:
            try:
                check_chunk(split(b), infos)
            except InputError as exc:
                raise InputError(f"--data {data}: {exc.message}", hint=exc.hint) from None
        return [{i.name: b[i.name] for i in infos} for b in got]
    parsed = [InputSpec.parse(s) for s in specs or []]
    return [example_inputs(model, parsed, batch=batch_size, seed=seed + k) for k in range(batches)]


def save_inputs(batches: list[dict], path: Path) -> None:
    import numpy as np

    from onnxpipe.core.files import atomic_output

    arrays = batches[0] if len(batches) == 1 else {f"b{k}/{n}": v for k, b in enumerate(batches) for n, v in b.items()}
    with atomic_output(path) as tmp:
        with open(tmp / path.name, "wb") as f:
            np.savez(f, **arrays)


def register(app: typer.Typer) -> None:
    @app.command()
    def providers(json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False) -> None:
        """What this machine can run on: ONNX Runtime's build and providers, TensorRT, GPUs, the CPU."""
        from onnxpipe.runtimes.machine import machine
        from onnxpipe.runtimes.providers import option_rows

        m = machine()
        if json_out:
            print(json.dumps(m.as_dict(), indent=2))
            return
        console = console_for(False)
        m.render(console)
        t = Table(title=escape("device options: cuda:0[cudnn=heuristic,mem_limit=8GiB], tensorrt:0[fp16,cache_dir=trt]"))
        for col in ("option", "devices", "default", "what it does"):
            t.add_column(col)
        for row in option_rows():
            t.add_row(*(escape(c) for c in row))
        console.print(t)

    @app.command()
    def infer(
        model: Annotated[Path, typer.Argument(help="An .onnx model, or a folder from `onnxpipe split` (one stage per device).")],
        data: Annotated[str, typer.Option("--data", help="Inputs: a .npz (samples along axis 0), a folder of "
                                                         ".npy/.npz, or file.py:function yielding input dicts.")],
        output: Annotated[Path, typer.Option("-o", "--output", callback=output_dir, help="Folder for the shards and manifest.json.")],
        devices: Annotated[str, typer.Option("--devices", callback=device_list, help=DEVICES_HELP)] = "cpu",
        batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", callback=batch, help="Samples per micro-batch "
                                                                                   "(default: the tuned one, else 32).")] = None,
        shard_size: Annotated[Optional[int], typer.Option("--shard-size", callback=count(), help="Samples per output shard.")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue the job in OUTPUT, skipping finished shards.")] = False,
        backend: Annotated[str, typer.Option("--backend", callback=one_of("local", "ray"), help="local (a process per device) or ray (an actor per device).")] = "local",
        address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster (auto, ray://host:10001); default: a local Ray.")] = None,
        max_attempts: Annotated[int, typer.Option("--max-attempts", callback=count(1, 100), help="Tries per sample before it is reported failed.")] = 2,
        json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
        config: Annotated[Optional[Path], typer.Option("--config", help=CONFIG_HELP)] = None,
    ) -> None:
        """Run a model over a dataset on several devices; outputs in input order, resumable."""
        from onnxpipe.runtimes.batch import BatchRunner
        from onnxpipe.runtimes.batch_result import SamplesFailedError

        console = console_for(json_out)
        if config is not None:  # the tuned devices and batch replace --devices and the default batch size
            from onnxpipe.runtimes.tuned import load_tuned

            tuned = load_tuned(config)
            devices, batch_size = tuned.devices(), batch_size or tuned.batch_size()  # type: ignore[assignment]
        batch_size = batch_size or 32
        runner_cls = BatchRunner
        if model.is_dir() and (model / "pipeline.json").is_file():  # a split model: one stage per device
            from onnxpipe.runtimes.pipeline_parallel import PipelineRunner as runner_cls  # type: ignore[assignment]
        runner = runner_cls(model, devices, batch_size=batch_size, shard_size=shard_size, backend=backend,
                            address=address, max_attempts=max_attempts)
        runner.check_data(data)  # before any worker starts or any folder is made
        with runner:
            for note in runner.notes:
                console.print(f"[dim]note: {escape(note)}[/]")
            result = runner.run(data, output, resume=resume, progress=True)
        console.print(result.table())
        for note in result.notes[len(runner.notes):]:
            console.print(f"[yellow]note[/]: {escape(note)}")
        if json_out:
            print(json.dumps(result.as_dict(), indent=2))
        if result.failed:
            for f in result.failed[:20]:
                console.print(f"[red]sample {f.index} failed[/]: {escape(f.error)}")
            if len(result.failed) > 20:
                console.print(f"... and {len(result.failed) - 20} more (see manifest.json)")
            raise SamplesFailedError(f"{len(result.failed)} sample(s) failed on every attempt; the others are in {output}",
                                     hint=f"see 'failed' in {output / 'manifest.json'}")
        console.print(f"outputs: {output}/shard-*.npz · manifest: {output / 'manifest.json'}")

    @app.command()
    def validate(
        model: Annotated[Path, typer.Argument(help="An .onnx model.")],
        providers: Annotated[str, typer.Option("--providers", help="Targets, comma-separated, each DEVICE[/PRECISION]: "
                                                                   "cpu, cuda/fp16, tensorrt:0[fp16].")] = "cpu",
        reference: Annotated[Optional[Path], typer.Option("--reference", help="Reference: another .onnx (run on CPU, fp32) "
                                                                               "or an .npz of saved outputs; default: the first provider.")] = None,
        precisions: Annotated[Optional[str], typer.Option("--precisions", help="fp32,fp16,int8 for every provider without its own.")] = None,
        data: Annotated[Optional[str], typer.Option("--data", help="Inputs: .npz, a folder, or file.py:function.")] = None,
        input: Annotated[Optional[list[str]], typer.Option("--input", help="NAME:1x3x224x224:float32 for generated inputs.")] = None,
        batches: Annotated[int, typer.Option("--batches", callback=count(1, 100_000), help="Input batches.")] = 2,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", callback=batch, help="Samples per generated batch.")] = 2,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the generated inputs.")] = 0,
        save: Annotated[Optional[Path], typer.Option("--save-inputs", callback=output_file, help="Write the inputs used to this .npz (golden data).")] = None,
        load: Annotated[Optional[Path], typer.Option("--load-inputs", help="Use the inputs saved in this .npz.")] = None,
        atol: Annotated[Optional[float], typer.Option("--atol", callback=number(lo=0), help="Absolute tolerance (default: by precision).")] = None,
        rtol: Annotated[Optional[float], typer.Option("--rtol", callback=number(lo=0), help="Relative tolerance (default: by precision).")] = None,
        tol: Annotated[Optional[list[str]], typer.Option("--tol", help="NAME=ATOL[,RTOL] for one output, repeatable.")] = None,
        localize: Annotated[bool, typer.Option("--localize", help="On failure, find the first node whose output diverges.")] = False,
        chunk: Annotated[int, typer.Option("--chunk", callback=count(1, 100_000), help="Intermediate tensors compared at a time by --localize.")] = 32,
        json_out: Annotated[bool, typer.Option("--json", help="Print the matrix as JSON on stdout.")] = False,
    ) -> None:
        """Run a model on several providers and precisions and compare every output with a reference."""
        import numpy as np

        from onnxpipe.core.compare import Tolerance
        from onnxpipe.core.errors import CheckFailedError, InputError
        from onnxpipe.core.modelio import load_model
        from onnxpipe.pipeline.validation import validate as do_validate
        from onnxpipe.runtimes.validate import DEFAULTS, parse_targets

        console = console_for(json_out)
        targets = parse_targets(providers, precisions.split(",") if precisions else ())
        proto = load_model(model, load_external_data=False)  # sessions memory-map the weights
        default = None
        if atol is not None or rtol is not None:
            default = Tolerance(atol if atol is not None else DEFAULTS["fp32"].atol,
                                rtol if rtol is not None else DEFAULTS["fp32"].rtol)
        per_output = {}
        outputs = [o.name for o in proto.graph.output]
        for item in tol or []:
            name, sep, value = item.rpartition("=")
            if not sep or not name:
                raise InputError(f"cannot read --tol {item!r}", hint="write it as NAME=ATOL or NAME=ATOL,RTOL")
            if name not in outputs:
                raise InputError(f"--tol {item!r}: the model has no output {name!r}", hint=f"its outputs: {', '.join(outputs)}")
            try:
                per_output[name] = Tolerance.parse(value, default)
            except InputError as exc:
                raise InputError(f"--tol {item!r}: {exc.message}", hint=exc.hint) from None
        inputs = check_inputs(proto, data=data, load=load, batches=batches, batch_size=batch_size, seed=seed, specs=input)
        if not inputs or not any(np.size(a) for b in inputs for a in b.values()):
            raise InputError("validation needs at least one sample, received none", hint="check --data / --load-inputs")
        if save is not None:
            save_inputs(inputs, save)
        with model_runs(data):
            report = do_validate(proto, targets, inputs=inputs, reference=reference, tolerances=per_output,
                                 default=default, localize=localize, chunk=chunk)
        console.print(report.table())
        for row in report.rows:
            if row.localized:
                if row.localized.get("found"):
                    loc = row.localized
                    console.print(f"{row.target}: first divergence at node [bold]{escape(loc['node'])}[/] ({loc['op_type']}), "
                                  f"output {escape(loc['tensor'])}: max abs diff {loc['max_abs']:.3g} "
                                  f"(tensor {loc['position'] + 1} of {loc['of']}, {loc['compared']} compared)")
                else:
                    console.print(f"{row.target}: no divergent intermediate found: {escape(row.localized['why'])}")
        if json_out:
            print(json.dumps(report.as_dict(), indent=2))
        if not report.ok:
            bad = [r.target for r in report.rows if not r.ok]
            raise CheckFailedError(f"{', '.join(bad)} disagree(s) with {report.reference}",
                                   hint="see the matrix; --localize finds the first divergent node")

    @app.command()
    def bench(
        model: Annotated[Path, typer.Argument(help="An .onnx model.")],
        providers: Annotated[str, typer.Option("--providers", callback=device_list, help=DEVICES_HELP)] = "cpu",
        batch_sizes: Annotated[Optional[str], typer.Option("--batch-sizes", help="Batch sizes, e.g. 1,8,32 (default: the tuned ones, else 1).")] = None,
        threads: Annotated[Optional[str], typer.Option("--threads", help="CPU thread counts to try, e.g. 1,2,4.")] = None,
        dim: Annotated[Optional[list[str]], typer.Option("--dim", help="NAME=VALUE for a named symbolic dim, repeatable.")] = None,
        warmup: Annotated[int, typer.Option("--warmup", callback=count(0, 1_000_000), help="Untimed runs first.")] = 5,
        runs: Annotated[int, typer.Option("--runs", callback=count(1, 1_000_000), help="Timed runs at least.")] = 10,
        budget: Annotated[float, typer.Option("--budget", callback=number(0, 86400, lo_open=True), help="Seconds of timed runs per row.")] = 1.0,
        json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON on stdout.")] = False,
        config: Annotated[Optional[Path], typer.Option("--config", help=CONFIG_HELP)] = None,
        data: Annotated[Optional[str], typer.Option("--data", help="Inputs to time on (.npz, a folder, or file.py:function; "
                                                                   "its first batch is used): needed where random inputs "
                                                                   "are not valid, e.g. token ids or indices.")] = None,
    ) -> None:
        """Latency p50/p90/p99, throughput and FLOP/s (and fraction of peak) per provider, threads and batch."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        from onnxpipe.core.modelio import load_model
        from onnxpipe.runtimes.bench import bench as do_bench
        from onnxpipe.runtimes.providers import parse_devices

        console = console_for(json_out)
        counts: list[int | None] = list(int_list(threads, "--threads", hi=4096)) if threads else [None]
        devices = parse_devices(providers)
        default_sizes = "1"
        if config is not None:  # the tuned devices (every tuned setting is a device option) replace --providers
            from onnxpipe.runtimes.tuned import load_tuned

            tuned = load_tuned(config)
            devices = tuned.devices()  # type: ignore[assignment]
            default_sizes = ",".join(str(b) for b in sorted({e.batch_size for e in tuned.entries}))
        sizes = int_list(batch_sizes or default_sizes, "--batch-sizes")
        proto = load_model(model, load_external_data=False)  # sessions memory-map the weights
        dims = parse_dims(dim)
        check_dims(proto, dims)
        sample = sample_inputs(data, proto)
        total = sum(len(sizes) * (1 if (d.is_gpu or d.options.threads) else len(counts)) for d in devices)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console_for(True), transient=True) as progress:
            task = progress.add_task("benchmarking", total=total)
            with model_runs(data):
                report = do_bench(proto, devices, batch_sizes=sizes, threads=counts, dims=dims, warmup=warmup,
                                  min_runs=runs, budget_s=budget, on_row=lambda row: progress.advance(task),
                                  inputs=sample)
        report.model = str(model)
        console.print(report.table())
        for note in report.notes:
            console.print(f"[dim]note: {escape(note)}[/]")
        if json_out:
            print(json.dumps(report.as_dict(), indent=2))
