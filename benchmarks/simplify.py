"""simplify vs onnxsim alone vs onnxslim alone vs ORT basic: nodes, size and time, side by side.

Models: the zoo (converted here) and the real architectures the `onnx` wheel ships under
onnx/backend/test/data/light/ (generated weights). Every result is checked against the input
model on the same random inputs; a row marked "differs" would be a bug.

    python benchmarks/simplify.py [--only resnet50,squeezenet] [--skip-zoo]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import onnx
from rich.console import Console
from rich.table import Table

from onnxpipe.core.compare import compare_runs, outputs_on
from onnxpipe.passes.base import PassContext
from onnxpipe.passes.simplify import Simplify, count_nodes
from onnxpipe.pipeline.stages import generated_inputs

ROOT = Path(__file__).resolve().parent.parent

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
ZOO = ("digits_cnn", "keras_digits", "tiny_transformer")


def models(only: set[str] | None, zoo: bool):
    if zoo:
        from onnxpipe.converter import convert

        tmp = Path(tempfile.mkdtemp(prefix="onnxpipe-bench-"))
        for name in ZOO:
            if only and name not in only:
                continue
            yield name, convert(f"{ROOT}/models/{name}/model.py:build",
                                tmp / f"{name}.onnx").model
    for path in sorted(LIGHT.glob("light_*.onnx")):
        name = path.stem.removeprefix("light_")
        if only and name not in only:
            continue
        yield name, onnx.load(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--skip-zoo", action="store_true")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    console = Console(width=200)
    variants = {
        "onnxsim": Simplify({"skip": ["onnxslim", "ort"], "max_rounds": 1}),
        "onnxslim": Simplify({"skip": ["onnxsim", "ort"], "max_rounds": 1}),
        "ort basic": Simplify({"skip": ["onnxsim", "onnxslim"], "max_rounds": 1}),
        "onnxpipe": Simplify(),
    }
    table = Table(title="simplify: nodes / size / seconds (every result checked against the input)")
    table.add_column("model")
    table.add_column("input", justify="right")
    for v in variants:
        table.add_column(v, justify="right")
    table.add_column("onnxpipe <= best single?", justify="center")
    for name, model in models(only, not args.skip_zoo):
        inputs = generated_inputs(model)
        reference = outputs_on(model, inputs)
        cells, nodes = [], {}
        for label, p in variants.items():
            start = time.perf_counter()
            # the variants return the input unchanged when their backend cannot beat it;
            # a variant with no passing candidate shows the input's count
            result = p.apply(model, PassContext(check_inputs=inputs))
            seconds = time.perf_counter() - start
            ok = all(c.ok for c in compare_runs(reference, outputs_on(result.model, inputs), atol=1e-4, rtol=1e-3))
            n = count_nodes(result.model)
            nodes[label] = n
            size = result.model.ByteSize() / 1e6
            cells.append(f"{n} / {size:.1f} MB / {seconds:.1f}s" + ("" if ok else " [red]differs[/]"))
        best_single = min(nodes["onnxsim"], nodes["onnxslim"])
        verdict = "[green]yes[/]" if nodes["onnxpipe"] <= best_single else "[red]NO[/]"
        table.add_row(name, str(count_nodes(model)), *cells, verdict)
        console.print(f"{name}: done", style="dim")
    console.print(table)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
