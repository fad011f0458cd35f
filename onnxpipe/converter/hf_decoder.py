"""A ``*ForCausalLM`` folder to one ONNX decoder with a flat KV cache (Optimum / genai names).

transformers 5 keeps the cache in a ``DynamicCache`` object, which no exporter takes as an input.
:class:`_FlatKV` wraps the model: it builds the cache from the flat ``past_key_values.{i}.key|value``
tensors, runs the model, and returns the grown cache as flat ``present.{i}.key|value``. An empty
past (sequence length 0) is the first step. The TorchScript exporter is tried first (it exports
every family covered here), the dynamo exporter second.

Grouped-query attention, rotary or learned positions, partial rotary (Phi) and fused QKV (Phi-3)
come from the model's own code: whatever transformers computes is what gets exported, and the
check proves it on a prompt and on :data:`DECODE_STEPS` cached steps.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpipe.converter.base import Attempt
from onnxpipe.converter.check import CheckReport
from onnxpipe.converter.hf_common import (
    DECODE_STEPS,
    GENAI_TYPES,
    MODEL_FILE,
    HFConversionResult,
    copy_side_files,
    export_with_fallback,
    load_pretrained,
    logits_run,
    replace_dir,
)
from onnxpipe.core.deps import require


def kv_names(layers: int) -> tuple[list[str], list[str]]:
    """``(past input names, present output names)`` in the order the decoder takes them."""
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, present


def _kv_geometry(model: Any) -> tuple[int, int, int]:
    """``(layers, kv heads, head size)`` read off the cache the model itself builds."""
    torch = require("torch")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(input_ids=torch.zeros((1, 2), dtype=torch.long), use_cache=True)
    layers = out.past_key_values.layers
    _, heads, _, size = layers[0].keys.shape
    return len(layers), int(heads), int(size)


def _wrapper(model: Any, n_layers: int) -> Any:
    torch = require("torch")
    from transformers import DynamicCache

    class _FlatKV(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> Any:
            cache = DynamicCache(config=self.inner.config)
            for i in range(n_layers):
                cache.layers[i].update(past[2 * i], past[2 * i + 1], None)
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True, return_dict=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return _FlatKV(model).eval()


def _trace_inputs(vocab: int, n_layers: int, heads: int, size: int) -> tuple[Any, ...]:
    """Batch 2, 3 cached + 4 new tokens: no axis of size 0 or 1 that an exporter could specialize."""
    torch = require("torch")
    gen = torch.Generator().manual_seed(0)
    batch, past, new = 2, 3, 4
    ids = torch.randint(0, vocab, (batch, new), generator=gen)
    mask = torch.ones((batch, past + new), dtype=torch.long)
    pos = torch.arange(past, past + new).unsqueeze(0).expand(batch, new).contiguous()
    kv = [torch.randn((batch, heads, past, size), generator=gen) for _ in range(2 * n_layers)]
    return (ids, mask, pos, *kv)


def export(model: Any, *, opset: int, workdir: str | os.PathLike | None = None
           ) -> tuple[onnx.ModelProto, str, list[Attempt]]:
    """Export ``model`` (a ``*ForCausalLM``) to a flat-KV decoder; every strategy tried is reported.

    With ``workdir``, weights the exporter wrote to external data stay there, on disk
    (:func:`~onnxpipe.converter.hf_common.export_with_fallback`).
    """
    n_layers, heads, size = _kv_geometry(model)
    past, present = kv_names(n_layers)
    in_names = ["input_ids", "attention_mask", "position_ids"] + past
    out_names = ["logits"] + present
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in present})
    args = _trace_inputs(int(model.config.vocab_size), n_layers, heads, size)
    return export_with_fallback(_wrapper(model, n_layers), args, in_names, out_names, axes, opset, workdir=workdir)


Reference = list[tuple[str, dict[str, np.ndarray], np.ndarray]]
"""The decoder check's steps as transformers ran them: ``(label, feeds without the cache, logits)``."""


def decoder_reference(model: Any, *, steps: int = DECODE_STEPS, prompt_len: int = 12, batch: int = 2,
                      seed: int = 0) -> Reference:
    """transformers' logits on a random prompt, then on ``steps`` cached greedy steps.

    Computed before ONNX Runtime runs, so the torch weights can be freed before the session
    loads its own copy (a converter that holds both needs twice the weights' memory).
    """
    torch = require("torch")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, int(model.config.vocab_size), size=(batch, prompt_len), dtype=np.int64)
    steps_out: Reference = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "position_ids": np.broadcast_to(np.arange(prompt_len, dtype=np.int64), ids.shape).copy()}
        ref = model(input_ids=torch.from_numpy(ids), use_cache=True)
        steps_out.append(("prompt", feeds, ref.logits.numpy()))
        cache = ref.past_key_values
        total = prompt_len
        for step in range(steps):
            nxt = ref.logits[:, -1:].argmax(-1).numpy().astype(np.int64)
            total += 1
            feeds = {"input_ids": nxt, "attention_mask": np.ones((batch, total), np.int64),
                     "position_ids": np.full((batch, 1), total - 1, np.int64)}
            ref = model(input_ids=torch.from_numpy(nxt), attention_mask=torch.from_numpy(feeds["attention_mask"]),
                        past_key_values=cache, use_cache=True)
            cache = ref.past_key_values
            steps_out.append((f"decode {step + 1}", feeds, ref.logits.numpy()))
    return steps_out


def check_onnx(onnx_path: Path, reference: Reference, geometry: tuple[int, int, int], *, atol: float,
               rtol: float) -> CheckReport:
    """Run the ONNX decoder on the reference's steps (its own cache fed back) and compare the logits."""
    from onnxpipe.core.session import Session

    n_layers, heads, size = geometry
    past_names, present_names = kv_names(n_layers)
    report = CheckReport(atol, rtol)
    with Session(onnx_path) as session:
        got: dict[str, np.ndarray] | None = None
        for label, step_feeds, expected in reference:
            feeds = dict(step_feeds)
            if got is None:
                batch = step_feeds["input_ids"].shape[0]
                feeds.update({n: np.zeros((batch, heads, 0, size), np.float32) for n in past_names})
            else:
                feeds.update({p: got[q] for p, q in zip(past_names, present_names)})
            got = session.run(feeds)
            report.runs.append(logits_run(label, got["logits"], expected, atol=atol, rtol=rtol))
    return report


def check_decoder(model: Any, onnx_path: Path, *, atol: float, rtol: float, steps: int = DECODE_STEPS,
                  prompt_len: int = 12, batch: int = 2, seed: int = 0) -> CheckReport:
    """Logits of ONNX against transformers on a random prompt, then on ``steps`` cached greedy steps."""
    reference = decoder_reference(model, steps=steps, prompt_len=prompt_len, batch=batch, seed=seed)
    return check_onnx(onnx_path, reference, _kv_geometry(model), atol=atol, rtol=rtol)


def genai_config(config: Any, generation: dict[str, Any], n_layers: int, heads: int, size: int) -> dict[str, Any]:
    """The ``genai_config.json`` onnxruntime-genai reads to run the decoder."""
    def first(value: Any) -> Any:
        return value[0] if isinstance(value, list) and value else value

    eos = generation.get("eos_token_id", getattr(config, "eos_token_id", None))
    bos = generation.get("bos_token_id", getattr(config, "bos_token_id", None))
    pad = generation.get("pad_token_id", getattr(config, "pad_token_id", None))
    context = int(getattr(config, "max_position_embeddings", 0) or 2048)
    return {
        "model": {
            "bos_token_id": bos if bos is not None else 0,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxpipe", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": size,
                "hidden_size": int(config.hidden_size),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": int(config.num_attention_heads),
                "num_hidden_layers": n_layers,
                "num_key_value_heads": heads,
            },
            "eos_token_id": eos if eos is not None else 0,
            "pad_token_id": pad if pad is not None else first(eos if eos is not None else 0),
            "type": GENAI_TYPES.get(str(config.model_type), str(config.model_type)),
            "vocab_size": int(config.vocab_size),
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def convert(folder: Path, config: dict[str, Any], output: Any, *, opset: int, atol: float, rtol: float,
            check: bool, external_data_threshold: int | None) -> HFConversionResult:
    """Export, write the output folder (atomically) and check it; see :func:`convert_folder`.

    Memory stays near what the weights need once at a time: transformers' reference logits are
    computed first; the exporter's weights stay in its external data files (never read back),
    are streamed into the output, and the torch model is freed before ONNX Runtime loads the
    written model to compare. A model over ``external_data_threshold`` that the exporter kept
    in memory (the TorchScript exporter keeps anything under 2 GB) is moved to disk first, so it
    takes the large models' path.
    """
    import gc

    from onnxpipe.core import external
    from onnxpipe.core.modelio import EXTERNAL_DATA_THRESHOLD, check_model, save_model, tensor_bytes

    model = load_pretrained(folder, "AutoModelForCausalLM")
    geometry = _kv_geometry(model)
    reference = decoder_reference(model) if check else None
    generation = {}
    if (folder / "generation_config.json").is_file():
        try:
            generation = json.loads((folder / "generation_config.json").read_text())
        except ValueError:
            generation = {}
    genai_text = json.dumps(genai_config(model.config, generation, *geometry), indent=2)
    arch = (config.get("architectures") or [type(model).__name__])[0]
    work = tempfile.TemporaryDirectory(prefix="onnxpipe-export-")
    keep_work = False
    try:
        exported, exporter, attempts = export(model, opset=opset, workdir=Path(work.name) / "export")
        del model
        gc.collect()  # the torch weights go before anything else loads a copy
        limit = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
        if not external.has_external_refs(exported) and tensor_bytes(exported) > limit:
            external.write_streaming(exported, Path(work.name) / "export" / "exported.onnx")  # as a big export is
        check_model(exported, what="the exported decoder")
        result = HFConversionResult(None, "text-generation", False, arch, str(config.get("model_type", "")),
                                    exporter, attempts, model=exported)
        result.side_files = {"genai_config.json": genai_text}
        dest = Path(output) if output is not None else None
        if dest is not None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".onnxpipe-decoder-", dir=dest.parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
        else:  # nothing to keep but the model in memory, which may read its weights from here
            tmp = Path(work.name) / "model"
            tmp.mkdir()
        try:
            save_model(exported, tmp / MODEL_FILE, threshold=external_data_threshold)
            files = sorted(p.name for p in tmp.iterdir())
            files += copy_side_files(folder, tmp)
            (tmp / "genai_config.json").write_text(genai_text)
            files.append("genai_config.json")
            result.files = files
            if reference is not None:
                result.check = check_onnx(tmp / MODEL_FILE, reference, geometry, atol=atol, rtol=rtol)
            if dest is not None:
                replace_dir(tmp, dest)
                result.path = dest
                if external.has_external_refs(exported):
                    external.remember_folder(exported, dest / MODEL_FILE)  # the result reads the written weights
            else:
                keep_work = external.has_external_refs(exported)
        finally:
            if dest is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if keep_work:
            result.scratch = work  # removed with the result
        else:
            work.cleanup()
    return result
