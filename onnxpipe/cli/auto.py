"""``onnxpipe auto``: search candidate pipelines on the target device and keep the best."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from onnxpipe.cli._common import console_for


def register(app: typer.Typer) -> None:
    @app.command()
    def auto(
        model: Annotated[str, typer.Argument(help="A model: .onnx, file.py:build, a SavedModel ... (as convert takes).")],
        output: Annotated[Path, typer.Option("-o", "--output", help="Folder for model.onnx, recipe.yaml, tuned.json, "
                                                                   "leaderboard.json/.md/.png.")],
        device: Annotated[str, typer.Option(help="Where to measure: cpu, cpu:0[threads=2], cuda:0, tensorrt:0.")] = "cpu",
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Samples per timed run.")] = 1,
        objective: Annotated[str, typer.Option(help="latency, throughput or size.")] = "latency",
        data: Annotated[Optional[str], typer.Option(help="Calibration data: .npz, a folder, or file.py:function "
                                                         "(enables static int8 and prune's reconstruction).")] = None,
        eval_data: Annotated[Optional[str], typer.Option("--eval", help="Evaluation data with labels: .npz with "
                                                                        "'labels', or file.py:function.")] = None,
        metric: Annotated[Optional[str], typer.Option(help="top1, top5 or file.py:function (with --eval; "
                                                           "default: top1). Without --eval: cosine vs float.")] = None,
        max_drop: Annotated[float, typer.Option("--max-drop", help="Largest metric drop from the float model.")] = 0.01,
        budget_s: Annotated[float, typer.Option("--budget-s", help="Seconds for the whole search.")] = 300.0,
        rounds: Annotated[int, typer.Option(help="Interleaved timing rounds per candidate.")] = 5,
    ) -> None:
        """Try pipelines of our passes on the device, measured side by side; write the best and a leaderboard."""
        from onnxpipe.core.errors import InputError
        from onnxpipe.pipeline.auto import auto as do_auto

        if batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, received {batch_size}", hint="e.g. --batch-size 8")
        if rounds < 2:
            raise InputError(f"--rounds must be >= 2, received {rounds}", hint="e.g. --rounds 5")
        console = console_for()
        result = do_auto(model, output, device=device, batch_size=batch_size, objective=objective, data=data,
                         evaluation=eval_data, metric=metric, max_drop=max_drop, budget_s=budget_s, rounds=rounds,
                         console=console)
        w, b = result.winner, result.baseline
        console.print(f"winner: {w.name}" + (f" ({1 / w.ratio:.2f}x the speed of {b.name}" if w.ratio else "")
                      + (f", {w.size_bytes / b.size_bytes:.2f}x its size)" if w.size_bytes and b.size_bytes else ")")
                      + f"; {len(result.candidates)} candidates in {result.elapsed_s:.1f} s -> {output}")
