"""Text generation at batch 1, side by side in one run: onnxpipe's engines vs transformers.generate.

On the zoo's tiny_llm (trained on first use) or a random Llama of a chosen size, all on the same
weights and the same number of threads:

- decode tokens/s of ``transformers.generate`` (PyTorch eager, greedy, its own KV cache) against
  onnxpipe's two engines (onnxruntime-genai and the own ORT loop) on the converted folder:
  outcome to reach, >= 1.5x;
- the KV cache really used: time per decoded token after a 256-token prompt against a 16-token
  prompt, per engine: outcome to reach, <= 1.5x;
- the concurrent-requests gain of ``onnxpipe serve``'s ``/generate``: 8 requests of up to 32 tokens
  sent together against the same 8 sent one at a time, over HTTP: outcome to reach, >= 2x.

Decode tokens/s counts the tokens after the first (which comes out of the prefill) over the time
after the first; transformers' is (N-1) / (t(N tokens) - t(1 token)). EOS is suppressed until N
so every run decodes the same number of steps. Rounds are interleaved and medians reported.

    python benchmarks/generate.py [--model tiny_llm|random] [--hidden 256 --layers 4] [--new 32]
                                  [--rounds 5] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def source_folder(args: argparse.Namespace, work: Path) -> Path:
    if args.model == "tiny_llm":
        from onnxpipe_zoo.tiny_llm.model import folder

        return folder()
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=2048, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(4, args.hidden // 64),
                         num_key_value_heads=max(2, args.hidden // 128), max_position_embeddings=1024)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(str(work / "hf"))
    from onnxpipe_zoo.tiny_llm import data, model

    # a tokenizer: onnxruntime-genai will not load a folder without one
    model.train_tokenizer(data.split()[0], 2048).save_pretrained(str(work / "hf"))
    return work / "hf"


def hf_decode(model, ids: list[int], new: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of transformers.generate, greedy."""
    import torch

    x = torch.tensor([ids])

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    t1 = timed(1)
    tn = timed(new)
    return t1, (new - 1) / max(tn - t1, 1e-9)


PROMPTS = ("The for statement is used to", "A class definition", "Exceptions are raised", "The import statement",
           "The return statement", "Names refer to objects", "The while statement", "A function definition")


def serve_gain(folder: Path, new: int, rounds: int) -> dict[str, float]:
    """Seconds for 8 /generate requests one at a time and all at once, medians of interleaved rounds."""
    import asyncio

    import aiohttp

    from onnxpipe.runtimes.providers import parse_devices
    from onnxpipe.serve.repository import discover
    from onnxpipe.serve.server import BackgroundServer, InferenceServer, ServeOptions

    async def one(session: aiohttp.ClientSession, url: str, text: str) -> str:
        async with session.post(f"{url}/v2/models/{folder.name}/generate",
                                json={"text_input": text, "parameters": {"max_tokens": new}}) as r:
            doc = await r.json()
            assert r.status == 200, doc
            return doc["text_output"]

    async def measure(url: str) -> tuple[list[float], list[float]]:
        seq, conc = [], []
        async with aiohttp.ClientSession() as s:
            await one(s, url, "warm up")
            for _ in range(rounds):
                start = time.perf_counter()
                alone = [await one(s, url, p) for p in PROMPTS]
                seq.append(time.perf_counter() - start)
                start = time.perf_counter()
                together = await asyncio.gather(*[one(s, url, p) for p in PROMPTS])
                conc.append(time.perf_counter() - start)
                assert list(together) == alone, "batched answers differ from the same requests sent alone"
        return seq, conc

    server = InferenceServer(discover(folder.parent), parse_devices("cpu"), ServeOptions(port=0))
    bg = BackgroundServer(server)
    url = bg.start()
    try:
        seq, conc = asyncio.run(measure(url))
    finally:
        bg.stop()
    return {"sequential_s": statistics.median(seq), "concurrent_s": statistics.median(conc),
            "gain": statistics.median(seq) / statistics.median(conc)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_llm", choices=("tiny_llm", "random"))
    parser.add_argument("--hidden", type=int, default=256, help="random model: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="random model: layers")
    parser.add_argument("--new", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-serve", action="store_true", help="skip the concurrent-requests measurement")
    args = parser.parse_args()

    import torch
    import transformers as tf
    from rich.console import Console
    from rich.table import Table

    from onnxpipe.converter.huggingface import convert_folder
    from onnxpipe.core import hardware
    from onnxpipe.runtimes.generate import TextGenerator

    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    console = Console(stderr=args.json, width=200)
    with tempfile.TemporaryDirectory(prefix="onnxpipe-bench-gen-") as tmp:
        work = Path(tmp)
        src = source_folder(args, work)
        convert_folder(src, work / "repo" / "llm")
        model = tf.AutoModelForCausalLM.from_pretrained(str(src), attn_implementation="eager").eval()
        folder = work / "repo" / "llm"
        engines = {"genai": TextGenerator(folder, engine="genai", threads=args.threads),
                   "ort": TextGenerator(folder, engine="ort", threads=args.threads)}
        vocab = int(model.config.vocab_size)
        prompts = {n: [(7 * i + 3) % (vocab - 1) + 1 for i in range(n)] for n in (16, 256)}
        runs: dict[str, dict[int, list[float]]] = {k: {16: [], 256: []} for k in ("transformers", *engines)}
        prefill: dict[str, dict[int, list[float]]] = {k: {16: [], 256: []} for k in runs}
        for name, gen in engines.items():  # warm-up
            gen.generate(prompts[16], max_new_tokens=4, min_new_tokens=4)
        hf_decode(model, prompts[16], 4)
        for _ in range(args.rounds):
            for n, ids in prompts.items():
                p, tps = hf_decode(model, ids, args.new)
                runs["transformers"][n].append(tps)
                prefill["transformers"][n].append(p)
                for name, gen in engines.items():
                    out = gen.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new)
                    assert len(out.tokens) == args.new, (name, len(out.tokens))
                    runs[name][n].append(out.decode_tokens_per_s)
                    prefill[name][n].append(out.prefill_s)
        serve = None if args.no_serve else serve_gain(folder, args.new, args.rounds)
    med = {k: {n: statistics.median(v) for n, v in d.items()} for k, d in runs.items()}
    pre = {k: {n: statistics.median(v) for n, v in d.items()} for k, d in prefill.items()}
    cpu = hardware.cpu()
    params = sum(p.numel() for p in model.parameters())
    table = Table(title=f"generate, batch 1, {args.new} new tokens, {args.threads} thread(s), "
                        f"{args.model} ({params / 1e6:.2f}M params); CPU {cpu.model} ({cpu.cores} cores); "
                        f"medians of {args.rounds} interleaved rounds")
    for col in ("engine", "decode tok/s @16", "vs transformers", "decode tok/s @256", "vs transformers",
                "ms/token 256 vs 16", "prefill ms @16", "prefill ms @256"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    result = {"cpu": cpu.model, "cores": cpu.cores, "threads": args.threads, "model": args.model,
              "params": params, "new_tokens": args.new, "rounds": args.rounds, "engines": {}}
    for name in runs:
        speedup16 = med[name][16] / med["transformers"][16]
        speedup256 = med[name][256] / med["transformers"][256]
        ratio = med[name][16] / med[name][256]  # time per token at 256 over time per token at 16
        table.add_row(name, f"{med[name][16]:.0f}", f"{speedup16:.2f}x", f"{med[name][256]:.0f}", f"{speedup256:.2f}x",
                      f"{ratio:.2f}x", f"{pre[name][16] * 1e3:.1f}", f"{pre[name][256] * 1e3:.1f}")
        result["engines"][name] = {"decode_tokens_per_s": med[name], "speedup_vs_transformers": {16: speedup16, 256: speedup256},
                                   "per_token_time_ratio_256_vs_16": ratio, "prefill_s": pre[name]}
    console.print(table)
    if serve is not None:
        result["serve"] = serve
        console.print(f"onnxpipe serve /generate, 8 requests of up to {args.new} tokens: one at a time "
                      f"{serve['sequential_s']:.3f} s, all at once {serve['concurrent_s']:.3f} s: "
                      f"[bold]{serve['gain']:.2f}x[/] (answers identical)")
    console.print("targets: decode >= 1.5x transformers; per-token time at 256 <= 1.5x at 16; "
                  "8 concurrent requests >= 2x faster than one at a time.")
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
