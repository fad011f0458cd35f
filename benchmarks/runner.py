"""Batch-runner overhead, side by side in one run: the runner's workers vs bare ONNX Runtime session loops.

Measures, on the same model and data, with every session at one intra-op thread:

- ``bare x1``: one ORT session looping over the micro-batches in this process;
- ``bare x2``: two such loops at once in two processes (the sum of the bare sessions'
  throughput on two devices, measured together so they share memory bandwidth and clocks
  as the workers do);
- ``runner x1``: ``BatchRunner`` with one ``cpu`` worker;
- ``runner x2``: ``BatchRunner`` with two ``cpu`` workers.

Rounds are interleaved (bare, runner, bare, runner, ...) and the median is reported, so
background load hits every variant alike. The outcome to reach: ``runner xN / bare xN >= 0.9``.

    python benchmarks/runner.py [--samples 2048] [--batch-size 32] [--rounds 3] [--model m.onnx] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def cnn(channels: int = 32, size: int = 32) -> onnx.ModelProto:
    """x[N,3,size,size] -> 2 x (Conv3x3 + Relu) -> GlobalAveragePool -> Gemm(10): ~21 MFLOPs per sample."""
    rng = np.random.default_rng(0)

    def init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "bench_cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [init("w1", (channels, 3, 3, 3)), init("b1", (channels,)),
                               init("w2", (channels, channels, 3, 3)), init("b2", (channels,)),
                               init("fw", (10, channels)), init("fb", (10,))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def bare_loop(model_path: str, x: np.ndarray, batch: int) -> tuple[float, int]:
    """Seconds for one 1-thread session over ``x`` in micro-batches (outputs kept, as the runner does)."""
    from onnxpipe.core.session import Session

    with Session(model_path, threads=1) as s:
        s.session.run(None, {"x": x[:batch]})
        outs = []
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            outs.append(s.session.run(None, {"x": x[i:i + batch]})[0])
        return time.perf_counter() - start, sum(len(o) for o in outs)


def _bare_child(model_path: str, x: np.ndarray, batch: int, barrier: mp.Barrier, queue: mp.Queue) -> None:
    from onnxpipe.core.session import Session

    with Session(model_path, threads=1) as s:
        s.session.run(None, {"x": x[:batch]})
        barrier.wait()
        start = time.time()
        for i in range(0, len(x), batch):
            s.session.run(None, {"x": x[i:i + batch]})
        queue.put((start, time.time()))


def bare_parallel(model_path: str, x: np.ndarray, batch: int, n: int) -> float:
    """Wall seconds for ``n`` bare loops in ``n`` processes, each over its share of ``x``, started together."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    # split at batch boundaries so both sides run the same micro-batches as the runner
    cuts = np.array_split(np.arange(0, len(x), batch), n)
    procs = [ctx.Process(target=_bare_child, args=(model_path, x[c[0]:(c[-1] + batch)] if len(c) else x[:0], batch,
                                                   barrier, queue)) for c in cuts]
    for p in procs:
        p.start()
    spans = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return max(e for _, e in spans) - min(s for s, _ in spans)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an .onnx model with one float input x[N,...] (default: a generated CNN)")
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from onnxpipe.core.modelio import load_model
    from onnxpipe.core.tensors import concrete_shape, graph_inputs
    from onnxpipe.runtimes.batch import BatchRunner

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or str(Path(tmp) / "cnn.onnx")
        if not args.model:
            onnx.save(cnn(), path)
        info = graph_inputs(load_model(path))[0]
        shape = concrete_shape(info, args.samples)
        x = np.random.default_rng(0).standard_normal(shape).astype(info.dtype)
        n, b = args.samples, args.batch_size
        times: dict[str, list[float]] = {k: [] for k in ("bare x1", "bare x2", "runner x1", "runner x2")}
        with BatchRunner(path, ["cpu:0[threads=1]"], batch_size=b) as one, \
                BatchRunner(path, ["cpu:0[threads=1]", "cpu:1[threads=1]"], batch_size=b) as two:
            ref = one.run({info.name: x}).outputs  # warm-up, and the outputs must agree
            for _ in range(args.rounds):
                times["bare x1"].append(bare_loop(path, x, b)[0])
                times["runner x1"].append(one.run({info.name: x}).seconds)
                times["bare x2"].append(bare_parallel(path, x, b, 2))
                result = two.run({info.name: x})
                times["runner x2"].append(result.seconds)
                for k, v in result.outputs.items():
                    assert np.array_equal(v, ref[k]), f"output {k} differs between runners"
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    doc = {"samples": n, "batch_size": b, "rounds": args.rounds, "model": args.model or "generated CNN 3x32x32",
           "samples_per_s": rate, "seconds": times,
           "ratios": {"runner x1 / bare x1": rate["runner x1"] / rate["bare x1"],
                      "runner x2 / bare x2": rate["runner x2"] / rate["bare x2"],
                      "runner x2 / (2 x bare x1)": rate["runner x2"] / (2 * rate["bare x1"]),
                      "runner x2 / runner x1": rate["runner x2"] / rate["runner x1"]}}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    t = Table(title=f"{n} samples, micro-batch {b}, 1 thread per session, median of {args.rounds} interleaved rounds")
    for col in ("variant", "samples/s", "seconds (each round)"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for k, v in times.items():
        t.add_row(k, f"{rate[k]:,.0f}", " ".join(f"{s:.3f}" for s in v))
    Console().print(t)
    r = Table(title="ratios (target: runner xN / bare xN >= 0.9)")
    r.add_column("ratio")
    r.add_column("value", justify="right")
    for k, v in doc["ratios"].items():
        r.add_row(k, f"{v:.3f}")
    Console().print(r)


if __name__ == "__main__":
    main()
