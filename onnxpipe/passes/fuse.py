"""fuse: transformer fusions (attention, skip layer norm, bias gelu ...) into ONNX Runtime's contrib ops.

Two fusers exist and neither covers every export on its own: ONNX Runtime's offline optimizer
(``onnxruntime.transformers.optimizer``) and onnxscript's rewriter (``ort_fusions``), written for
what torch's dynamo exporter produces. This pass runs both, alone and chained, after small
rewrites of our own where neither copes: symbolic shapes on every value and a scalar zero in the
"safe softmax" ``Where(IsNaN(p), 0, p)`` (without them no TorchScript export's attention fuses),
``Gemm`` written as ``MatMul + Add`` (GPT-2's Conv1D, which the rewriter otherwise breaks), and
ONNX Runtime's ONNX-domain ``SimplifiedLayerNormalization`` written portably afterwards.
Each candidate is run on the check inputs against the input model; the valid one with the most
fused attention nodes (then the most fused ops, then the fewest nodes) wins.

Verified: fused attention nodes are counted against the attention layers found in the input graph
(softmaxes that feed a MatMul); a run that fuses fewer says so loudly. Measured: fused kernels can
be slower than ONNX Runtime's own online fusions on a CPU, so the fused model is timed against the
input on the target device (medians of interleaved rounds) and given back only where it pays.

The detection and the small rewrites live in :mod:`onnxpipe.passes.fuse_graph`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx

from onnxpipe.core import external
from onnxpipe.core.compare import Comparison, compare_runs, outputs_on
from onnxpipe.core.deps import require
from onnxpipe.core.errors import InputError
from onnxpipe.core.inputs import random_input
from onnxpipe.core.session import Session
from onnxpipe.core.tensors import concrete_shape, graph_inputs
from onnxpipe.core.timing import interleaved
from onnxpipe.core.units import human_bytes
from onnxpipe.core.userfiles import first_line
from onnxpipe.passes.base import Pass, PassConfig, PassContext, PassResult
from onnxpipe.passes.fuse_graph import (
    attention_count,
    detect,
    expand_ort_only_ops,
    fused_counts,
    gemm_to_matmul,
    infer_shapes,
    scalar_safe_softmax_zero,
)

ModelType = Literal["auto", "bert", "vit", "gpt2", "llama"]
Backend = Literal["onnxscript", "ort"]
# our model types -> ONNX Runtime's optimizer's (it has no Llama type; GPT-2's covers decoders)
ORT_MODEL_TYPE = {"bert": "bert", "vit": "vit", "gpt2": "gpt2", "llama": "gpt2"}


# the two fusers -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet() -> Any:
    """Both fusers print and log freely; the pass reports what they did instead."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def has_shapes(model: onnx.ModelProto) -> bool:
    """Whether most intermediate values carry a shape (dynamo exports do, TorchScript ones do not)."""
    outputs = sum(len(n.output) for n in model.graph.node)
    return len(model.graph.value_info) >= 0.5 * outputs


def onnxscript_fusions(model: onnx.ModelProto, shapes: bool | None = None) -> tuple[onnx.ModelProto, dict[str, int]]:
    """onnxscript's ``ort_fusions`` after our normalisations; returns the model and its fusion counts.

    ``shapes``: infer symbolic shapes first (default: where the model lacks them).
    """
    require("onnxscript")
    import onnx_ir as ir
    from onnxscript.rewriter import ort_fusions

    work = onnx.ModelProto()
    work.CopyFrom(model)
    scalar_safe_softmax_zero(work)
    gemm_to_matmul(work)
    if shapes or (shapes is None and not has_shapes(work)):
        work = infer_shapes(work)
    with _quiet():
        fused, stats = ort_fusions.optimize_for_ort(ir.from_proto(work))
    out = ir.to_proto(fused)
    return out, {k: int(v) for k, v in stats.items() if v}


def ort_fusions(model: onnx.ModelProto, model_type: str, num_heads: int, hidden_size: int,
                use_gpu: bool = False) -> onnx.ModelProto:
    """ONNX Runtime's offline transformer optimizer, fusions only (no session-level optimization).

    Its GPT-2 attention patterns fail outright on some exports (an IndexError on dynamo's GPT-2):
    BERT's, which hold the generic fusions (skip layer norm, GELUs), are then tried instead.
    """
    require("onnxruntime")
    from onnxruntime.transformers import optimizer

    work = onnx.ModelProto()
    work.CopyFrom(model)
    gemm_to_matmul(work)
    ort_type = ORT_MODEL_TYPE.get(model_type, "bert")
    for kind in dict.fromkeys([ort_type, "bert"]):
        try:
            with _quiet():
                return optimizer.optimize_model(work, model_type=kind, num_heads=num_heads, hidden_size=hidden_size,
                                                opt_level=0, use_gpu=use_gpu).model
        except Exception:
            if kind == "bert":
                raise
    raise AssertionError("unreachable")


def _tidy(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Drop inferred shapes of internal values (ORT derives them) and keep the input's IR version or newer."""
    del model.graph.value_info[:]
    expand_ort_only_ops(model)
    used = {d.domain for d in model.opset_import}
    ops_domains = {n.domain for n in model.graph.node}
    keep = [d for d in model.opset_import if d.domain in ops_domains or d.domain in ("", "ai.onnx")]
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)
    if "com.microsoft" in ops_domains and "com.microsoft" not in used:
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    model.ir_version = max(model.ir_version, original.ir_version)
    return model


# timing: the models take turns in core.timing.interleaved ----------------------------------------------

def _providers(target: str) -> list[str]:
    kind = target.split(":")[0].lower()
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise InputError(f"fuse: unknown target {target!r}", hint="use cpu or cuda[:N]")


def _check_target(target: str) -> list[str]:
    """Providers for ``target``; a missing one is the user's to fix, before anything runs."""
    ort = require("onnxruntime")
    providers = _providers(target)
    if providers[0] not in ort.get_available_providers():
        raise InputError(f"fuse: target {target} needs {providers[0]}, which this ONNX Runtime lacks",
                         hint="install onnxruntime-gpu (instead of onnxruntime) or use target: cpu")
    return providers


def interleaved_ms(models: Mapping[str, onnx.ModelProto], feeds: Mapping[str, np.ndarray], *, target: str = "cpu",
                   threads: int | None = None, rounds: int = 7, budget_s: float = 3.0) -> dict[str, float]:
    """Median over rounds of each model's median ms (core.timing's loop), the models taking turns.

    Every model keeps one session; rounds alternate the order, so load that comes and goes on a
    shared machine hits all of them alike.
    """
    providers = _check_target(target)
    device_id = target.split(":")[1] if ":" in target else "0"
    prov: list[Any] = [(p, {"device_id": device_id}) if p == "CUDAExecutionProvider" else p for p in providers]
    with contextlib.ExitStack() as stack:
        sessions = {k: stack.enter_context(Session(m, providers=prov, threads=threads)) for k, m in models.items()}
        medians = interleaved(sessions, feeds, rounds=rounds, budget_s=budget_s)
    return {k: statistics.median(v) for k, v in medians.items()}


def timing_feeds(model: onnx.ModelProto, template: Mapping[str, np.ndarray] | None, *,
                 batch: int | None, seq: int | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs to time on: the check batch, resized to ``batch`` x ``seq`` where those are given.

    Axis 0 is the batch, axis 1 of inputs whose second axis is symbolic is the sequence.
    Token values are tiled from the template (never invented) so masks stay masks.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for info in graph_inputs(model):
        arr = None if template is None else template.get(info.name)
        if arr is None:
            dims = {}
            if info.shape and len(info.shape) > 1 and not isinstance(info.shape[1], int) and seq:
                dims = {str(info.shape[1]): seq}
            arr = random_input(info, concrete_shape(info, batch or 1, dims), rng)
            if np.issubdtype(arr.dtype, np.integer) and "mask" in info.name:
                arr = np.ones_like(arr)
        symbolic_seq = bool(info.shape and len(info.shape) > 1 and not isinstance(info.shape[1], int))
        for axis, want in ((0, batch), (1, seq if symbolic_seq else None)):
            if want and arr.ndim > axis and arr.shape[axis] != want:
                reps = -(-want // arr.shape[axis])
                arr = np.take(np.concatenate([arr] * reps, axis=axis), range(want), axis=axis)
        out[info.name] = np.ascontiguousarray(arr)
    return out


# the pass -----------------------------------------------------------------------------------------

class Fuse(Pass):
    """Fuse attention, layer norms and GELUs into ONNX Runtime contrib ops, where it pays on ``target``.

    Example:
        >>> Fuse({"model_type": "bert", "keep_if_slower": True})
        fuse(model_type='bert', keep_if_slower=True)
    """

    name = "fuse"
    lazy = True  # detection reads the graph only; the fusers get the weights read in when there is work
    # fused kernels sum in another order (and FastGelu is tanh GELU): float32 round-off, not errors
    atol = 1e-4
    rtol = 1e-3

    class Config(PassConfig):
        model_type: ModelType = "auto"
        """bert, vit, gpt2 or llama; auto detects it from the graph."""
        num_heads: int = 0
        """Attention heads; 0 reads them off the graph."""
        hidden_size: int = 0
        """Hidden size; 0 reads it off the graph."""
        backends: list[Backend] = ["onnxscript", "ort"]
        """Fusers to try, alone and chained: onnxscript (ort_fusions), ort (onnxruntime.transformers.optimizer)."""
        target: str = "cpu"
        """Device the fused model must be faster on: cpu or cuda[:N]."""
        threads: int | None = None
        """Intra-op threads for the timing (default: ONNX Runtime's)."""
        batch: int | None = None
        """Batch size to time at (default: the check inputs')."""
        seq: int | None = None
        """Sequence length to time at (default: the check inputs')."""
        measure: bool = True
        """Time fused against unfused; off keeps the fused model unmeasured."""
        keep_if_slower: bool = False
        """Keep the fused model even where it is slower than the input."""
        min_speedup: float = 1.0
        """Keep the fused model only when unfused/fused time is at least this."""
        budget_s: float = 3.0
        """Seconds of timing, both models together."""
        expect_attention: bool = True
        """Warn when fewer attention nodes are fused than the graph has attention layers."""

    def _feeds(self, model: onnx.ModelProto, ctx: PassContext) -> list[dict[str, np.ndarray]]:
        if ctx.check_inputs:
            return [dict(b) for b in ctx.check_inputs]
        return [timing_feeds(model, None, batch=2, seq=16, seed=k) for k in range(2)]

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        c = self.config
        _providers(c.target)  # a typo fails here, a missing provider below: before any work
        if c.measure:
            _check_target(c.target)
        if c.min_speedup <= 0:
            raise InputError("fuse: min_speedup must be positive", hint="e.g. min_speedup: 1.05")
        try:
            shaped = model if has_shapes(model) else infer_shapes(model)
        except Exception:  # noqa: BLE001 - detection then goes without head count
            shaped = None
        found = detect(model, shaped)
        model_type = found.model_type if c.model_type == "auto" else c.model_type
        heads = c.num_heads or found.num_heads
        hidden = c.hidden_size or found.hidden_size
        notes: dict[str, Any] = {"model_type": model_type, "model_type_source": "option" if c.model_type != "auto" else "graph",
                                 "detected": found.as_dict(), "num_heads": heads, "hidden_size": hidden}
        before = fused_counts(model)
        if model_type is None:
            notes.update(status="nothing to fuse", outcome="nothing to fuse (no attention layer)", fused={},
                         expected_attention=0)
            ctx.log("fuse: no attention layer in the graph, nothing to fuse")
            return PassResult(model, modified=False, notes=notes)
        ctx.log(f"fuse: {model_type} ({found.layers} attention layers, heads={heads or '?'}, hidden={hidden or '?'})")
        on_disk = external.lazy_bytes(model)
        if on_disk:  # the fusers merge weights (Q, K and V into one): they need the bytes
            ctx.log(f"fuse: reading {human_bytes(on_disk)} of weights into memory (the fusers merge weights)")
            model = external.materialize(model)
            shaped = None if shaped is None else (model if has_shapes(model) else infer_shapes(model))

        feeds = self._feeds(model, ctx)
        reference = outputs_on(model, feeds)
        candidates: dict[str, onnx.ModelProto] = {}
        failures: dict[str, str] = {}
        rewrites: dict[str, dict[str, int]] = {}

        def attempt(label: str, fn: Callable[[], onnx.ModelProto]) -> onnx.ModelProto | None:
            try:
                out = _tidy(fn(), model)
                self._check(reference, outputs_on(out, feeds))
            except Exception as exc:  # noqa: BLE001 - a fuser that fails or breaks the model leaves the others
                failures[label] = first_line(exc)
                return None
            candidates[label] = out
            return out

        def via_onnxscript(m: onnx.ModelProto, label: str) -> onnx.ModelProto:
            out, stats = onnxscript_fusions(m)
            rewrites[label] = stats
            return out

        if "onnxscript" in c.backends:
            start = shaped if shaped is not None else model  # shapes inferred once, for detection and here
            attempt("onnxscript", lambda: via_onnxscript(start, "onnxscript"))
        if "ort" in c.backends:
            ort_model = attempt("ort", lambda: ort_fusions(model, model_type, heads, hidden,
                                                           use_gpu=c.target.startswith("cuda")))
            if ort_model is not None and "onnxscript" in c.backends:
                attempt("ort+onnxscript", lambda: via_onnxscript(ort_model, "ort+onnxscript"))

        counts = {label: fused_counts(m) for label, m in candidates.items()}
        gained = {label: {k: v - before.get(k, 0) for k, v in cnt.items() if v != before.get(k, 0)}
                  for label, cnt in counts.items()}
        notes.update(candidates={label: {"fused": gained[label], "nodes": len(candidates[label].graph.node)}
                                 for label in candidates}, failures=failures, rewrites=rewrites)
        best = max(candidates, default=None,
                   key=lambda k: (attention_count(counts[k]), sum(gained[k].values()), -len(candidates[k].graph.node)))
        expected = found.layers
        fused_attention = attention_count(counts[best]) if best else attention_count(before)
        notes.update(chosen=best, fused=gained.get(best, {}), fused_total=counts.get(best, before),
                     expected_attention=expected, fused_attention=fused_attention,
                     nodes={"before": len(model.graph.node),
                            "after": len(candidates[best].graph.node) if best else len(model.graph.node)})
        if (best is None or not gained[best]) and expected and attention_count(before) >= expected:
            notes.update(status="already fused", outcome=f"already fused, attention {attention_count(before)}/{expected}")
            ctx.log("fuse: the graph is already fused")
            return PassResult(model, modified=False, notes=notes)
        if best is None or not gained[best]:
            self._loud(ctx, notes, f"fuse: nothing fused in a {model_type} graph with {expected} attention layers"
                       + (f" ({'; '.join(f'{k}: {v}' for k, v in failures.items())})" if failures else ""))
            notes["status"] = "not fused"
            notes["outcome"] = f"NOT FUSED: 0 of {expected} attention layers"
            return PassResult(model, modified=False, notes=notes)
        if c.expect_attention and fused_attention < expected:
            self._loud(ctx, notes, f"fuse: {fused_attention} of {expected} attention layers fused "
                       f"({model_type}, best fuser: {best})")
        fused = candidates[best]
        ctx.log(f"fuse: {best}: " + ", ".join(f"{k} {v:+d}" for k, v in gained[best].items())
                + f"; attention {fused_attention}/{expected}")

        status = "fused" if fused_attention >= expected else "partly fused"
        if c.measure:
            tfeeds = timing_feeds(model, feeds[0], batch=c.batch, seq=c.seq)
            ms = interleaved_ms({"unfused": model, "fused": fused}, tfeeds, target=c.target, threads=c.threads,
                                budget_s=c.budget_s)
            speedup = ms["unfused"] / ms["fused"]
            notes["timing"] = {"target": c.target, "threads": c.threads,
                               "shapes": {k: list(v.shape) for k, v in tfeeds.items()},
                               "unfused_ms": round(ms["unfused"], 4), "fused_ms": round(ms["fused"], 4),
                               "speedup": round(speedup, 3)}
            ctx.log(f"fuse: unfused {ms['unfused']:.3f} ms, fused {ms['fused']:.3f} ms on {c.target}: {speedup:.2f}x")
            if speedup < c.min_speedup and not c.keep_if_slower:
                notes["status"] = f"{status}, not kept: {speedup:.2f}x on {c.target} (needs {c.min_speedup:g}x)"
                notes["outcome"] = (f"unfused model kept: fused {ms['fused']:.3g} ms vs unfused {ms['unfused']:.3g} ms "
                                    f"({speedup:.2f}x) on {c.target}")
                ctx.log(f"fuse: the fused model does not pay on {c.target} ({speedup:.2f}x): the unfused one stays "
                        "(keep_if_slower: true keeps it anyway)")
                return PassResult(model, modified=False, notes=notes)
        notes["status"] = status
        notes["outcome"] = (f"{status}, attention {fused_attention}/{expected}"
                            + (f", {notes['timing']['speedup']:.2f}x on {c.target}" if c.measure else ""))
        return PassResult(fused, modified=True, notes=notes)

    def _check(self, expected: Sequence[Mapping[str, np.ndarray]], actual: Sequence[Mapping[str, np.ndarray]]) -> None:
        bad = [c for c in self.compare(expected, actual) if not c.ok]
        if bad:
            raise ValueError(f"output {bad[0].name} differs by {bad[0].max_abs:.3g}")

    @staticmethod
    def _loud(ctx: PassContext, notes: dict[str, Any], message: str) -> None:
        notes.setdefault("warnings", []).append(message)
        notes["warning"] = "; ".join(notes["warnings"])
        ctx.log("warning: " + message)
        warnings.warn(message, stacklevel=3)

    def compare(self, before: Sequence[Mapping[str, np.ndarray]],
                after: Sequence[Mapping[str, np.ndarray]]) -> list[Comparison]:
        """Elementwise, relative to each output's scale: fused kernels reorder float32 sums.

        ``atol`` is taken relative to the largest magnitude of the reference output (at least 1),
        so a hidden state of magnitude 20 gets the same relative slack as one of magnitude 1.
        """
        atol, rtol = self.tolerance
        scale = max([1.0] + [float(np.max(np.abs(v))) for b in before for v in b.values()
                             if isinstance(v, np.ndarray) and v.size and np.issubdtype(v.dtype, np.floating)
                             and np.isfinite(v).all()])
        return compare_runs(before, after, atol=atol * scale, rtol=rtol)
