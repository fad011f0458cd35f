"""``onnxpipe serve`` (an Open Inference Protocol server) and ``export-triton`` (a Triton model repository)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from onnxpipe.cli._checks import MAX_BATCH, count, device_list, model_name, number, one_of, output_dir
from onnxpipe.cli._common import console_for
from onnxpipe.cli.runtime import CONFIG_HELP

DEVICES_HELP = ("Devices, comma-separated; every model gets a worker on each: cpu, cpu:0,cpu:1, cuda:0,cuda:1, "
                "tensorrt:0[fp16,cache_dir=trt].")


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        model: Annotated[Path, typer.Argument(help="An .onnx model, or a directory of them (NAME.onnx, NAME/model.onnx "
                                                   "or a Triton repository NAME/1/model.onnx).")],
        name: Annotated[str | None, typer.Option("--name", help="Model name in URLs (default: the file's stem).")] = None,
        devices: Annotated[str, typer.Option("--devices", callback=device_list, envvar="ONNXPIPE_DEVICES", help=DEVICES_HELP)] = "cpu",
        host: Annotated[str, typer.Option("--host", help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", callback=count(0, 65535), help="Port (0 picks a free one).")] = 8000,
        max_batch_size: Annotated[int | None, typer.Option("--max-batch-size", callback=count(1, MAX_BATCH), help="Most samples per batch (1: no dynamic batching; "
                                                                                   "default: the tuned batch size with --config, else 32).")] = None,
        max_queue_delay_ms: Annotated[float, typer.Option("--max-queue-delay-ms", callback=number(0, 60_000), help="Longest wait for a batch to fill once a device is free.")] = 2.0,
        max_body_mb: Annotated[float, typer.Option("--max-body-mb", callback=number(0, 1 << 20, lo_open=True), help="Largest request body, in MiB (also "
                                                   "bounds what decoding it may take).")] = 64.0,
        max_queue: Annotated[int, typer.Option("--max-queue", callback=count(1, 1 << 24), help="Requests waiting per model before new ones get 503.")] = 2048,
        workers: Annotated[int | None, typer.Option("--workers", callback=count(1, 4096), help="With --devices cpu: worker processes "
                                                    "per model (default: sized to the cores, one wide worker or one per "
                                                    "core, whichever serves the model faster; cpu[threads=N] sets threads).")] = None,
        config: Annotated[Path | None, typer.Option("--config", help=CONFIG_HELP + " They replace --devices.")] = None,
        grpc_port: Annotated[int | None, typer.Option("--grpc-port", callback=count(0, 65535), help="Also serve the protocol over gRPC on this port "
                                                                          "(0 picks a free one; default: HTTP only).")] = None,
        api_key_file: Annotated[Path | None, typer.Option("--api-key-file", help="A file whose first line is the API key every "
                                                                                 "request but health must send as 'Authorization: Bearer <key>' "
                                                                                 "(default: the ONNXPIPE_API_KEY environment variable).")] = None,
        insecure: Annotated[bool, typer.Option("--insecure", help="Allow a --host beyond loopback without an API key.")] = False,
        model_control: Annotated[str, typer.Option("--model-control", callback=one_of("none", "explicit", "poll"), help="none: serve what is found at start; explicit: "
                                                                           "clients load/unload through the repository API; poll: "
                                                                           "also follow the directory's changes.")] = "none",
        load_model: Annotated[list[str] | None, typer.Option("--load-model", help="With --model-control explicit: a model "
                                                                                  "to load at start (repeatable; '*': all).")] = None,
        poll_secs: Annotated[float, typer.Option("--repository-poll-secs", callback=number(0, 86400, lo_open=True), help="With --model-control poll: seconds "
                                                                               "between scans of the directory.")] = 15.0,
        header_timeout_s: Annotated[float, typer.Option("--header-timeout-s", callback=number(0, 86400, lo_open=True), help="Time a connection has to send its "
                                                        "headers (slow clients are cut off).")] = 15.0,
        body_timeout_s: Annotated[float, typer.Option("--body-timeout-s", callback=number(0, 86400, lo_open=True), help="Time to receive a request body.")] = 60.0,
        max_restarts: Annotated[int, typer.Option("--max-restarts", callback=count(0, 1_000_000), help="Restarts of a device worker within "
                                                  "--restart-window-s before its next restart waits.")] = 5,
        restart_window_s: Annotated[float, typer.Option("--restart-window-s", callback=number(0, 86400, lo_open=True), help="The window --max-restarts counts in.")] = 60.0,
    ) -> None:
        """Serve models over HTTP (KServe v2 / Open Inference Protocol, as Triton and KServe speak it)."""
        import asyncio
        import logging

        from onnxpipe.core.deps import require
        from onnxpipe.core.errors import InputError

        require("aiohttp")
        if grpc_port is not None:
            require("grpc")
        from onnxpipe.runtimes.providers import parse_devices
        from onnxpipe.serve.repository import discover
        from onnxpipe.serve.server import (
            InferenceServer,
            ServeOptions,
            serve_until_stopped,
        )

        if config is not None:  # the tuned devices replace --devices; the tuned batch is the default largest batch
            from onnxpipe.runtimes.tuned import load_tuned

            tuned = load_tuned(config)
            devs = tuned.devices()
            max_batch_size = tuned.batch_size() if max_batch_size is None else max_batch_size
        else:
            devs = parse_devices(devices)
        max_batch_size = 32 if max_batch_size is None else max_batch_size
        if model_control != "none" and not model.is_dir():
            raise InputError(f"--model-control {model_control} needs a directory of models, not {model}",
                             hint="give the repository folder, or leave --model-control at none")
        from onnxpipe.serve.security import check_bind, load_api_key

        api_key = load_api_key(api_key_file)
        check_bind(host, api_key, insecure)
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        console = console_for(False)
        from onnxpipe.serve.repository import scan

        # with model control an empty repository is a start: models arrive later (load, or poll)
        entries = [] if model_control != "none" and model.is_dir() and not scan(model) else discover(model, name)
        options = ServeOptions(host=host, port=port, max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
                               max_body_bytes=int(max_body_mb * (1 << 20)), max_queue=max_queue, grpc_port=grpc_port,
                               api_key=api_key, insecure=insecure, model_control=model_control,
                               load_models=tuple(load_model or ["*"]) if model_control != "explicit" else tuple(load_model or ()),
                               poll_seconds=poll_secs, header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s,
                               max_restarts=max_restarts, restart_window_s=restart_window_s, cpu_workers=workers)
        table = Table(title=f"models on {', '.join(d.label for d in devs)}")
        for col in ("model", "version", "inputs", "outputs", "dynamic batching"):
            table.add_column(col)
        for e in entries:
            table.add_row(e.name, e.version, escape(", ".join(f"{i.name} {i.dtype} {i.shape_str()}" for i in e.inputs)),
                          escape(", ".join(f"{o.name} {o.dtype} {o.shape_str()}" for o in e.outputs)),
                          f"up to {max_batch_size}" if e.batchable and max_batch_size > 1 else
                          f"no ({', '.join(e.cross_sample)} mixes samples)" if e.cross_sample else "no")
        console.print(table)

        server = InferenceServer(entries, devs, options, source=model)

        def ready(url: str) -> None:
            if host not in ("127.0.0.1", "localhost", "::1"):
                console.print(f"[yellow]note[/]: listening on {escape(host)}: reachable from other machines"
                              + ("" if api_key else " [bold]without an API key[/] (--insecure)"))
            if server.grpc_address:
                print(f"grpc on {server.grpc_address}", flush=True)
            for m in server.models.values():
                if m.layout is not None:
                    print(f"{m.entry.name}: CPU pool of {m.layout.describe()}", flush=True)
            # one plain line that scripts (and tests) wait for
            print(f"serving on {url} (metrics: {url}/metrics; Ctrl-C stops)", flush=True)

        asyncio.run(serve_until_stopped(server, ready))

    @app.command("export-triton")
    def export_triton(
        model: Annotated[Path, typer.Argument(help="An .onnx model.")],
        output: Annotated[Path, typer.Option("-o", "--output", callback=output_dir, help="The model repository folder.")],
        name: Annotated[str, typer.Option("--name", callback=model_name, help="Model name (folder in the repository).")],
        devices: Annotated[str, typer.Option("--devices", callback=device_list, help="Instance groups: cpu, cuda:0,cuda:1, or "
                                                               "tensorrt:0,tensorrt:1[fp16,cache_dir=/trt] for the TensorRT accelerator.")] = "cpu",
        max_batch_size: Annotated[int, typer.Option("--max-batch-size", callback=count(0, MAX_BATCH), help="Triton's max_batch_size (0: no batching).")] = 32,
        max_queue_delay_ms: Annotated[float, typer.Option("--max-queue-delay-ms", callback=number(0, 60_000), help="Dynamic batching's queue delay.")] = 2.0,
        instances: Annotated[int, typer.Option("--instances", callback=count(1, 1024), help="Model instances per device.")] = 1,
        version: Annotated[int, typer.Option("--version", callback=count(1, 1 << 31), help="Version folder to write.")] = 1,
    ) -> None:
        """Write a Triton model repository: NAME/VERSION/model.onnx and NAME/config.pbtxt."""
        from onnxpipe.serve.repository import discover
        from onnxpipe.serve.triton import export_triton as do_export

        console = console_for(False)
        path = do_export(model, output, name, devices=devices, max_batch_size=max_batch_size,
                         max_queue_delay_ms=max_queue_delay_ms, version=version, instances=instances)
        console.print(escape(path.read_text()), end="")
        entry = discover(path.parent / str(version) / "model.onnx", name)[0]
        if entry.cross_sample and max_batch_size > 1:
            console.print(f"[yellow]note[/]: no dynamic_batching: {', '.join(entry.cross_sample)} quantizes each batch "
                          "as a whole, so a request's result would depend on its neighbours")
        console.print(f"wrote {escape(str(path.parent / str(version) / 'model.onnx'))} and {escape(str(path))}")
