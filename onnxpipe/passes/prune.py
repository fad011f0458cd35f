"""prune: structured channel pruning directly on the ONNX graph, whatever framework made it.

The graph is first normalized (:mod:`.normalize`: exporters' Constant nodes, Identity copies and
constant shape arithmetic become plain initializers), then channels are traced into dependency
groups (:mod:`.pruning.groups`): a Conv's output channels together with the BatchNormalization,
activations, residual joins, Pad, Concat offsets, depthwise convs, grouped convs (whole groups
where the group width is fixed), squeeze-excitation gates, Flatten-into-Gemm blocks, MLP and
FFN layers, attention heads (q/k/v/out by whole heads, head-splitting Reshapes rewritten) and
LayerNorm residual streams they reach. A group touching anything that cannot be proven safe is
left alone and reported with the reason. Each safe group loses ``ratio`` of its channels (or
the globally least important ones), ranked by L1/L2 weight norm or mean activation magnitude,
its kept count a multiple of what this CPU runs fast; ``reconstruct`` then refits the layers
that lost inputs by least squares on calibration data, so accuracy recovers without training.

The pruned model never has more parameters than the input (weights several layers share are
pruned once for all of them, or the pass refuses), and it is timed against the unpruned one
(CPU, 1 thread, batch 8): if slower, the pipeline rolls it back unless ``keep_if_slower``.
The pipeline judges the pass with :meth:`Prune.compare`: same output names, shapes and dtypes,
finite values, and agreement with the unpruned outputs (top-1 or cosine) >= ``min_agreement``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import onnx
from pydantic import Field, field_validator

from onnxpipe.core import external
from onnxpipe.core.agreement import judge_floor
from onnxpipe.core.compare import Comparison
from onnxpipe.core.errors import InputError
from onnxpipe.core.graph import toposort
from onnxpipe.passes.base import Pass, PassConfig, PassContext, PassResult


def summary(notes: Mapping) -> list[str]:
    """A few lines for the report: what normalization did, what was pruned, what stayed and why.

    Example:
        >>> summary({"groups": [], "normalized": {"identities": 3}})
        ['exporter constants made plain: identities 3', 'groups: 0 pruned, 0 unsafe, 0 unchanged']
    """
    lines = []
    norm = {k: v for k, v in (notes.get("normalized") or {}).items() if v}
    if norm:
        lines.append("exporter constants made plain: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in norm.items()))
    rows = notes.get("groups", [])
    pruned = [r for r in rows if r["status"] == "pruned"]
    unsafe = [r for r in rows if r["status"].startswith("unsafe")]
    lines.append(f"groups: {len(pruned)} pruned, {len(unsafe)} unsafe, {len(rows) - len(pruned) - len(unsafe)} unchanged"
                 + (f" (channels rounded to multiples of {notes['round_to']})" if notes.get("round_to") else ""))
    tot = notes.get("totals")
    if tot:
        lines.append(f"params {tot['params_before']:,} -> {tot['params_after']:,}, "
                     f"MACs {tot['macs_before']:,} -> {tot['macs_after']:,}")
    lat = notes.get("latency") or {}
    if "before_ms" in lat:
        lines.append(f"latency {lat['before_ms']:.3f} -> {lat['after_ms']:.3f} ms (CPU, 1 thread, batch 8)"
                     + (": slower" if lat["slower"] else ""))
    for why in (notes.get("refused"), notes.get("shared_weights") and "shared weights " + notes["shared_weights"]):
        if why:
            lines.append(why)
    for r in unsafe:  # what stays, and why: the first reason of each group
        lines.append(f"unsafe {r['group']}: {r['status'][len('unsafe: '):]}")
    return lines


_LATENCY_NOISE = 0.05  # paired timings within 5% are a tie on a shared machine (measured: +-4% at 1 ms)


def batch_of(feeds: Mapping[str, np.ndarray], batch: int, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """``feeds`` repeated along the leading axis to ``batch`` rows, where the model's batch is dynamic."""
    from onnxpipe.core.tensors import batched_inputs, graph_inputs

    dynamic = {i.name for i in graph_inputs(model) if i.shape and not (isinstance(i.shape[0], int) and i.shape[0] > 0)}
    batched, _ = batched_inputs(feeds)
    out = {}
    for name, arr in feeds.items():
        if name in batched and name in dynamic and arr.shape[0] > 0:
            reps = -(-batch // arr.shape[0])
            out[name] = np.concatenate([arr] * reps, axis=0)[:batch]
        else:
            out[name] = arr
    return out


def side_by_side_ms(before: onnx.ModelProto, after: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *,
                    rounds: int = 5, budget_s: float = 0.1) -> tuple[float, float, float]:
    """``(before ms, after ms, ratio)`` on one thread: ``rounds`` interleaved rounds of the one timing loop.

    The order alternates each round, so a busy neighbour slows both alike; the ratio is the
    median of the per-round ratios (paired, so load that shifts between rounds cancels out),
    the times the medians over rounds.

    Example:
        >>> side_by_side_ms(model, pruned, feeds)  # doctest: +SKIP
        (0.92, 0.71, 0.77)
    """
    import statistics

    from onnxpipe.core.session import Session
    from onnxpipe.core.timing import interleaved, ratio_noise

    with Session(before, threads=1) as s0, Session(after, threads=1) as s1:
        ms = interleaved({"before": s0, "after": s1}, feeds, rounds=rounds, budget_s=budget_s * rounds * 2)
    ratio, _ = ratio_noise(ms["before"], ms["after"])
    return statistics.median(ms["before"]), statistics.median(ms["after"]), ratio


class Prune(Pass):
    """Remove the least important channels of every channel group it can prove safe.

    Example:
        >>> Prune({"ratio": 0.4, "round_to": 8, "reconstruct": True})
        prune(ratio=0.4, round_to=8, reconstruct=True)
    """

    name = "prune"
    lazy = True  # weights are memory-mapped as they are read; only the pruned layers are made in memory
    structural = True

    class Config(PassConfig):
        ratio: float = Field(0.3, ge=0.0, lt=1.0)
        """Fraction of channels removed from each group (scope: group) or from all (scope: global)."""
        scope: Literal["group", "global"] = "group"
        """group: every group loses ``ratio``; global: the least important channels overall go."""
        importance: Literal["l1", "l2", "activation"] = "l1"
        """Weight norm over the group, or mean activation magnitude on calibration data."""
        round_to: int | None = Field(None, ge=1)
        """Kept channel counts are a multiple of this, the one nearest to what ratio asks.

        Default: what this machine runs fast (:func:`onnxpipe.hardware.channel_multiple`: 16
        with AVX-512, 8 with AVX2, 4 on ARM): ONNX Runtime's blocked CPU convs (NCHWc) need
        those multiples, and odd counts can make a pruned model slower. 1 turns it off.
        """
        check_latency: bool = True
        """Time the pruned model against the unpruned one (CPU, 1 thread, batch 8)."""
        keep_if_slower: bool = False
        """Keep a pruned model that runs slower than the unpruned one (default: roll it back)."""
        min_channels: int = Field(1, ge=1)
        """No layer keeps fewer channels than this."""
        ratios: dict[str, float] = {}
        """Per-group ratios: glob pattern on a group's or source layer's name -> ratio."""
        skip: list[str] = []
        """Glob patterns of layer (node) or tensor names whose groups are not pruned."""
        reconstruct: bool = False
        """Refit the layers that lost input channels by least squares on calibration data."""
        calibration_batches: int | None = Field(None, ge=1)
        """Use at most this many calibration batches (activation importance and reconstruct)."""
        reconstruct_max_features: int = Field(4096, ge=1)
        """Layers with more input features (channels x kernel) than this are not refitted."""
        reconstruct_rows: int = Field(8192, ge=16)
        """Rows (output positions) sampled per batch and layer for the refit."""
        reconstruct_ridge: float = Field(1e-2, ge=0.0)
        """Pull of the refit towards the pruned weights, relative to the mean feature energy."""
        min_agreement: float = Field(0.5, gt=0.0, le=1.0)
        """Floor on agreement with the unpruned outputs for the pipeline to keep the result."""
        agreement: Literal["auto", "top1", "cosine"] = "auto"
        """top1 for logits, cosine for anything else; auto picks per output."""

        @field_validator("ratios")
        @classmethod
        def _ratios_in_range(cls, value: dict[str, float]) -> dict[str, float]:
            bad = {k: v for k, v in value.items() if not 0.0 <= v < 1.0}
            if bad:
                raise ValueError(f"ratios must be in [0, 1), got {bad}")
            return value

    def compare(self, before: Sequence[Mapping[str, np.ndarray]],
                after: Sequence[Mapping[str, np.ndarray]]) -> list[Comparison]:
        """Same outputs (names, shapes, dtypes), finite, and agreeing >= ``min_agreement``.

        Example:
            >>> Prune({}).compare([{"y": np.eye(3)}], [{"y": np.eye(3)}])[0].ok
            True
        """
        return judge_floor(before, after, floor=self.config.min_agreement, mode=self.config.agreement)

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        from onnxpipe.core.analysis import parameter_count, summarize
        from onnxpipe.core.hardware import channel_multiple
        from onnxpipe.passes.normalize import normalize
        from onnxpipe.passes.pruning import report
        from onnxpipe.passes.pruning.apply import prune_model
        from onnxpipe.passes.pruning.groups import analyze
        from onnxpipe.passes.pruning.probe import probe_shapes

        cfg = self.config
        needs_data = cfg.importance == "activation" or cfg.reconstruct
        if needs_data and ctx.calibration is None:
            what = "importance 'activation'" if cfg.importance == "activation" else "reconstruct"
            raise InputError(f"prune: {what} needs calibration data",
                             hint="give calibration data (--data, or data.calibration in the recipe)")
        work, normalized = normalize(model)
        toposort(work.graph)
        round_to = cfg.round_to if cfg.round_to is not None else channel_multiple("cpu")
        probe = probe_shapes(work, ctx.check_inputs[0]) if ctx.check_inputs else None
        analysis = analyze(work, probe=probe)
        removed, mask, status = self._plan(analysis, work, ctx, round_to)
        pruned = prune_model(work, analysis, mask) if removed else None
        grew = pruned is not None and parameter_count(pruned) > parameter_count(model)
        if grew:  # copies of shared weights pruned apart outgrew them: prune each shared weight once
            analysis = analyze(work, couple_shared=True, probe=probe)
            removed, mask, status = self._plan(analysis, work, ctx, round_to)
            pruned = prune_model(work, analysis, mask) if removed else None
        groups = analysis.groups
        rows = report.group_rows(analysis, removed, status)
        notes: dict = {"normalized": normalized, "round_to": round_to, "groups": rows,
                       "importance": cfg.importance, "scope": cfg.scope,
                       "unsafe": {g.name: g.reasons for g in groups if g.reasons}}
        if grew:
            notes["shared_weights"] = "pruned once for all their readers (pruned apart, their copies added parameters)"
        if pruned is not None and parameter_count(pruned) > parameter_count(model):
            notes["totals"] = None
            why = (f"prune: refused, the pruned model would have more parameters ({parameter_count(model):,} -> "
                   f"{parameter_count(pruned):,}): weights shared by layers pruned differently")
            ctx.log(why)
            notes["refused"] = why
            notes["summary"] = summary(notes)
            return PassResult(model, modified=False, notes=notes)
        if pruned is None:
            notes["totals"] = None
            ctx.log(f"prune: nothing to remove ({len(groups)} groups, "
                    f"{sum(1 for g in groups if not g.reasons)} safe)")
            notes["summary"] = summary(notes)
            return PassResult(model, modified=False, notes=notes)
        if cfg.reconstruct:
            pruned, notes["reconstruct"] = self._reconstruct(work, pruned, analysis, mask, ctx)
        if external.lazy_bytes(model):  # the pruned layers join the rest on disk before sessions time them
            pruned = external.spill(pruned)
        before, after = summarize(model), summarize(pruned)
        sizes = [analysis.sources[s].size for g in groups for s in g.sources]
        kept = [analysis.sources[s].size - int(mask[analysis.sources[s].first:
                                                     analysis.sources[s].first + analysis.sources[s].size].sum())
                for g in groups for s in g.sources]
        notes["totals"] = {"channels_before": int(sum(sizes)), "channels_after": int(sum(kept)),
                           "params_before": before.params, "params_after": after.params,
                           "macs_before": before.macs, "macs_after": after.macs,
                           "groups_pruned": len(removed), "groups": len(groups)}
        ctx.log(f"prune: {len(removed)}/{len(groups)} groups pruned, params {before.params:,} -> "
                f"{after.params:,}, MACs {before.macs:,} -> {after.macs:,}")
        convs = {g.name for g in groups
                 if any(analysis.view.nodes[analysis.sources[s].node].op_type == "Conv" for s in g.sources)}
        odd = [r["group"] for r in rows if r["status"] == "pruned" and r["group"] in convs
               and r["channels_before"] % 8 == 0 and r["channels_after"] % 8]
        if odd and round_to % 8:
            # measured on the digits CNN: 16 -> 11 channels ran 1.4-2x slower than 16 on ORT CPU
            notes["hints"] = [f"{len(odd)} group(s) now have channel counts that are not multiples of 8 "
                              f"({', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''}): ONNX Runtime's blocked "
                              "CPU convs need multiples of 8 and may run slower; try round_to: 8"]
            ctx.log("prune: hint: " + notes["hints"][0])
        rejected = None
        if cfg.check_latency and ctx.measure_latency and ctx.check_inputs:
            rejected = self._latency(model, pruned, ctx, notes)
        notes["summary"] = summary(notes)
        return PassResult(pruned, modified=True, notes=notes, rejected=rejected)

    def _plan(self, analysis, work: onnx.ModelProto, ctx: PassContext,
              round_to: int) -> tuple[dict[int, np.ndarray], np.ndarray, dict[int, str]]:
        """Which classes each group loses: ``(removed per group, removed elements, status per group)``."""
        from onnxpipe.passes.pruning import importance, select

        cfg = self.config
        status: dict[int, str] = {}
        eligible = []
        for g in analysis.groups:
            if g.reasons:
                status[g.index] = "unsafe: " + "; ".join(g.reasons[:3]) + (" ..." if len(g.reasons) > 3 else "")
            elif self._skipped(analysis, g):
                status[g.index] = "skipped (skip option)"
            elif g.size < 2:
                status[g.index] = "unchanged: a single channel"
            else:
                eligible.append(g)
        if cfg.importance == "activation":
            raw = importance.activation_scores(analysis, work, ctx.calibration, max_batches=cfg.calibration_batches)
        else:
            raw = importance.weight_scores(analysis, cfg.importance)
        scores = {g.index: np.array([raw[int(c)] for c in g.classes]) for g in analysis.groups}
        requests = self._requests(analysis, eligible, scores)
        removed: dict[int, np.ndarray] = {}
        mask = np.zeros(len(analysis.class_of), dtype=bool)
        for g in eligible:
            gone = select.choose(analysis, g, scores[g.index], requests[g.index],
                                 round_to=round_to, min_channels=cfg.min_channels)
            if len(gone):
                removed[g.index] = gone
                mask[np.isin(analysis.class_of, g.classes[gone])] = True
                status[g.index] = "pruned"
            elif requests[g.index] == 0:
                status[g.index] = "unchanged: ratio leaves nothing to remove"
            else:
                status[g.index] = "unchanged: round_to / min_channels / grouped convs leave nothing to remove"
        return removed, mask, status

    def _latency(self, model: onnx.ModelProto, pruned: onnx.ModelProto, ctx: PassContext, notes: dict) -> str | None:
        """Time both models (CPU, 1 thread, batch 8); a slower pruned model is rejected unless kept."""
        feeds = batch_of(ctx.check_inputs[0], 8, model)
        try:
            before, after, ratio = side_by_side_ms(model, pruned, feeds)
            if 1 + _LATENCY_NOISE < ratio < 1 + 4 * _LATENCY_NOISE:  # a close call: measure longer
                before, after, ratio = side_by_side_ms(model, pruned, feeds, rounds=9, budget_s=0.2)
        except Exception as exc:  # timing is advice: a model ORT runs was checked already
            notes["latency"] = {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
            return None
        slower = ratio > 1 + _LATENCY_NOISE
        notes["latency"] = {"device": "cpu", "threads": 1, "batch": 8, "before_ms": before, "after_ms": after,
                            "ratio": ratio, "slower": slower}
        ctx.log(f"prune: latency {before:.3f} -> {after:.3f} ms (CPU, 1 thread, batch 8)")
        if not slower:
            return None
        why = (f"pruned model is slower on this CPU: {after:.3f} ms vs {before:.3f} ms unpruned "
               f"({ratio:.2f}x, 1 thread, batch 8)")
        if self.config.keep_if_slower:
            notes.setdefault("hints", []).append(why + "; kept (keep_if_slower)")
            return None
        return why + "; set keep_if_slower: true to keep it, or try another round_to"

    def _skipped(self, analysis, group) -> bool:
        names = {group.name}
        for s in group.sources:
            src = analysis.sources[s]
            names.update({analysis.view.nodes[src.node].name, src.tensor})
        return any(fnmatch.fnmatchcase(n, p) for n in names if n for p in self.config.skip)

    def _ratio(self, analysis, group) -> float | None:
        names = [group.name] + [analysis.view.nodes[analysis.sources[s].node].name for s in group.sources]
        for pattern, ratio in self.config.ratios.items():
            if any(n and fnmatch.fnmatchcase(n, pattern) for n in names):
                return ratio
        return None

    def _requests(self, analysis, eligible, scores) -> dict[int, int]:
        from onnxpipe.passes.pruning.select import global_requests, half_up

        own = {g.index: self._ratio(analysis, g) for g in eligible}
        requests = {g.index: half_up(own[g.index] * g.size) for g in eligible if own[g.index] is not None}
        rest = [g for g in eligible if own[g.index] is None]
        if self.config.scope == "global":
            requests.update(global_requests(rest, scores, self.config.ratio))
        else:
            requests.update({g.index: half_up(self.config.ratio * g.size) for g in rest})
        return requests

    def _reconstruct(self, work, pruned, analysis, mask, ctx: PassContext) -> tuple[onnx.ModelProto, dict]:
        from onnxpipe.passes.pruning.apply import kept_positions
        from onnxpipe.passes.pruning.reconstruct import refit

        cfg = self.config
        kept = kept_positions(analysis, mask)
        layers = []
        for use in sorted(analysis.weights, key=lambda u: u.node):
            node = analysis.view.nodes[use.node]
            if use.role != "in" or node.op_type not in ("Conv", "Gemm", "MatMul"):
                continue
            if len(kept(use.tensor)) == len(analysis.labels[use.tensor].ids):
                continue  # its inputs are all still there: nothing to recover
            out = node.output[0]
            lab = analysis.labels.get(out)
            kept_out = kept(out) if lab is not None else None
            layers.append((use.tensor, out, kept_out))
        metric_before = ctx.metric(pruned) if ctx.metric is not None else None
        reports = refit(work, pruned, layers, ctx.calibration, max_batches=cfg.calibration_batches,
                        max_features=cfg.reconstruct_max_features, rows=cfg.reconstruct_rows,
                        ridge=cfg.reconstruct_ridge, progress=ctx.log)
        metric_after = ctx.metric(pruned) if ctx.metric is not None else None
        info = {"layers": [r.as_dict() for r in reports], "metric_before": metric_before,
                "metric_after": metric_after}
        if metric_before is not None:
            ctx.log(f"prune: metric {metric_before:.4f} before reconstruction, {metric_after:.4f} after")
        return pruned, info
