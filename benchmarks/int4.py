"""int4 weight-only quantization side by side: float32 vs rtn / hqq / gptq at block 32.

(t) The zoo's ``tiny_llm`` (onnxpipe_zoo.tiny_llm: a 4-layer Llama trained on pydoc topics,
    cached after its first training) converted as ``onnxpipe convert --task text-generation``
    does: the KV-cache decoder. Perplexity on the held-out topics (windows of 128 tokens, empty
    cache), file size (embeddings included: quantize_embeddings), which MatMuls stay at higher
    precision, and greedy decode tokens/s as ``onnxpipe generate`` runs it (KV cache, batch 1,
    1 thread; onnxruntime-genai and onnxpipe's own ORT loop), medians of interleaved rounds.
(a) The stand-in when the zoo is not importable: a small Llama (4 layers, hidden 128, BPE
    vocabulary of 512 trained here) trained for ``--train-seconds``, exported without a cache.
(b) A random-initialised Llama of >= 100M parameters (8 layers, hidden 1024, MLP 2816, vocab 32000):
    per-token latency at batch 1 on 1 thread, float32 vs int4 rtn (the accuracy_level the pass
    picks for this CPU, and level 0), and the file size.

(a) and (b) are plain ``torch.onnx.export`` exports returning logits (no KV cache): a decode step
is timed as one forward pass over one token, which reads every weight once, as a cached decode
step does. Latencies are medians of interleaved rounds; ratios are against float32 of the same run.

    HF_HUB_OFFLINE=1 python benchmarks/int4.py [--only tiny,large] [--rounds 5]
    (--only small: the stand-in; tiny falls back to it when onnxpipe_zoo is missing)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from onnxpipe.core import hardware
from onnxpipe.core.modelio import save_model
from onnxpipe.core.perplexity import evaluate_model
from onnxpipe.passes.base import PassContext
from onnxpipe.passes.quantize import Quantize

CONTEXT = 128


def corpus() -> tuple[str, str]:
    """Training and held-out text: the pydoc topics, split 90/10 by topic."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    cut = int(len(docs) * 0.9)
    return "\n".join(docs[:cut]), "\n".join(docs[cut:])


def export(model, path: Path, *, example_len: int = 16) -> None:
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    ids = torch.randint(0, model.config.vocab_size, (2, example_len))  # a size-1 dim would be specialized
    with torch.no_grad():
        torch.onnx.export(Logits().eval(), (ids,), str(path), input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "logits": {0: "b", 1: "s"}}, dynamo=True,
                          external_data=True, verbose=False)


def small_model(folder: Path, train_seconds: float) -> tuple[Path, np.ndarray, np.ndarray]:
    """Train a tokenizer and a small Llama on the training text; returns (onnx path, train windows, eval windows)."""
    import tokenizers
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    train_text, eval_text = corpus()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator([train_text], tokenizers.trainers.BpeTrainer(vocab_size=512, special_tokens=["[UNK]"]))
    tok.save(str(folder / "tokenizer.json"))
    ids = np.asarray(tok.encode(train_text).ids, dtype=np.int64)
    held = np.asarray(tok.encode(eval_text).ids, dtype=np.int64)
    train = ids[: len(ids) // CONTEXT * CONTEXT].reshape(-1, CONTEXT)
    evals = held[: len(held) // CONTEXT * CONTEXT].reshape(-1, CONTEXT)[:24]
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # on a shared machine 2 threads wait on each other: measured 0.2 s vs 13 s a step
    model = LlamaForCausalLM(cfg)
    cfg.save_pretrained(folder)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = np.random.default_rng(0)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < train_seconds:
        rows, start_at = rng.integers(0, len(train), 8), rng.integers(0, CONTEXT - 64)
        batch = torch.from_numpy(train[rows, start_at:start_at + 64])  # 64-token crops: more steps per second
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    print(f"trained {steps} steps in {time.perf_counter() - start:.0f}s, last loss {loss.item():.3f}", flush=True)
    model.eval()
    export(model, folder / "model.onnx")
    return folder / "model.onnx", train, evals


def large_model(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"large model: {params / 1e6:.0f}M parameters", flush=True)
    export(model, folder / "model.onnx", example_len=8)
    del model
    return folder / "model.onnx"


def file_size(model: onnx.ModelProto, path: Path) -> int:
    save_model(model, path, external_data=True)
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


def decode_latency(paths: dict[str, Path], vocab: int, rounds: int, runs: int) -> dict[str, float]:
    """Median ms of one forward over one token at batch 1 on 1 thread, in interleaved rounds."""
    from onnxpipe.core.session import Session

    feeds = {"input_ids": np.array([[vocab // 3]], dtype=np.int64)}
    sessions = {k: Session(str(p), threads=1) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for s in sessions.values():
        for _ in range(3):
            s.session.run(None, feeds)
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(runs):
                t = time.perf_counter()
                s.session.run(None, feeds)
                times[k].append((time.perf_counter() - t) * 1e3)
    for s in sessions.values():
        s.close()
    return {k: statistics.median(v) for k, v in times.items()}


def run_small(work: Path, args: argparse.Namespace) -> list[list[str]]:
    folder = work / "small"
    folder.mkdir()
    path, train, evals = small_model(folder, args.train_seconds)
    float_model = onnx.load(str(path))
    inputs, labels = {"input_ids": evals}, evals
    cal = [{"input_ids": train[i:i + 4]} for i in range(0, 64, 4)]
    ctx = PassContext(calibration=lambda: iter(cal), log=lambda line: None)
    variants = {"float32": float_model}
    notes = {}
    for alg in ("rtn", "hqq", "gptq"):
        t = time.perf_counter()
        r = Quantize({"mode": "int4", "algorithm": alg, "block_size": 32, "quantize_embeddings": True}
                     ).apply(float_model, ctx)
        variants[f"int4 {alg}"], notes[f"int4 {alg}"] = r.model, {**r.notes, "seconds": time.perf_counter() - t}
    paths, sizes, ppl = {}, {}, {}
    for k, m in variants.items():
        p = work / "small-out" / k.replace(" ", "-") / "model.onnx"
        p.parent.mkdir(parents=True)
        sizes[k] = file_size(m, p)
        paths[k] = p
        ppl[k] = evaluate_model(str(p), inputs, labels)
    lat = decode_latency(paths, 512, args.rounds, 30)
    rows = []
    for k in variants:
        n = notes.get(k, {})
        rows.append([k, f"{ppl[k]:.3f}", f"{ppl[k] / ppl['float32'] - 1:+.2%}", f"{sizes[k] / 1e6:.2f}",
                     f"{sizes[k] / sizes['float32']:.3f}", f"{lat[k]:.3f}", f"{lat['float32'] / lat[k]:.2f}x",
                     str(n.get("layout_check", {}).get("ok", "")), f"{n.get('seconds', 0):.1f}"])
    warn = {k: n["warnings"] for k, n in notes.items() if n.get("warnings")}
    for k, w in warn.items():
        print(f"{k}: " + " | ".join(x[:110] for x in w))
    print(f"small model: {len(evals)} held-out windows of {CONTEXT} tokens; embeddings in int4 blocks (rtn) for every variant")
    return rows


def tiny_llm_folder():
    """The zoo's tiny_llm save_pretrained folder (trained on first use), or None without the zoo."""
    try:
        from onnxpipe_zoo.tiny_llm import data as tiny_data
        from onnxpipe_zoo.tiny_llm import model as tiny_model
    except ImportError:
        return None
    return tiny_model.folder(), tiny_data


def decoder_batch(model: onnx.ModelProto, ids: np.ndarray) -> dict[str, np.ndarray]:
    """A prompt step with an empty cache for the KV-cache decoder (calibration for gptq)."""
    from onnxpipe.core.tensors import graph_inputs

    b, n = ids.shape
    feeds: dict[str, np.ndarray] = {}
    for info in graph_inputs(model):
        if info.name == "input_ids":
            feeds[info.name] = ids
        elif info.name == "attention_mask":
            feeds[info.name] = np.ones((b, n), np.int64)
        elif info.name == "position_ids":
            feeds[info.name] = np.broadcast_to(np.arange(n, dtype=np.int64), (b, n)).copy()
        else:  # past_key_values.{i}.key|value [batch, kv heads, 0, head dim]
            feeds[info.name] = np.zeros([b, info.shape[1], 0, info.shape[3]], info.dtype)
    return feeds


def generate_speed(folders: dict[str, Path], engine: str, rounds: int, prompt: str, tokens: int) -> dict[str, Any]:
    """Median greedy decode tokens/s (batch 1, 1 thread) per folder, interleaved; and the tokens of each."""
    from onnxpipe.runtimes.generate import TextGenerator

    gens = {k: TextGenerator(f, engine=engine, threads=1) for k, f in folders.items()}
    speed: dict[str, list[float]] = {k: [] for k in folders}
    out: dict[str, list[int]] = {}
    for g in gens.values():
        g.generate(prompt, max_new_tokens=8)
    for _ in range(rounds):
        for k, g in gens.items():
            r = g.generate(prompt, max_new_tokens=tokens)
            speed[k].append(r.decode_tokens_per_s)
            out[k] = r.tokens
    return {"tokens_per_s": {k: statistics.median(v) for k, v in speed.items()}, "tokens": out}


def run_tiny(work: Path, args: argparse.Namespace) -> list[list[str]] | None:
    found = tiny_llm_folder()
    if found is None:
        print("onnxpipe_zoo is not importable: the stand-in small Llama instead")
        return None
    src, tiny_data = found
    from tokenizers import Tokenizer

    from onnxpipe.converter.hf_common import copy_generation_files
    from onnxpipe.converter.huggingface import convert_folder

    float_dir = work / "tiny" / "float32"
    convert_folder(src, float_dir, check=False)
    path = float_dir / "model.onnx"
    float_model = onnx.load(str(path))
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    train_text, held = tiny_data.split()
    held_ids = np.asarray(tok.encode("\n".join(held)).ids, dtype=np.int64)
    evals = held_ids[: min(len(held_ids), 4096) // CONTEXT * CONTEXT].reshape(-1, CONTEXT)
    train_ids = np.asarray(tok.encode("\n".join(train_text[:20])).ids, dtype=np.int64)
    train = train_ids[: len(train_ids) // CONTEXT * CONTEXT].reshape(-1, CONTEXT)
    cal = [decoder_batch(float_model, train[i:i + 4]) for i in range(0, min(len(train), 64), 4)]
    ctx = PassContext(calibration=lambda: iter(cal), log=lambda line: None)
    variants, notes = {"float32": float_model}, {}
    for alg in ("rtn", "hqq", "gptq"):
        t = time.perf_counter()
        r = Quantize({"mode": "int4", "algorithm": alg, "block_size": 32, "quantize_embeddings": True}
                     ).apply(float_model, ctx)
        variants[f"int4 {alg}"], notes[f"int4 {alg}"] = r.model, {**r.notes, "seconds": time.perf_counter() - t}
    folders, sizes, ppl = {"float32": float_dir}, {}, {}
    for k, m in variants.items():
        if k != "float32":
            p = work / "tiny" / k.replace(" ", "-") / "model.onnx"
            p.parent.mkdir(parents=True)
            save_model(m, p)
            copy_generation_files(path, p)
            folders[k] = p.parent
        sizes[k] = sum(f.stat().st_size for f in folders[k].glob("model.onnx*"))
        ppl[k] = evaluate_model(str(folders[k] / "model.onnx"), {"input_ids": evals}, evals)
    prompt = tiny_data.PROMPTS[0]
    speeds = {e: generate_speed({k: folders[k] for k in ("float32", "int4 rtn", "int4 gptq")}, e, args.rounds,
                                prompt, 64) for e in ("genai", "ort")}
    rows = []
    for k in variants:
        n = notes.get(k, {})
        mm = n.get("matmuls", {})
        higher = (f"{mm.get('int8', 0)} int8, {mm.get('float', 0)} float" if mm else "-")
        tps = {e: speeds[e]["tokens_per_s"].get(k) for e in speeds}
        rows.append([k, f"{ppl[k]:.3f}", f"{ppl[k] / ppl['float32'] - 1:+.2%}", f"{sizes[k] / 1e6:.3f}",
                     f"{sizes[k] / sizes['float32']:.3f}",
                     " / ".join(f"{v:.0f}" if v else "-" for v in tps.values()),
                     " / ".join(f"{v / speeds[e]['tokens_per_s']['float32']:.2f}x" if v else "-"
                                for e, v in tps.items()),
                     str(n.get("layout_check", {}).get("ok", "")), f"{n.get('seconds', 0):.1f}", higher])
    for e, sp in speeds.items():
        same = sp["tokens"]["int4 rtn"][:16] == sp["tokens"]["float32"][:16]
        print(f"{e}: int4 rtn greedy tokens {'match' if same else 'differ from'} float32 in the first 16")
    for k, n in notes.items():
        if n.get("warnings"):
            print(f"{k}: " + " | ".join(x[:110] for x in n["warnings"]))
        print(f"{k}: accuracy_level {n.get('accuracy_level')}, embeddings quantized {n.get('embeddings_quantized')}, "
              f"lm_head {n.get('lm_head')}, MatMuls {n.get('matmuls')}")
    print(f"tiny_llm: {len(evals)} held-out windows of {CONTEXT} tokens; greedy decode of 64 tokens from "
          f"{prompt!r}; tokens/s columns: onnxruntime-genai / onnxpipe's ORT loop")
    return rows


def run_large(work: Path, args: argparse.Namespace) -> list[list[str]]:
    folder = work / "large"
    folder.mkdir()
    path = large_model(folder)
    float_model = onnx.load(str(path))
    ctx = PassContext(log=lambda line: None)
    variants: dict[str, onnx.ModelProto | None] = {"float32": None}
    notes = {}
    for label, cfg in (("int4 rtn", {}), ("int4 rtn level 0", {"accuracy_level": 0})):
        t = time.perf_counter()
        r = Quantize({"mode": "int4", "block_size": 32, "quantize_embeddings": True, **cfg}).apply(float_model, ctx)
        notes[label] = {**r.notes, "seconds": time.perf_counter() - t}
        variants[label] = r.model
    paths, sizes = {"float32": path}, {"float32": sum(f.stat().st_size for f in folder.glob("model.onnx*"))}
    for k, m in variants.items():
        if m is None:
            continue
        p = work / "large-out" / k.replace(" ", "-") / "model.onnx"
        p.parent.mkdir(parents=True)
        sizes[k], paths[k] = file_size(m, p), p
    del float_model, variants
    lat = decode_latency(paths, 32000, args.rounds, 5)
    rows = []
    for k in paths:
        n = notes.get(k, {})
        rows.append([k, "", "", f"{sizes[k] / 1e6:.1f}", f"{sizes[k] / sizes['float32']:.3f}", f"{lat[k]:.2f}",
                     f"{lat['float32'] / lat[k]:.2f}x", str(n.get("layout_check", {}).get("ok", "")),
                     f"{n.get('seconds', 0):.1f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="tiny,large")
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    cpu = hardware.cpu()
    _, _, why = hardware.weight_only_advice(4)
    print(f"CPU: {cpu.model} ({cpu.simd}, int8 dot: {', '.join(cpu.int8_dot) or 'none'}); {why}")
    table = Table(title=f"int4 weight-only, block 32, batch 1, 1 thread - {cpu.model}")
    for col in ("model / variant", "perplexity", "vs float", "MB", "size ratio", "ms/token (tiny: tok/s genai / ort)",
                "speed vs float32",
                "layout ok", "quantize s"):
        table.add_column(col, justify="left" if col == "model / variant" else "right")
    with tempfile.TemporaryDirectory(prefix="onnxpipe-int4-") as tmp:
        work = Path(tmp)
        tiny = run_tiny(work, args) if "tiny" in args.only else None
        for row in tiny or []:
            table.add_row("tiny_llm (KV cache): " + row[0], *row[1:9])
        if tiny:
            print("higher precision than int4: " + "; ".join(f"{r[0]}: {r[9]}" for r in tiny[1:]))
        if "small" in args.only or ("tiny" in args.only and tiny is None):
            for row in run_small(work, args):
                table.add_row("small Llama: " + row[0], *row[1:])
        if "large" in args.only:
            for row in run_large(work, args):
                table.add_row("Llama >=100M: " + row[0], *row[1:])
    Console(width=170).print(table)


if __name__ == "__main__":
    main()
