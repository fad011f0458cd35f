"""Peak memory of ``convert`` on a transformers decoder folder of ``--convert-gb`` GB of weights.

Builds (once, in a child process, random weights, nothing downloaded) a ``LlamaForCausalLM``
folder with ``save_pretrained`` (safetensors): hidden 2048, MLP 5632, 16 heads over 4 KV heads,
vocabulary 32000, untied embeddings, as many layers as reach ``--convert-gb`` (default 2.6, i.e.
12 layers and 2.69 GB of float32). Then runs ``onnxpipe convert FOLDER -o OUT --json`` with its
check on and samples the resident memory of the whole process tree every 20 ms
(:func:`memory.peak_of`, the sampler of benchmarks/memory.py):

| command | target |
|---|---|
| ``convert`` of the folder (text-generation, check on) | peak <= 2.5x the weight bytes |
| the written decoder, run by ONNX Runtime | logits match transformers (the converter's check: prompt + 8 cached steps) |
| ``run`` of a recipe on the folder: convert, quantize int4, strip, validate on cpu | peak <= 2.5x; every stage kept |

The random weights are no language model: 4-bit rounding moves their nearly flat logits more than a
trained model's (logits cosine 0.981 after one layer, lower after twelve), so the recipe gives the
int4 check ``min_cosine: 0.9``; the row measures the path's memory, not this model's accuracy.

    python benchmarks/memory_convert.py [--convert-gb 2.6] [--workdir /tmp/onnxpipe-memory-convert] [--keep] [--json]

Needs about 3x ``--convert-gb`` of free disk (the folder, the exporter's files, the output) and
about 1.6x of free memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from memory import finish, measure, print_row

TARGET = 2.5
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 4,
         "vocab_size": 32000}


def layer_count(gb: float) -> int:
    """Layers of the decoder above whose float32 weights reach ``gb`` (1e9 bytes)."""
    h, m, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = h * SHAPE["num_key_value_heads"] // SHAPE["num_attention_heads"]
    per_layer = (2 * h * h + 2 * h * kv + 3 * h * m + 2 * h) * 4
    fixed = (2 * v * h + h) * 4  # embeddings, LM head, final norm
    return max(1, math.ceil((gb * 1e9 - fixed) / per_layer))


def build(folder: Path, gb: float) -> int:
    """Save a random LlamaForCausalLM of about ``gb`` GB to ``folder``; returns its weight bytes.

    The model is made on the meta device and filled in place (seconds, not the minutes that
    transformers' own initialization takes for 700M parameters on two cores).
    """
    import torch
    import transformers as tf

    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    config = tf.LlamaConfig(num_hidden_layers=layer_count(gb), tie_word_embeddings=False,
                            max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, **SHAPE)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.eval().save_pretrained(str(folder))
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_row(folder: Path, work: Path, weights: int) -> dict:
    """``onnxpipe run`` of an int4 recipe on the folder: the whole large-model path in one command."""
    recipe = work / "int4.yaml"
    recipe.write_text(f"model: {{source: {folder}, task: text-generation}}\n"
                      "passes:\n  - quantize: {mode: int4, exclude_lm_head: true, min_cosine: 0.9}\n  - strip\n"
                      "validate: {providers: [cpu], atol: 0.5, rtol: 0.1}\n"
                      f"output: {work / 'run'}\n")
    row, proc = measure("run (convert, int4, strip, validate)", [sys.executable, "-m", "onnxpipe", "run", str(recipe)],
                        weights, TARGET)
    report = work / "run" / "report.json"
    if proc.returncode == 0 and report.is_file():
        doc = json.loads(report.read_text())
        row["stages"] = [{"name": s["name"], "kept": s["kept"], "bytes": s["size_bytes"], "seconds": round(s["seconds"])}
                         for s in doc["stages"]]
        row["validation_ok"] = all(v["ok"] for v in doc["validation"])
    row["ok"] = (proc.returncode == 0 and row["ratio"] <= TARGET and row.get("validation_ok", False)
                 and all(s["kept"] for s in row.get("stages", [])))
    print_row(row)
    for s in row.get("stages", []):
        print(f"  run stage {s['name']:9s} {'kept' if s['kept'] else 'ROLLED BACK'}: {s['bytes'] / 1e9:.2f} GB, "
              f"{s['seconds']} s")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--convert-gb", type=float, default=2.6, help="float32 weight gigabytes (1e9) of the folder")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/onnxpipe-memory-convert"))
    ap.add_argument("--keep", action="store_true", help="keep the folder and the output")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)  # the child that builds the folder
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.build_only:
        print(build(args.build_only, args.convert_gb))
        return
    from onnxpipe.core.hardware import cpu

    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    folder, out = work / "llama", work / "onnx"
    t0 = time.perf_counter()
    built = subprocess.run([sys.executable, __file__, "--build-only", str(folder), "--convert-gb", str(args.convert_gb)],
                           capture_output=True, text=True, check=True)
    weights = int(built.stdout.split()[-1])
    print(f"folder: LlamaForCausalLM, {layer_count(args.convert_gb)} layers, {weights / 1e9:.2f} GB of float32 "
          f"weights in {folder} (built in {time.perf_counter() - t0:.0f} s); CPU: {cpu().model} ({cpu().cores} cores)",
          flush=True)
    cmd = [sys.executable, "-m", "onnxpipe", "convert", str(folder), "-o", str(out), "--json"]
    row, proc = measure("convert (text-generation, check on)", cmd, weights, TARGET)
    if proc.returncode == 0:
        doc = json.loads(proc.stdout[proc.stdout.index("{"):])
        logits = next(c for c in doc["check"]["outputs"] if c["name"] == "logits")
        data = out / "model.onnx.data"
        row.update(exporter=doc["exporter"], check_ok=doc["check"]["ok"], max_abs_diff=logits["max_abs_diff"],
                   runs=len(doc["check"]["runs"]), data_bytes=data.stat().st_size if data.is_file() else 0)
    row["ok"] = proc.returncode == 0 and row["ratio"] <= TARGET and bool(row.get("check_ok"))
    print_row(row)
    if "max_abs_diff" in row:
        print(f"exported by {row['exporter']}; {row['data_bytes'] / 1e9:.2f} GB in model.onnx.data; ONNX Runtime vs "
              f"transformers logits over {row['runs']} runs (prompt + cached steps): max abs diff "
              f"{row['max_abs_diff']:.2e} ({'match' if row['check_ok'] else 'DIFFERENT'})")
    finish([row, run_row(folder, work, weights)], weights, work, as_json=args.json, keep=args.keep)


if __name__ == "__main__":
    main()
