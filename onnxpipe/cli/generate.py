"""``onnxpipe generate``: continue a prompt with a converted decoder folder, streaming the tokens."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from onnxpipe.cli._common import console_for


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        model: Annotated[Path, typer.Argument(help="Folder written by: onnxpipe convert DIR --task text-generation "
                                                   "(or that folder split between layers by onnxpipe split).")],
        prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
        max_new_tokens: Annotated[int, typer.Option(help="Stop after this many new tokens (or at EOS).")] = 64,
        do_sample: Annotated[bool, typer.Option("--do-sample/--greedy", help="Sample instead of greedy.")] = False,
        temperature: Annotated[float, typer.Option(help="Sampling temperature (> 0).")] = 1.0,
        top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0: all).")] = 0,
        top_p: Annotated[float, typer.Option(help="Sample within this probability mass (1.0: all).")] = 1.0,
        seed: Annotated[int | None, typer.Option(help="Seed of the sampler.")] = None,
        engine: Annotated[str, typer.Option(help="auto | genai (onnxruntime-genai) | ort (own loop).")] = "auto",
        threads: Annotated[int | None, typer.Option(help="Intra-op threads (default: ORT decides).")] = None,
        devices: Annotated[str | None, typer.Option("--devices", help="A split decoder: one device per stage, e.g. "
                                                    "cpu:0,cpu:1 or cuda:0,cuda:1; each keeps its layers' KV cache.")] = None,
        backend: Annotated[str, typer.Option("--backend", help="Split decoders: local (a process per device) or "
                                             "ray (an actor per device).")] = "local",
        address: Annotated[str | None, typer.Option("--address", help="Ray cluster to join (auto, ray://host:10001); "
                                                    "default: a local Ray.")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print prompt_tokens, tokens, text and timings "
                                                              "as JSON instead of streaming.")] = False,
    ) -> None:
        """Generate text from a prompt, streaming tokens as they come; stops at EOS."""
        from onnxpipe.runtimes.generate import Sampling, TextGenerator

        sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        sampling.validate()

        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        with TextGenerator(model, engine=engine, threads=threads, devices=devices, backend=backend,
                           address=address) as gen:
            if not json_out:
                stream(prompt)
            result = gen.generate(prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                                  on_text=None if json_out else stream)
        if json_out:
            print(json.dumps(result.as_dict()))
            return
        sys.stdout.write("\n")
        note = console_for(True)
        why = f" (onnxruntime-genai not used: {gen.why_not_genai})" if gen.why_not_genai else ""
        note.print(f"[dim]{len(result.prompt_tokens)} prompt tokens, {len(result.tokens)} new ({result.finish_reason}); "
                   f"prefill {result.prefill_s * 1e3:.1f} ms, decode {result.decode_tokens_per_s:.1f} tokens/s; "
                   f"{result.engine}{why}[/]")
