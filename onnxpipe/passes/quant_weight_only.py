"""Weight-only quantization into MatMulNBits (int4, or int8 weights), by ONNX Runtime's MatMulNBitsQuantizer.

``quantize: {mode: int4}`` stores every MatMul weight in blocks of ``block_size`` values along K,
each block with its own scale (and zero point unless symmetric), and runs them as
``com.microsoft.MatMulNBits``; activations stay float. ``mode: int8-weight-only`` does the same
with 8-bit blocks (the name keeps it apart from ``dynamic``/``static``, which quantize activations
too). The quantization itself is ONNX Runtime's: ``rtn`` is its default round-to-nearest block
quantizer (MLAS), ``hqq`` and ``gptq`` its HQQ and GPTQ configurations (GPTQ streams calibration data).

The pass proves its result twice: every stored block is dequantized as the MatMulNBits spec
reads it and compared with the original weights (error within what the block's scale allows),
and ONNX Runtime's own kernel is run on one-hot rows to read back the same weights (the layout
it sees is the layout we checked). With ``max_drop`` the most sensitive MatMuls move to 8 bits,
then to float, fewest first, until perplexity (or the task metric, or agreement with float32)
stays within the budget.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper
from pydantic import Field

from onnxpipe.core import external, hardware
from onnxpipe.core.agreement import agreement_score, judge_cosine
from onnxpipe.core.compare import Comparison
from onnxpipe.core.deps import require
from onnxpipe.core.errors import InputError
from onnxpipe.core.graph import name_bytes
from onnxpipe.core.tensors import graph_inputs
from onnxpipe.passes.base import Pass, PassConfig, PassContext, PassResult
from onnxpipe.passes.quant_budget import fit_budget
from onnxpipe.passes.quant_by_weight import quantize_by_weight
from onnxpipe.passes.quant_data import RECIPE_HINT, StreamingReader, take_batches
from onnxpipe.passes.quant_layout import LayoutCheck, check_layout, node_attr
from onnxpipe.passes.quant_mix import (
    assemble,
    hide_weights,
    same_weights,
    sensitivity,
    suffix_new_tensors,
    summary,
    unhide_weights,
)
from onnxpipe.passes.quant_targets import lm_head, name_nodes, nested_nodes, weight_matmuls

MODES = {"int4": 4, "int8-weight-only": 8}
ALGORITHMS = ("rtn", "hqq", "gptq")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # ORT's weight-only tools log each node at INFO/WARNING and print GPTQ progress on stdout
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)



# -- the pass ------------------------------------------------------------------------------

class WeightOnlyQuantize(Pass):
    """int4 (or int8) weight-only quantization into MatMulNBits, checked block by block and against a budget.

    Example:
        >>> WeightOnlyQuantize({"mode": "int4", "algorithm": "gptq", "exclude_lm_head": True})
        quantize(mode='int4', algorithm='gptq', exclude_lm_head=True)
    """

    name = "quantize"
    lazy = True  # rtn and hqq quantize a model on disk weight by weight

    class Config(PassConfig):
        mode: Literal["int4", "int8-weight-only"]
        """int4: 4-bit weight blocks; int8-weight-only: 8-bit weight blocks (activations stay float in both)."""
        algorithm: Literal["rtn", "hqq", "gptq"] = "rtn"
        """rtn: round to nearest (ORT's default block quantizer); hqq: half-quadratic (no data);
        gptq: error-compensating, calibrated on data.calibration."""
        block_size: int | None = None
        """Weights per block along K (a power of two >= 16). None: 32 on CPU."""
        symmetric: bool = False
        """No zero points (one scale per block); asymmetric blocks keep more accuracy."""
        accuracy_level: Literal["auto", 0, 1, 2, 3, 4] = "auto"
        """MatMulNBits compute type: 0 as the inputs, 1 fp32, 2 fp16, 3 bf16, 4 int8. auto: what this CPU runs fast."""
        quantize_embeddings: bool = False
        """Also store Gather embedding tables in int4 blocks (GatherBlockQuantized; rtn, 4 bits)."""
        exclude_lm_head: bool = False
        """Keep the MatMul that computes the logits in float (found from the logits output)."""
        exclude_nodes: list[str] = []
        """Node names kept in float."""
        exclude_op_types: list[Literal["MatMul", "Gather"]] = []
        """Op types kept in float."""
        calibration_batches: int = Field(16, ge=1)
        """gptq: calibration batches streamed into ORT's GPTQ (it holds these inputs, not their activations)."""
        max_drop: float | None = Field(None, ge=0.0)
        """Budget: with perplexity, the allowed relative increase (0.05 = 5%); with a higher-is-better metric, its
        allowed drop; without a metric, 1 - cosine agreement with float32. Over budget, the most sensitive MatMuls
        move to 8 bits, then to float."""
        budget_batches: int = Field(4, ge=1)
        """Batches used to rank MatMuls (and to measure agreement when there is no metric)."""
        min_cosine: float = Field(0.98, ge=-1.0, le=1.0)
        """The pipeline's check: each output's mean cosine similarity with the float model."""
        min_top1: float | None = Field(None, ge=0.0, le=1.0)
        """The pipeline's check: top-1 agreement of outputs with a class axis (None: not checked)."""

    _layout: LayoutCheck | None = None

    def compare(self, before: Sequence[Mapping[str, np.ndarray]],
                after: Sequence[Mapping[str, np.ndarray]]) -> list[Comparison]:
        """Agreement with float32 (cosine, top-1) and the block-by-block layout check of apply."""
        comps = judge_cosine(before, after, min_cosine=self.config.min_cosine, min_top1=self.config.min_top1)
        if self._layout is not None:
            lay = self._layout
            # not an output: no max diff for the report's column; the numbers are in the detail
            comps.append(Comparison("weight blocks", 0.0, 0.0, lay.ok,
                                    0.0 if lay.ok else 1.0,
                                    f"{lay.nodes} MatMulNBits weights dequantized block by block; worst block "
                                    f"{lay.worst_steps:.2f} steps off, weights {lay.relative_error:.2%} off in rms"
                                    + ("" if lay.ok else f": {lay.failures[0]}")))
        return comps

    # -- planning -----------------------------------------------------------------------

    def plan(self, model: onnx.ModelProto) -> dict[str, Any]:
        c = self.config
        bits = MODES[c.mode]
        block = c.block_size or 32
        if block < 16 or block & (block - 1):
            raise InputError(f"block_size {block} is not a power of two >= 16", hint="use 16, 32, 64 or 128")
        if c.algorithm == "gptq" and bits != 4:
            raise InputError("ONNX Runtime's GPTQ writes MatMulNBits at 4 bits only", hint="use mode: int4, or algorithm: rtn")
        if c.algorithm == "hqq" and bits != 4:
            raise InputError("HQQ is used here at 4 bits only", hint="use mode: int4, or algorithm: rtn")
        if c.algorithm == "hqq" and c.symmetric:
            raise InputError("HQQ always stores (float) zero points", hint="drop symmetric: true, or use algorithm: rtn")
        if c.quantize_embeddings and bits != 4:
            raise InputError("embeddings are quantized at 4 bits only (GatherBlockQuantized)",
                             hint="use mode: int4, or quantize_embeddings: false")
        level, fast, why = hardware.weight_only_advice(bits)
        warnings = [] if fast else [f"int{bits} weight-only is likely slower than float32 here: {why}"]
        if c.accuracy_level != "auto":
            if c.accuracy_level != level:
                warnings.append(f"accuracy_level {c.accuracy_level} where {level} runs fastest here")
            level = int(c.accuracy_level)
        if bits == 8 and level < 4:
            warnings.append("8-bit MatMulNBits has no float kernel: with accuracy_level < 4 every weight block is "
                            "dequantized at each run (measured 20x slower than float32 on a large GEMV)")
        gemms = sum(n.op_type == "Gemm" for n in model.graph.node)
        if gemms:
            warnings.append(f"{gemms} Gemm node(s) stay float: ONNX Runtime's weight-only quantizer takes MatMul only "
                            "(exports of 3-D activations, as transformers give, use MatMul)")
        if c.algorithm == "hqq":
            warnings.append("hqq stores float zero points, which ONNX Runtime's blocked CPU kernels do not take: "
                            "its MatMulNBits dequantize at each run (measured 10x slower than float32 on a large "
                            "GEMV); prefer rtn or gptq for speed")
        weights = weight_matmuls(model)
        names = {n.name for n in model.graph.node}
        for name in c.exclude_nodes:
            if name not in names:
                close = difflib.get_close_matches(name, sorted(names), n=3)
                raise InputError(f"exclude_nodes: no node named {name!r}",
                                 hint=f"did you mean {', '.join(close)}?" if close else "see the names with onnxpipe inspect")
        excluded = set(c.exclude_nodes)
        head = lm_head(model)
        if c.exclude_lm_head:
            if head is None:
                raise InputError("exclude_lm_head: no MatMul with a constant weight computes the logits output",
                                 hint="name the node in exclude_nodes instead")
            excluded.add(head)
        op_types = ["MatMul"] + (["Gather"] if c.quantize_embeddings else [])
        op_types = [t for t in op_types if t not in c.exclude_op_types]
        candidates = [n for n in weights if n not in excluded] if "MatMul" in op_types else []
        gathers = [n.name for n in model.graph.node if n.op_type == "Gather" and "Gather" in op_types
                   and n.input[0] in {i.name for i in model.graph.initializer} and n.name not in excluded]
        gptq_odd = []
        if c.algorithm == "gptq" and not c.symmetric:
            dims = {i.name: list(i.dims) for i in model.graph.initializer}
            gptq_odd = [n for n in candidates if -(-dims[weights[n]][-2] // block) % 2]
            if gptq_odd:
                warnings.append(f"{len(gptq_odd)} MatMul(s) with an odd number of blocks per column go through rtn: "
                                "ONNX Runtime's GPTQ packs their zero points across columns (and fails); "
                                "symmetric: true or another block_size avoids it")
        if not candidates and not gathers:
            raise InputError("nothing to quantize: no MatMul with a constant float weight is left to quantize",
                             hint="check exclude_nodes / exclude_op_types / exclude_lm_head")
        return {"bits": bits, "block_size": block, "accuracy_level": level, "hardware": why, "warnings": warnings,
                "op_types": op_types, "candidates": candidates, "gathers": gathers, "excluded": sorted(excluded),
                "lm_head": head, "gptq_odd": gptq_odd}

    # -- running ORT's quantizer ----------------------------------------------------------

    def _gptq_reader(self, model: onnx.ModelProto, ctx: PassContext) -> Any:
        require("onnxruntime")
        from onnxruntime.quantization import CalibrationDataReader

        if ctx.calibration is None:
            raise InputError("algorithm gptq needs calibration data and none was given",
                             hint=f"set {RECIPE_HINT}, or use algorithm: rtn or hqq")
        source, inputs, limit = ctx.calibration, graph_inputs(model), self.config.calibration_batches

        class Stream(CalibrationDataReader):  # copyable: ORT deep-copies the reader, then iterates it
            def __init__(self) -> None:
                self.reader: StreamingReader | None = None

            def get_next(self) -> dict[str, np.ndarray] | None:
                if self.reader is None:
                    self.reader = StreamingReader(source, inputs, max_batches=limit)
                return self.reader.get_next()

            def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
                reader = StreamingReader(source, inputs, max_batches=limit)
                yield from iter(reader.get_next, None)

            def __deepcopy__(self, memo: dict) -> Stream:
                return Stream()

        return Stream()

    def quantize(self, model: onnx.ModelProto, bits: int, algorithm: str, plan: dict[str, Any],
                 exclude: Sequence[str], ctx: PassContext) -> onnx.ModelProto:
        """One whole-model run of ORT's MatMulNBitsQuantizer."""
        require("onnxruntime")
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq

        c = self.config
        block, level = plan["block_size"], plan["accuracy_level"]
        op_types = tuple(t for t in plan["op_types"] if bits == 4 or t == "MatMul")
        if external.lazy_bytes(model):  # weights on disk: never all of them in memory
            nested = nested_nodes(model)
            if algorithm == "gptq" or nested:
                ctx.log("quantize: " + ("gptq runs the whole model on calibration data" if algorithm == "gptq" else
                                        f"{nested} MatMul/Gather node(s) inside If/Loop bodies")
                        + ": the weights are read into memory for ONNX Runtime's whole-model quantizer")
                model = external.materialize(model)
            else:
                # what the whole-model quantizer would be offered: every MatMul with a constant weight (and
                # Gather with a constant table) not excluded; it may still leave some as they are
                skip = set(exclude)
                tables = {i.name for i in model.graph.initializer}
                targets = [n for n in weight_matmuls(model) if "MatMul" in op_types and n not in skip]
                targets += [n.name for n in model.graph.node if "Gather" in op_types and n.op_type == "Gather"
                            and n.input[0] in tables and n.name not in skip]
                return quantize_by_weight(model, targets,
                                          lambda tiny: self.quantize(tiny, bits, algorithm, plan, [], ctx), ctx.log)
        first_exclude = [*exclude, *(plan.get("gptq_odd", []) if algorithm == "gptq" else [])]
        if algorithm == "hqq":
            algo: Any = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits, op_types_to_quantize=("MatMul",))
        elif algorithm == "gptq":
            algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=self._gptq_reader(model, ctx),
                                                 op_types_to_quantize=("MatMul",))
        else:
            algo = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=c.symmetric, accuracy_level=level,
                                                    op_types_to_quantize=op_types, bits=bits)
        work = onnx.ModelProto()
        work.CopyFrom(model)
        if algorithm == "gptq":  # ORT's GPTQ ignores nodes_to_exclude: it skips weights that are no initializer
            hide_weights(work, set(first_exclude))
        with _quiet():
            q = mnq.MatMulNBitsQuantizer(work, bits=bits, block_size=block, is_symmetric=c.symmetric,
                                         accuracy_level=level, nodes_to_exclude=first_exclude, algo_config=algo)
            q.process()
        out = q.model.model if hasattr(q.model, "model") else q.model
        if algorithm == "gptq":
            unhide_weights(out)
        # a second run of the default (rtn) quantizer for what the chosen algorithm cannot take:
        # embeddings (hqq, gptq), and for asymmetric gptq the MatMuls with an odd number of blocks per
        # column, whose zero points ORT's GPTQ packs across columns (then fails to reshape them)
        odd = plan.get("gptq_odd", []) if algorithm == "gptq" else []
        second = (["MatMul"] if odd else []) + (["Gather"] if algorithm != "rtn" and "Gather" in op_types else [])
        if second:
            keep = [n.name for n in out.graph.node if n.op_type == "MatMul" and n.name not in odd]
            rtn = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=c.symmetric, accuracy_level=level,
                                                   op_types_to_quantize=tuple(second), bits=4)
            with _quiet():
                q = mnq.MatMulNBitsQuantizer(out, bits=4, block_size=block, is_symmetric=c.symmetric,
                                             accuracy_level=level, nodes_to_exclude=[*exclude, *keep], algo_config=rtn)
                q.process()
            out = q.model.model
        if any(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in out.graph.node) and not any(
                o.domain == "com.microsoft" for o in out.opset_import):  # ORT's GPTQ path does not declare it
            out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        if level:  # ORT's HQQ leaves accuracy_level unset: the same compute type for every MatMulNBits
            for node in out.graph.node:
                if node.op_type == "MatMulNBits" and node_attr(node, "accuracy_level") is None:
                    node.attribute.append(helper.make_attribute("accuracy_level", level))
        return out

    def _prepare(self, model: onnx.ModelProto, plan: dict[str, Any]) -> onnx.ModelProto:
        prepared = onnx.ModelProto()
        prepared.CopyFrom(model)
        name_nodes(prepared)
        opset = next((o.version for o in prepared.opset_import if o.domain in ("", "ai.onnx")), 0)
        if plan["gathers"] and opset < 21:  # int4 tensors (GatherBlockQuantized's table) need opset 21
            from onnxpipe.core.graph import convert_opset

            try:
                prepared = convert_opset(prepared, 21)
            except Exception as exc:  # noqa: BLE001 - the converter raises many kinds; the user gets one line
                raise InputError(f"quantizing embeddings needs opset 21 and converting this opset {opset} model "
                                 f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                                 hint="set quantize_embeddings: false") from exc
        return prepared

    # -- the budget --------------------------------------------------------------------

    def _budget(self, model: onnx.ModelProto, prepared: onnx.ModelProto, variants: dict[int, onnx.ModelProto],
                plan: dict[str, Any], ctx: PassContext) -> dict[str, Any]:
        c = self.config
        bits = plan["bits"]
        if ctx.calibration is not None:
            batches = take_batches(ctx.calibration, graph_inputs(model), c.budget_batches)
        else:
            batches = [dict(b) for b in ctx.check_inputs[: c.budget_batches]]
        from onnxpipe.core.compare import outputs_on

        lower = ctx.metric is not None and getattr(ctx.metric, "higher_is_better", True) is False
        if ctx.metric is not None:
            reference = float(ctx.metric(model))
            name = getattr(ctx.metric, "__name__", "metric")

            def drop_of(value: float) -> float:
                return value / reference - 1.0 if lower else reference - value
            kind = f"{name} ({'relative increase' if lower else 'drop'})"

            def measure(m: onnx.ModelProto) -> float:
                return float(ctx.metric(m))  # type: ignore[misc]
        else:
            if not batches:
                raise InputError("max_drop needs data to measure the drop on", hint=f"set {RECIPE_HINT}")
            ref_outputs = outputs_on(model, batches)
            reference, kind = 1.0, "1 - cosine agreement with float32"

            def drop_of(value: float) -> float:
                return 1.0 - value

            def measure(m: onnx.ModelProto) -> float:
                return agreement_score(ref_outputs, outputs_on(m, batches), "cosine")
        base = variants[bits]
        first = measure(base)
        trials: list[dict[str, Any]] = [{"stage": f"all int{bits}", "nodes": [], "metric": first, "drop": drop_of(first)}]
        notes: dict[str, Any] = {"metric": kind, "metric_float": reference, f"metric_int{bits}": first,
                                 "max_drop": c.max_drop, "trials": trials}
        ctx.log(f"quantize: {kind}: float {reference:.5g}, int{bits} {first:.5g} (drop {drop_of(first):.4g})")
        if drop_of(first) <= c.max_drop:
            notes.update(budget_met=True, drop=drop_of(first), model=base, kept_8bit=[], kept_float=[])
            return notes
        if not batches:
            raise InputError("max_drop needs data to rank the MatMuls on", hint=f"set {RECIPE_HINT}")
        sens = sensitivity(prepared, base, plan["candidates"], batches)
        ranked = sorted(sens, key=lambda n: -sens[n])
        notes["ranking"] = [{"node": n, "relative_error": round(sens[n], 5)} for n in ranked[:20]]
        ctx.log("quantize: most sensitive MatMuls: " + ", ".join(f"{n} ({sens[n]:.3g})" for n in ranked[:3]))
        ladders = ([(8, "8-bit")] if bits == 4 else []) + [(None, "float")]
        result = None
        for level, label in ladders:
            def evaluate(nodes: list[str], level: int | None = level, label: str = label) -> tuple[float, onnx.ModelProto]:
                m = assemble(prepared, variants, {n: level for n in nodes}, bits)
                value = measure(m)
                trials.append({"stage": f"most sensitive in {label}", "nodes": list(nodes), "metric": value,
                               "drop": drop_of(value)})
                ctx.log(f"quantize: {len(nodes)} MatMuls in {label} -> {kind} {drop_of(value):.4g}")
                return -drop_of(value), m
            # every MatMul in float is no quantization at all: the float ladder stops one short
            limit = len(ranked) - (1 if level is None else 0)
            result = fit_budget(ranked, evaluate, 0.0, c.max_drop, baseline=(-drop_of(first), base), limit=limit)
            if result.met:
                notes.update(budget_met=True, drop=result.drop, model=result.model,
                             kept_8bit=list(result.excluded) if level == 8 else [],
                             kept_float=list(result.excluded) if level is None else [])
                return notes
        assert result is not None
        notes.update(budget_met=False, drop=result.drop, model=None, kept_8bit=[], kept_float=[])
        return notes

    # -- the pass ----------------------------------------------------------------------

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        c = self.config
        self._layout = None
        plan = self.plan(model)
        bits = plan["bits"]
        ctx.log(f"quantize: int{bits} weight-only ({c.algorithm}, block {plan['block_size']}, "
                f"{'symmetric' if c.symmetric else 'asymmetric'}, accuracy_level {plan['accuracy_level']}); "
                f"{plan['hardware']}")
        for w in plan["warnings"]:
            ctx.log(f"quantize: warning: {w}")
        prepared = self._prepare(model, plan)
        skip = plan["excluded"]
        quantized = self.quantize(prepared, bits, c.algorithm, plan, skip, ctx)
        variants = {bits: quantized}
        if c.algorithm == "gptq" and same_weights(quantized, self.quantize(prepared, bits, "rtn", plan, skip, ctx)):
            plan["warnings"].append("ONNX Runtime's GPTQ gave exactly the rtn weights: its error compensation updates "
                                    "along a column of an upper-triangular factor (zero below the diagonal), so "
                                    "nothing is compensated in this onnxruntime version")
            ctx.log(f"quantize: warning: {plan['warnings'][-1]}")
        notes: dict[str, Any] = {
            "mode": c.mode, "weight_bits": bits, "algorithm": c.algorithm, "block_size": plan["block_size"],
            "symmetric": c.symmetric, "accuracy_level": plan["accuracy_level"], "hardware": plan["hardware"],
            "warnings": plan["warnings"], "lm_head": plan["lm_head"], "excluded": skip,
            "gptq_rtn_fallback": plan["gptq_odd"],
            "embeddings_quantized": sum(n.op_type == "GatherBlockQuantized" for n in quantized.graph.node),
        }
        if c.max_drop is not None:
            if bits == 4:
                variants[8] = suffix_new_tensors(
                    prepared, self.quantize(prepared, 8, "rtn", {**plan, "op_types": ["MatMul"]}, skip, ctx), "_int8")
            budget = self._budget(model, prepared, variants, plan, ctx)
            best = budget.pop("model")
            notes.update(budget)
            if best is None:
                ctx.log(f"quantize: max_drop={c.max_drop:g} cannot be met (best {budget['drop']:.4g}); "
                        "the model stays float")
                return PassResult(model, modified=False, notes=notes)
            quantized = best
        self._layout = check_layout(prepared, quantized, c.algorithm, c.symmetric, bits=bits)
        notes["layout_check"] = self._layout.as_dict()
        counts = {b: sum(n.op_type == "MatMulNBits" and node_attr(n, "bits") == b for n in quantized.graph.node)
                  for b in (4, 8)}
        weighted = set(weight_matmuls(prepared))
        notes["matmuls"] = {"int4": counts[4], "int8": counts[8],
                            "float": sum(n.op_type == "MatMul" and n.name in weighted for n in quantized.graph.node)}
        size = quantized.ByteSize() + external.lazy_bytes(quantized)
        notes["size_bytes"] = {"before": model.ByteSize() + external.lazy_bytes(model), "after": size}
        notes["name_bytes"] = name_bytes(quantized)
        notes["summary"] = summary(notes, quantized, weighted)
        ctx.log(f"quantize: {counts[4]} MatMuls in int4, {counts[8]} in int8, {notes['matmuls']['float']} in float; "
                f"{notes['embeddings_quantized']} embeddings quantized; layout check "
                + ("ok" if self._layout.ok else "FAILED: " + self._layout.failures[0]))
        return PassResult(quantized, notes=notes)
