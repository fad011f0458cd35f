"""tune vs ONNX Runtime's defaults: chosen setup, speedup, and an independent side-by-side re-check.

For every model: ``tune`` within its budget (the time it took is printed beside the budget), then
fresh sessions of the default and of the tuned setup are timed again in alternating rounds, so
the claim is checked by a measurement the search never saw. "never slower" holds when the
re-check ratio (tuned / default) is not above 1 beyond its noise.

Models: the zoo (converted here) and the onnx wheel's resnet50 (generated weights, simplified).

    python benchmarks/tune.py [--only digits_cnn,resnet50] [--budget-s 20] [--objective latency] [--devices cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxpipe.runtimes.device_session import DeviceSession
from onnxpipe.runtimes.tune import tune, tune_feeds
from onnxpipe.runtimes.tune_measure import duel, median_ms

ROOT = Path(__file__).resolve().parent.parent

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
ZOO = ("digits_cnn", "keras_digits", "tiny_transformer")


def models(only: set[str] | None):
    tmp = Path(tempfile.mkdtemp(prefix="onnxpipe-tune-bench-"))
    for name in ZOO:
        if only and name not in only:
            continue
        from onnxpipe.converter import convert

        yield name, convert(f"{ROOT}/models/{name}/model.py:build", tmp / f"{name}.onnx").model
    if not only or "resnet50" in only:
        from onnxpipe.passes.base import PassContext
        from onnxpipe.passes.simplify import Simplify
        from onnxpipe.pipeline.stages import generated_inputs

        raw = onnx.load(str(LIGHT / "light_resnet50.onnx"))
        ctx = PassContext(check_inputs=generated_inputs(raw, batches=1, batch=1), workdir=tmp)
        yield "resnet50", Simplify({}).apply(raw, ctx).model


def recheck(model: onnx.ModelProto, default, chosen, batch: int, seconds: float):
    """Fresh sessions, alternating rounds: (ratio tuned/default, noise, default ms, tuned ms)."""
    feeds = tune_feeds(model, batch, {}, 123)
    with DeviceSession(model, default) as a, DeviceSession(model, chosen) as b:
        for s in (a, b):
            for _ in range(3):
                s.run(feeds)
        one = median_ms(lambda: a.run(feeds), 3)
        runs = max(1, min(100, int(25 / max(one, 1e-3))))
        rounds = max(9, min(61, int(seconds / (2 * runs * one / 1e3))))
        d = duel(lambda: a.run(feeds), lambda: b.run(feeds), runs=runs, min_rounds=9, max_rounds=rounds, worse=float("inf"))
    return d.ratio, d.noise, d.a_median, d.b_median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--budget-s", type=float, default=20.0)
    parser.add_argument("--recheck-s", type=float, default=4.0)
    parser.add_argument("--objective", default="latency", choices=["latency", "throughput"])
    parser.add_argument("--devices", default="cpu")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    console = Console(width=220)
    t = Table(title=f"tune vs default ({args.objective}, budget {args.budget_s:g} s per model; "
                    f"re-check: fresh sessions, alternating rounds)")
    for col in ("model", "device", "chosen setup", "batch", "tried", "rejected", "tune s", "within budget",
                "default ms", "tuned ms", "reported", "re-check tuned/default", "never slower"):
        t.add_column(col, justify="left" if col in ("model", "device", "chosen setup") else "right")
    failures = 0
    for name, model in models(only):
        start = time.perf_counter()
        report = tune(model, args.devices.split(","), objective=args.objective, budget_s=args.budget_s)
        took = time.perf_counter() - start
        for d in report.devices:
            if str(d.chosen) == str(d.default):  # the default was kept: nothing to re-check
                ratio, noise, dms, tms = recheck(model, d.default, d.default, d.batch, args.recheck_s)
                ratio, noise = 1.0, 0.0
            else:
                ratio, noise, dms, tms = recheck(model, d.default, d.chosen, d.batch, args.recheck_s)
            ok = ratio <= 1 + max(0.02, 2 * noise)
            within = took <= args.budget_s * 1.1 + 1.0
            failures += (not ok) + (not within)
            t.add_row(name, d.default.label, escape(str(d.chosen)), str(d.batch), str(len(d.trials) - 1),
                      str(sum(x.status == "rejected" for x in d.trials)), f"{took:.1f}",
                      "[green]yes[/]" if within else "[red]no[/]", f"{dms:.3f}", f"{tms:.3f}",
                      f"{d.speedup:.2f}x" + ("" if d.significant else " (default kept)"),
                      f"{ratio:.3f} ± {noise:.3f}", "[green]yes[/]" if ok else "[red]NO[/]")
        console.print(f"{name}: done in {took:.1f} s")
    console.print(t)
    if failures:
        console.print(f"[red]{failures} check(s) failed[/]")
        sys.exit(1)


if __name__ == "__main__":
    main()
