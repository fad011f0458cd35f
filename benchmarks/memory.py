"""Peak memory of onnxpipe's commands on a model bigger than protobuf's 2 GB limit, side by side.

Builds (once, streamed to disk a layer at a time) a chain of MatMul + Tanh layers whose float32
weights total ``--gb`` GB (default 3.2), kept in one external data file, then runs each command
as a subprocess and samples the resident memory of its whole process tree (the command and every
worker it starts) every 20 ms from /proc. Each peak is reported as a ratio to the weight bytes,
beside the issue's target:

| command | target |
|---|---|
| ``inspect`` and ``inspect --memory`` | <= 0.1x |
| ``split --max-part-bytes 1GB`` | <= 1.5x, every part <= 1 GB, parts in sequence == whole (1e-4) |
| ``infer`` with one worker | <= 1.3x |
| ``infer`` of the parts on ``cpu:0,cpu:1`` | same outputs as the whole model |
| ``optimize`` with simplify, quantize int4 and strip | <= 1.5x |
| ``optimize`` with fp16 | <= 1.5x |
| ``optimize`` with quantize dynamic (int8) | <= 1.5x |
| ``convert`` of a transformers decoder folder (``benchmarks/memory_convert.py``, ``--convert-gb 2.6``) | <= 2.5x, the ONNX model loads and matches |

``optimize`` loads the model without its weights: simplify works on the graph with the large
weights as inputs, int4 and dynamic int8 quantize one weight at a time, fp16 converts one weight at
a time, strip renames, and the check after each pass runs sessions that memory-map the data. The chain of tanh layers loses accuracy at 4 bits
layer after layer (a cosine near 0.95 after 24 layers, with no residual path to carry the signal),
so the quantize check is given ``min_cosine: 0.9``: the row measures memory, not this toy's accuracy.

    python benchmarks/memory.py [--gb 3.2] [--workdir /tmp/onnxpipe-memory] [--keep] [--json]

Needs about 3x ``--gb`` of free disk (the model, the parts, outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

D = 4096


def build(path: Path, gb: float) -> int:
    """Write the model layer by layer (never more than one weight in memory); returns weight bytes."""
    layer_bytes = D * D * 2 * 4  # alternating [D, 2D] and [2D, D] weights
    layers = max(2, int(round(gb * 1e9 / layer_bytes)))
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = f"{path.name}.data"
    rng = np.random.default_rng(0)
    nodes, inits, x, total = [], [], "x", 0
    with open(path.parent / data_name, "wb") as data:
        for i in range(layers):
            shape = (D, 2 * D) if i % 2 == 0 else (2 * D, D)
            w = ((rng.random(shape, dtype=np.float32) - 0.5) * np.float32(2.0 / np.sqrt(shape[0]))).astype(np.float32)
            offset = data.tell()
            data.write(w.tobytes())
            total += w.nbytes
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=list(shape),
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            inits.append(t)
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [f"h{i}"])]
            x = f"h{i}"
            del w
    out_dim = D if layers % 2 == 0 else 2 * D
    graph = helper.make_graph(nodes, "big_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", out_dim])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return total


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
        stack.extend(children.get(pid, []))
    return total


def peak_of(cmd: list[str], cwd: Path) -> tuple[int, float, subprocess.CompletedProcess]:
    """Run ``cmd``; its process tree's peak resident bytes, seconds, and the finished process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    done.set()
    t.join()
    return peak[0], time.perf_counter() - start, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def measure(name: str, cmd: list[str], weights: int, target: float | None
            ) -> tuple[dict, subprocess.CompletedProcess]:
    """Run ``cmd`` under the sampler: its row (peak, ratio to ``weights``, seconds, exit, the last error line)
    and the finished process. The caller sets ``row["ok"]`` and prints it with :func:`print_row`."""
    peak, seconds, proc = peak_of(cmd, Path.cwd())
    row = {"command": name, "peak_bytes": peak, "ratio": peak / weights, "target": target,
           "seconds": round(seconds, 1), "exit": proc.returncode}
    if proc.returncode != 0:
        row["note"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
    return row, proc


def print_row(row: dict) -> None:
    target = row["target"]
    print(f"{row['command']:44s} peak {row['peak_bytes'] / 1e9:6.2f} GB  {row['ratio']:5.2f}x weights  target "
          f"{'-' if target is None else f'<= {target}x'}  {row['seconds']:6.1f} s  {'ok' if row['ok'] else 'MISSED'}"
          + (f"  ({row['note']})" if "note" in row else ""), flush=True)


def finish(rows: list[dict], weights: int, work: Path, *, as_json: bool, keep: bool) -> None:
    """Print the rows as JSON when asked (with the CPU), and remove the work folder unless kept."""
    from onnxpipe.core.hardware import cpu

    if as_json:
        print(json.dumps({"weights_bytes": weights, "cpu": cpu().model, "rows": rows}, indent=2))
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


def read_outputs(folder: Path) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for shard in sorted(folder.glob("shard-*.npz")):
        with np.load(shard) as z:
            for k in z.files:
                if not k.startswith("_"):
                    parts.setdefault(k, []).append(z[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=3.2, help="float32 weight gigabytes (1e9) of the model")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/onnxpipe-memory"))
    ap.add_argument("--keep", action="store_true", help="keep the model and outputs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from onnxpipe.core.hardware import cpu

    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    model = work / "big.onnx"
    t0 = time.perf_counter()
    weights = build(model, args.gb)
    print(f"model: {weights / 1e9:.2f} GB of float32 weights in {model}.data (built in {time.perf_counter() - t0:.0f} s); "
          f"CPU: {cpu().model} ({cpu().cores} cores)")
    np.savez(work / "inputs.npz", x=np.random.default_rng(1).standard_normal((8, D)).astype(np.float32))
    py = [sys.executable, "-m", "onnxpipe"]
    runs = [
        ("inspect", py + ["inspect", str(model)], 0.1),
        ("inspect --memory", py + ["inspect", str(model), "--memory"], 0.1),
        ("split --max-part-bytes 1GB", py + ["split", str(model), "--max-part-bytes", "1GB", "-o", str(work / "parts")], 1.5),
        ("infer (1 worker)", py + ["infer", str(model), "--data", str(work / "inputs.npz"), "-o", str(work / "out-whole"),
                                   "--devices", "cpu:0", "-b", "4"], 1.3),
        ("infer parts on cpu:0,cpu:1", None, None),
        ("optimize simplify, int4, strip", py + ["optimize", str(model), "-o", str(work / "opt.onnx"), "--pass", "simplify",
                                                 "--pass", "quantize:mode=int4,min_cosine=0.9", "--pass", "strip",
                                                 "--report", str(work / "opt-report")], 1.5),
        ("optimize fp16", py + ["optimize", str(model), "-o", str(work / "fp16.onnx"), "--pass", "fp16"], 1.5),
        ("optimize quantize dynamic (int8)", py + ["optimize", str(model), "-o", str(work / "int8.onnx"),
                                                   "--pass", "quantize:mode=dynamic"], 1.5),
    ]
    rows = []
    for name, cmd, target in runs:
        if cmd is None:  # the parts' device list depends on how many parts split made
            spec = json.loads((work / "parts" / "pipeline.json").read_text()) if (work / "parts" / "pipeline.json").is_file() else None
            if spec is None:
                rows.append({"command": name, "ok": False, "note": "split did not write parts"})
                continue
            devices = ",".join(f"cpu:{k}" for k in range(len(spec["parts"])))
            cmd = py + ["infer", str(work / "parts"), "--data", str(work / "inputs.npz"), "-o", str(work / "out-parts"),
                        "--devices", devices, "-b", "4"]
            name = f"infer parts on {devices}"
        row, proc = measure(name, cmd, weights, target)
        row["ok"] = proc.returncode == 0 and (target is None or row["ratio"] <= target)
        rows.append(row)
        print_row(row)
    parts_json = work / "parts" / "pipeline.json"
    if parts_json.is_file():
        spec = json.loads(parts_json.read_text())
        sizes = [sum(f.stat().st_size for f in (work / "parts").glob(p["file"] + "*")) for p in spec["parts"]]
        print(f"parts: {len(sizes)}, sizes on disk {', '.join(f'{s / 1e9:.2f} GB' for s in sizes)} "
              f"({'all <= 1 GB' if max(sizes) <= 1e9 else 'OVER 1 GB'}); sequence vs whole max abs diff "
              f"{spec.get('check', {}).get('max_abs', float('nan')):.2e}")
    opt_report = work / "opt-report" / "report.json"
    if opt_report.is_file():
        for st in json.loads(opt_report.read_text())["stages"]:
            detail = "; ".join(c["detail"] for c in st.get("comparisons", []) if c.get("detail"))
            print(f"optimize stage {st['name']:9s} {'kept' if st['kept'] else 'ROLLED BACK'}: {st['size_bytes'] / 1e9:.2f} GB, "
                  f"{st['seconds']:.0f} s" + (f", {detail}" if detail else "") + (f" ({st['reason']})" if st.get("reason") else ""))
    if (work / "out-whole").is_dir() and (work / "out-parts").is_dir():
        a, b = read_outputs(work / "out-whole"), read_outputs(work / "out-parts")
        diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
        print(f"infer: whole vs parts max abs diff {diff:.2e} ({'equal within 1e-4' if diff <= 1e-4 else 'DIFFERENT'})")
    finish(rows, weights, work, as_json=args.json, keep=args.keep)


if __name__ == "__main__":
    main()
