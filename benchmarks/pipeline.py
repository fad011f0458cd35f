"""Pipeline parallelism, side by side in one run: a 2-stage split vs the whole model on one device.

For a zoo model (digits CNN) and the ``onnx`` wheel's resnet50 (weights materialized by our
simplify), measured together:

- the split's outputs against the whole model's (the pass tolerance, atol 1e-4 / rtol 1e-3);
- peak resident memory (VmHWM) of each stage's worker against the whole model's worker, for a
  split balanced by weight bytes (``params``): outcome to reach, each stage <= 0.65x;
- throughput of the pipeline on 2 CPU devices with 1 thread each against one device running
  the whole model with 1 thread, for a split balanced by FLOPs: outcome to reach >= 1.6x.

Rounds are interleaved (whole, pipeline, whole, ...) and medians reported, so background load
hits both alike.

    python benchmarks/pipeline.py [--samples 24] [--rounds 3] [--models resnet50,digits] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

THREAD1 = "cpu:{}[threads=1]"


def resnet50(work: Path) -> Path:
    """The onnx wheel's light resnet50 with its ConstantOfShape weights materialized."""
    from onnxpipe.passes.base import PassContext
    from onnxpipe.passes.simplify import Simplify

    out = work / "resnet50.onnx"
    src = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"
    onnx.save(Simplify({}).apply(onnx.load(str(src)), PassContext()).model, out)
    return out


def digits(work: Path) -> Path:
    from onnxpipe.converter import convert

    out = work / "digits.onnx"
    convert("models/digits_cnn/model.py:build", out)
    return out


def vm_hwm(pid: int | None) -> int:
    """Peak resident set of a process, in bytes (Linux /proc)."""
    if pid is None:
        return 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def one_run(runner_factory, data: dict) -> tuple[float, list[int], dict]:
    """(samples per second, peak RSS per worker, outputs) of one fresh runner over ``data``."""
    with runner_factory() as runner:
        result = runner.run(data)
        peaks = [vm_hwm(w.pid) for w in runner.pool.workers]
    return result.throughput, peaks, result.outputs


def measure(name: str, path: Path, samples: int, rounds: int, work: Path) -> dict:
    from onnxpipe.core.compare import compare
    from onnxpipe.core.inputs import random_input
    from onnxpipe.core.tensors import graph_inputs
    from onnxpipe.partition.split import split_model
    from onnxpipe.runtimes.batch import BatchRunner
    from onnxpipe.runtimes.pipeline_parallel import PipelineRunner

    model = onnx.load(str(path))
    info = graph_inputs(model)[0]
    shape = [samples] + [d if isinstance(d, int) and d > 0 else 1 for d in info.shape[1:]]
    data = {info.name: random_input(info, shape, np.random.default_rng(0))}
    splits = {b: split_model(path, work / f"{name}-{b}", parts=2, balance=b) for b in ("flops", "params")}
    rows: dict[str, list] = {"whole": [], "flops": [], "params": []}
    outputs = {}
    for _ in range(rounds):
        rows["whole"].append(one_run(lambda: BatchRunner(path, [THREAD1.format(0)], batch_size=8), data))
        for b in ("flops", "params"):
            rows[b].append(one_run(lambda b=b: PipelineRunner(work / f"{name}-{b}", [THREAD1.format(0), THREAD1.format(1)],
                                                              batch_size=8), data))
    for key, runs in rows.items():
        outputs[key] = runs[-1][2]
    whole_tp = statistics.median(r[0] for r in rows["whole"])
    whole_rss = statistics.median(r[1][0] for r in rows["whole"])
    out = {"model": name, "samples": samples, "rounds": rounds, "whole": {"samples_per_s": whole_tp, "peak_rss": whole_rss}}
    for b in ("flops", "params"):
        tp = statistics.median(r[0] for r in rows[b])
        rss = [statistics.median(r[1][k] for r in rows[b]) for k in range(2)]
        diffs = [compare(k, outputs[b][k], outputs["whole"][k], atol=1e-4, rtol=1e-3) for k in outputs["whole"]]
        parts = splits[b].spec.parts
        out[b] = {"samples_per_s": tp, "speedup": tp / whole_tp, "peak_rss": rss,
                  "rss_ratio": [r / whole_rss for r in rss], "equal": all(d.ok for d in diffs),
                  "max_abs_diff": max(d.max_abs for d in diffs), "weight_bytes": [p.weight_bytes for p in parts],
                  "flops_share": [p.flops / max(1, sum(q.flops for q in parts)) for p in parts],
                  "sent_bytes": parts[0].sent_bytes}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="resnet50,digits")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    builders = {"resnet50": resnet50, "digits": digits}
    results = []
    with tempfile.TemporaryDirectory(prefix="onnxpipe-bench-pp-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            t0 = time.perf_counter()
            path = builders[name](work)
            print(f"{name}: built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            results.append(measure(name, path, args.samples if name == "resnet50" else args.samples * 64,
                                   args.rounds, work))
    console = Console(stderr=args.json, width=160)
    t = Table(title=f"2-stage pipeline (cpu:0,cpu:1, 1 thread each) vs the whole model on cpu:0 (1 thread); "
                    f"medians of {args.rounds} interleaved rounds; {os.cpu_count()} CPUs here")
    for col in ("model", "split", "equal (max abs)", "FLOPs share", "weights per stage", "sent/sample",
                "samples/s", "speedup (>=1.6)", "peak RSS per stage", "RSS ratio (<=0.65)"):
        t.add_column(col, justify="left" if col in ("model", "split") else "right")
    mb = 1 << 20
    for r in results:
        w = r["whole"]
        t.add_row(r["model"], "whole", "-", "100%", "-", "-", f"{w['samples_per_s']:.1f}", "1.00x",
                  f"{w['peak_rss'] / mb:.0f} MiB", "1.00")
        for b in ("flops", "params"):
            s = r[b]
            t.add_row("", f"by {b}", f"{'yes' if s['equal'] else 'NO'} ({s['max_abs_diff']:.2g})",
                      " / ".join(f"{x:.0%}" for x in s["flops_share"]),
                      " / ".join(f"{x / mb:.1f}M" for x in s["weight_bytes"]), f"{s['sent_bytes'] / 1024:.0f} KiB",
                      f"{s['samples_per_s']:.1f}", f"{s['speedup']:.2f}x",
                      " / ".join(f"{x / mb:.0f} MiB" for x in s["peak_rss"]),
                      " / ".join(f"{x:.2f}" for x in s["rss_ratio"]))
    console.print(t)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
