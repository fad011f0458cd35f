"""The accuracy budget of int8 quantization: agreement with float32, per-node error ranking, nodes kept in float."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpipe.core.agreement import agreement_score
from onnxpipe.core.compare import outputs_on
from onnxpipe.core.deps import require
from onnxpipe.core.errors import InputError
from onnxpipe.core.metrics import higher_is_better
from onnxpipe.core.modelio import EXTERNAL_DATA_THRESHOLD, save_model, tensor_bytes
from onnxpipe.core.tensors import graph_inputs
from onnxpipe.passes.base import PassContext
from onnxpipe.passes.quant_data import RECIPE_HINT, progress_bar, take_batches

# float32 carries about 140 dB of signal; an input no quantizer touched counts as this clean
EXACT_DB = 140.0
# the budget search measures at most this many node groups alone (each is one quantization)
MAX_MEASURED = 64
RANK_BATCHES = 4


def _sqnr(signal_sq: float, noise_sq: float) -> float:
    if noise_sq <= 0.0:
        return EXACT_DB
    return min(EXACT_DB, 10.0 * math.log10(max(signal_sq, 1e-30) / noise_sq))


def tensor_sqnr(float_path: Path, quant_path: Path, batches: Sequence[Mapping[str, np.ndarray]],
                workdir: Path) -> dict[str, float]:
    """Signal-to-quantization-noise ratio (dB) of every float tensor, as the quantized model's consumers see it.

    Both models are augmented by ORT's ``qdq_loss_debug`` to output every float tensor. The
    quantizers keep the original tensor names (QDQ and dynamic formats); where a tensor goes
    through QuantizeLinear/DequantizeLinear, its dequantized copy is what the next node reads,
    so that copy is compared. Sums run batch by batch: one batch's activations at a time.
    """
    ort = require("onnxruntime")
    from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors
    from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX

    sessions = []
    for label, path in (("float", float_path), ("quant", quant_path)):
        augmented = workdir / f"rank-{label}.onnx"
        size = sum(f.stat().st_size for f in path.parent.glob(f"{path.name}*"))
        modify_model_output_intermediate_tensors(str(path), str(augmented),
                                                 save_as_external_data=size > EXTERNAL_DATA_THRESHOLD)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # names must survive
        opts.log_severity_level = 3
        sessions.append(ort.InferenceSession(str(augmented), opts, providers=["CPUExecutionProvider"]))
    suffix = "_ReshapedSavedOutput"
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    for batch in batches:
        f_out, q_out = ({o.name[:-len(suffix)]: v for o, v in zip(s.get_outputs(), s.run(None, dict(batch)))
                         if o.name.endswith(suffix)} for s in sessions)
        for name, fv in f_out.items():
            qv = q_out.get(name + DEQUANT_OUTPUT_SUFFIX, q_out.get(name))
            if qv is None or qv.shape != fv.shape:
                continue
            f64 = fv.astype(np.float64)
            signal[name] = signal.get(name, 0.0) + float(np.sum(f64 * f64))
            noise[name] = noise.get(name, 0.0) + float(np.sum((f64 - qv) ** 2))
    return {name: _sqnr(signal[name], noise[name]) for name in signal}


def changed_nodes(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> list[str]:
    """Names of float nodes the quantizer replaced or rewired (the ones it quantized).

    Example:
        >>> changed_nodes(float_model, qdq_model)  # doctest: +SKIP
        ['conv1', 'relu1', 'fc']
    """
    kept = {(n.name, tuple(n.input)) for n in quant_model.graph.node}
    return [n.name for n in float_model.graph.node if n.name and (n.name, tuple(n.input)) not in kept]


def rank_nodes(float_model: onnx.ModelProto, candidates: Sequence[str],
               sqnr: Mapping[str, float]) -> list[tuple[tuple[str, ...], float]]:
    """Candidates ordered by the quantization noise each adds, worst first: ``[((node, ...), dB), ...]``.

    A node's share is the SQNR of its cleanest input minus the SQNR of its worst output: the
    noise its weights, integer arithmetic and output quantization add to what it was fed
    (graph inputs count as clean, so their quantization falls to their consumers). A
    tensor the quantized model no longer computes (a Relu fused into its Conv) joins its
    producer to the consumer's group: keeping the group in float is what removes the noise.
    """
    graph = float_model.graph
    clean = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    producer = {o: n for n in graph.node for o in n.output if o}
    memo: dict[str, tuple[float, tuple[str, ...]]] = {}

    def source(tensor: str, depth: int = 0) -> tuple[float, tuple[str, ...]]:
        """(SQNR of a tensor, or of what made it when it was fused away; the nodes walked through)."""
        if tensor in clean or depth > 64:
            return EXACT_DB, ()
        if tensor in sqnr or tensor not in producer:
            return sqnr.get(tensor, EXACT_DB), ()
        if tensor not in memo:
            node = producer[tensor]
            found = [source(t, depth + 1) for t in node.input if t]
            memo[tensor] = (min((db for db, _ in found), default=EXACT_DB),
                            tuple(dict.fromkeys(n for _, names in found for n in names)) + (node.name,))
        return memo[tensor]

    wanted = set(candidates)
    order = {name: i for i, name in enumerate(candidates)}
    ranked: dict[tuple[str, ...], float] = {}
    for node in graph.node:
        outs = [sqnr[t] for t in node.output if t in sqnr]
        if not outs:
            continue
        fed = [source(t) for t in node.input if t]
        group = tuple(dict.fromkeys([*(n for _, names in fed for n in names), node.name]))
        if not wanted.intersection(group):
            continue
        ranked[group] = max(0.0, min((db for db, _ in fed), default=EXACT_DB) - min(outs))
    return sorted(ranked.items(), key=lambda item: (-item[1], min(order.get(n, 1 << 30) for n in item[0])))


@dataclass
class BudgetResult:
    """What the search for a set of float nodes found."""

    met: bool
    excluded: list[Any]
    drop: float
    metric: float
    model: onnx.ModelProto | None
    trials: list[dict] = field(default_factory=list)


def fit_budget(ranked: Sequence[Any], evaluate: Callable[[list[Any]], tuple[float, onnx.ModelProto | None]],
               reference: float, max_drop: float, *, limit: int | None = None,
               baseline: tuple[float, onnx.ModelProto | None] | None = None) -> BudgetResult:
    """The fewest of the worst-ranked items to keep in float so that the metric drops by at most ``max_drop``.

    ``evaluate(excluded) -> (metric, model)`` quantizes with those items (nodes or groups of
    nodes) in float and scores
    the result. The count doubles (1, 2, 4, ...) until the budget holds, then a bisection
    finds the smallest count that holds: about ``2 log2(n)`` quantizations instead of ``n``.
    ``baseline`` is the already measured ``(metric, model)`` with no node in float.

    Example:
        >>> metrics = {0: 0.5, 1: 0.7, 2: 0.96, 3: 0.99}
        >>> r = fit_budget(["a", "b", "c"], lambda ex: (metrics[len(ex)], None), 1.0, 0.05)
        >>> r.met, r.excluded
        (True, ['a', 'b'])
    """
    limit = len(ranked) if limit is None else min(limit, len(ranked))
    metrics: dict[int, float] = {}
    models: dict[int, onnx.ModelProto | None] = {}  # only the smallest count that holds and the best miss
    trials: list[dict] = []
    if baseline is not None:
        metrics[0], models[0] = baseline

    def holds(k: int) -> bool:
        if k not in metrics:
            metrics[k], models[k] = evaluate(list(ranked[:k]))
            trials.append({"float_items": k, "metric": metrics[k], "drop": reference - metrics[k]})
            good = [n for n in metrics if reference - metrics[n] <= max_drop]
            keep = {min(good)} if good else {max(metrics, key=lambda n: (metrics[n], -n))}
            for n in [n for n in models if n not in keep]:
                del models[n]  # quantized models can be large: hold two at most
        return reference - metrics[k] <= max_drop

    lo, hi = 0, None  # lo: known to miss; hi: known to hold
    k = 1
    while k <= limit:
        if holds(k):
            hi = k
            break
        lo = k
        k = limit if k * 2 > limit and k < limit else k * 2
    if hi is None:
        if not metrics:
            return BudgetResult(False, [], math.nan, math.nan, None, trials)
        best = max(metrics, key=lambda n: (metrics[n], -n))
        return BudgetResult(False, list(ranked[:best]), reference - metrics[best], metrics[best],
                            models.get(best), trials)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid
    metric, model = metrics[hi], models.get(hi)
    return BudgetResult(True, list(ranked[:hi]), reference - metric, metric, model, trials)


def search_budget(model: onnx.ModelProto, prepared: onnx.ModelProto, prepared_path: Path,
                  twin: onnx.ModelProto, quantized: onnx.ModelProto, quantize: Callable[..., onnx.ModelProto],
                  ctx: PassContext, work: Path, *, max_drop: float, agreement: str = "cosine",
                  n_batches: int = 8, max_float_nodes: int | None = None) -> dict[str, Any]:
    """Measure the metric drop of ``quantized``; above ``max_drop``, search the fewest nodes to keep in float.

    Args:
        model: the float model as given (the reference).
        prepared, prepared_path: the pre-processed float model the quantizer reads.
        twin: a QDQ or dynamic quantization of ``prepared`` (tensor names kept) for ranking.
        quantized: the model to judge first.
        quantize: ``quantize(excluded=(), only=None) -> model``.
        ctx: the pass context (metric, calibration or check inputs, log).
        max_drop: the budget, in metric units (or 1 - agreement without a metric); for a lower-is-better
            metric (``higher_is_better = False``, e.g. perplexity) the allowed relative increase.
        agreement: ``cosine`` or ``top1``: the score without a metric.
        n_batches: batches to measure agreement on.
        max_float_nodes: at most this many nodes in float.

    Returns:
        Notes for the report, and the chosen model under ``model``.
    """
    if ctx.calibration is not None:
        batches = take_batches(ctx.calibration, graph_inputs(model), n_batches)
    else:
        batches = [dict(b) for b in ctx.check_inputs[:n_batches]]
    if not batches:
        raise InputError("max_drop needs data to measure the drop on", hint=f"set {RECIPE_HINT}")
    ref_outputs = outputs_on(model, batches)
    lower = ctx.metric is not None and not higher_is_better(ctx.metric)
    if ctx.metric is not None:
        metric_name, measure = "metric", ctx.metric
        reference = float(ctx.metric(model))
        if lower:  # perplexity and friends: the budget is the allowed relative increase
            metric_name = f"{getattr(ctx.metric, '__name__', 'metric')} (lower is better; drop = relative increase)"
    else:
        metric_name = f"{agreement} agreement with float32"

        def measure(m: onnx.ModelProto) -> float:
            return agreement_score(ref_outputs, outputs_on(m, batches), agreement)
        reference = 1.0
    raw = reference

    def score(value: float) -> float:
        """Higher is better in the search: a lower-is-better metric becomes minus its ratio to the float value."""
        return -value / raw if lower else value

    def unscore(s: float) -> float:
        return -s * raw if lower else s

    reference = score(reference)
    first = score(float(measure(quantized)))
    out: dict[str, Any] = {"metric": metric_name, "metric_before": raw, "metric_int8": unscore(first),
                           "max_drop": max_drop, "nodes_kept_float": [], "model": quantized}
    if lower:
        out["higher_is_better"] = False
    if reference - first <= max_drop:
        out.update(metric_after=unscore(first), drop=reference - first, budget_met=True)
        return out
    ranked = _rank(prepared, prepared_path, twin, quantize, batches, ref_outputs, work, ctx)
    ctx.log(f"quantize: drop {reference - first:.4g} > max_drop {max_drop:g}; searching among "
            f"{len(ranked)} ranked node groups")

    def flat(groups: Sequence[tuple[str, ...]]) -> list[str]:
        return list(dict.fromkeys(n for g in groups for n in g))

    def evaluate(groups: list[tuple[str, ...]]) -> tuple[float, onnx.ModelProto]:
        m = quantize(flat(groups))
        value = score(float(measure(m)))
        ctx.log(f"quantize: {len(flat(groups))} nodes in float -> drop {reference - value:.4g}")
        return value, m
    groups = [r["nodes"] for r in ranked]
    limit = len(groups)
    if max_float_nodes is not None:  # the search counts groups; the option counts nodes
        limit = max((k for k in range(len(groups) + 1) if len(flat(groups[:k])) <= max_float_nodes), default=0)
    result = fit_budget(groups, evaluate, reference, max_drop, limit=limit, baseline=(first, quantized))
    out.update(metric_after=unscore(result.metric), drop=result.drop, budget_met=result.met,
               nodes_kept_float=flat(result.excluded), search=[{**t, "metric": unscore(t["metric"])} for t in result.trials],
               ranking=[{**r, "nodes": list(r["nodes"])} for r in ranked[:20]], model=result.model)
    return out


def _rank(prepared: onnx.ModelProto, prepared_path: Path, twin: onnx.ModelProto,
          quantize: Callable[..., onnx.ModelProto], batches: list[dict[str, np.ndarray]],
          ref_outputs: list[dict[str, np.ndarray]], work: Path, ctx: PassContext) -> list[dict[str, Any]]:
    """Node groups, most harmful first: each quantized alone and scored at the outputs.

    The QDQ twin's per-tensor SQNR (ORT's qdq_loss_debug) groups nodes a quantizer fuses
    and orders the candidates; the MAX_MEASURED noisiest are then measured one by one,
    since noise a node adds can grow or fade on its way to the outputs.
    """
    twin_path = work / "twin.onnx"
    save_model(twin, twin_path, external_data=tensor_bytes(twin) > EXTERNAL_DATA_THRESHOLD)
    rank_batches = batches[:RANK_BATCHES]
    sqnr = tensor_sqnr(prepared_path, twin_path, rank_batches, work)
    groups = rank_nodes(prepared, changed_nodes(prepared, twin), sqnr)
    measured: list[dict[str, Any]] = []
    with progress_bar("quantize: ranking nodes") as bar:
        task = bar.add_task("rank", total=min(len(groups), MAX_MEASURED))
        for group, db in groups[:MAX_MEASURED]:
            alone = quantize(only=list(group))
            error = 1.0 - agreement_score(ref_outputs[:len(rank_batches)], outputs_on(alone, rank_batches), "cosine")
            measured.append({"nodes": group, "error": error, "noise_db": round(db, 2)})
            bar.advance(task)
    measured.sort(key=lambda r: -r["error"])
    ctx.log(f"quantize: ranked {len(measured)} node groups; worst: "
            + ", ".join(f"{'+'.join(r['nodes'])} ({r['error']:.2g})" for r in measured[:3]))
    return measured + [{"nodes": g, "error": None, "noise_db": round(db, 2)} for g, db in groups[MAX_MEASURED:]]
