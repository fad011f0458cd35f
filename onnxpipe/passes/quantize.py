"""quantize: int8 by ONNX Runtime's quantizers, with formats chosen for the target hardware and an accuracy budget.

``dynamic`` quantizes weights ahead of time and activations at run time (MatMul-heavy models,
transformers, on CPU). ``static`` calibrates activation ranges on streamed data and writes
QDQ (default; the form TensorRT takes) or QOperator models. The pass says what this machine
can accelerate, picks uint8 or int8 activations accordingly, and with ``max_drop`` keeps the
nodes that lose the most accuracy in float until the drop fits the budget.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from pydantic import Field

from onnxpipe.core import external, hardware, skeleton
from onnxpipe.core.agreement import judge_cosine
from onnxpipe.core.compare import Comparison
from onnxpipe.core.deps import require
from onnxpipe.core.errors import InputError
from onnxpipe.core.files import scratch_cwd
from onnxpipe.core.graph import name_bytes
from onnxpipe.core.modelio import EXTERNAL_DATA_THRESHOLD, load_model, save_model, tensor_bytes
from onnxpipe.core.userfiles import first_line
from onnxpipe.passes.base import Pass, PassConfig, PassContext, PassResult
from onnxpipe.passes.quant_budget import changed_nodes, search_budget
from onnxpipe.passes.quant_data import RECIPE_HINT
from onnxpipe.passes.quant_ort import Plan, ort_quantizer, prune_opsets, quiet, registry

CONV_OPS = ("Conv", "ConvTranspose")
MIN_OPSET = 13
NAMES_WORTH_STRIPPING = 0.1  # share of the file above which the pass points to strip


def _conv_share(model: onnx.ModelProto) -> float:
    """Fraction of the multiply-accumulates in convolutions (by node count if MACs cannot be counted)."""
    from onnxpipe.core.analysis import summarize

    try:
        cost = summarize(model).cost_by_op
    except Exception:  # noqa: BLE001 - counting is advice; node counts decide instead
        cost = {}
    total = sum(c.macs for c in cost.values())
    if total > 0:
        return sum(c.macs for op, c in cost.items() if op in CONV_OPS) / total
    heavy = [n for n in model.graph.node if n.op_type in CONV_OPS + ("MatMul", "Gemm")]
    return sum(n.op_type in CONV_OPS for n in heavy) / len(heavy) if heavy else 0.0


WEIGHT_ONLY_MODES = ("int4", "int8-weight-only")


def _weight_only(config: Any) -> bool:
    mode = config.get("mode") if isinstance(config, Mapping) else getattr(config, "mode", None)
    return mode in WEIGHT_ONLY_MODES


class Quantize(Pass):
    """int8 quantization, dynamic or static, checked by cosine similarity against the float model.

    Example:
        >>> Quantize({"mode": "static", "calibration": "percentile", "max_drop": 0.01})
        quantize(mode='static', calibration='percentile', max_drop=0.01)
    """

    name = "quantize"
    lazy = True  # file to file through ONNX Runtime's quantizer: a model on disk is streamed there, not read in

    def __new__(cls, config: Mapping[str, Any] | PassConfig | None = None) -> Any:
        # weight-only modes are their own pass (passes/quant_weight_only.py) behind the same name
        if cls is Quantize and _weight_only(config):
            from onnxpipe.passes.quant_weight_only import WeightOnlyQuantize

            return WeightOnlyQuantize(config)
        return super().__new__(cls)

    @classmethod
    def parse_config(cls, raw: Mapping[str, Any]) -> PassConfig:
        if cls is Quantize and _weight_only(raw):
            from onnxpipe.passes.quant_weight_only import WeightOnlyQuantize

            return WeightOnlyQuantize.parse_config(raw)
        return super().parse_config(raw)

    class Config(PassConfig):
        mode: Literal["auto", "dynamic", "static", "int4", "int8-weight-only"] = "auto"
        """auto: static when convolutions do most of the work (or for cuda/tensorrt), else dynamic.
        int4 / int8-weight-only: weights only, in blocks, into MatMulNBits (see passes/quant_weight_only.py)."""
        target: Literal["cpu", "cuda", "tensorrt"] = "cpu"
        """Where the model will run: decides formats, types and symmetry."""
        format: Literal["qdq", "qoperator"] = "qdq"
        """Static models: QDQ (QuantizeLinear/DequantizeLinear around float ops) or QOperator (QLinearConv, ...)."""
        activation_type: Literal["auto", "uint8", "int8"] = "auto"
        """Static activations; auto picks what this CPU runs fast (see onnxpipe.core.hardware)."""
        activation_symmetric: bool | None = None
        """Symmetric activation ranges; None: symmetric for cuda/tensorrt, asymmetric on CPU."""
        per_channel: bool = True
        """One scale per output channel of each weight (far more accurate than per tensor)."""
        reduce_range: bool | None = None
        """7-bit weights. None: on where uint8 x int8 sums saturate (x86 without VNNI) and weights are
        per channel (each channel then spans the full int8 range); 8 bits elsewhere."""
        quantize_bias: bool | None = None
        """Static QDQ: store biases as int32 behind a DequantizeLinear (ORT's default) rather than in float.
        None: float. TensorRT rejects DequantizeLinear on int32, and ONNX Runtime's CPU kernels quantize a
        float bias themselves when they fuse a QDQ group (same results, a smaller file). QOperator
        kernels (QLinearConv, QGemm) always take int32 biases."""
        calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
        """How activation ranges come from the calibration data."""
        percentile: float = Field(99.999, gt=50.0, le=100.0)
        """The percentile kept by ``calibration: percentile``."""
        calibration_batches: int | None = Field(None, ge=1)
        """Use at most this many calibration batches (None: all of them)."""
        preprocess: bool = True
        """Run ORT's quant_pre_process (shape inference, graph optimizations) first."""
        op_types: list[str] = []
        """Op types to quantize; empty: every type ORT quantizes in this mode and format."""
        exclude_op_types: list[str] = []
        """Op types kept in float."""
        exclude_nodes: list[str] = []
        """Node names kept in float."""
        max_drop: float | None = Field(None, ge=0.0)
        """Accuracy budget in metric units (or 1 - agreement; for a lower-is-better metric such as perplexity, the
        allowed relative increase): more sensitive nodes stay float until it holds."""
        agreement: Literal["cosine", "top1"] = "cosine"
        """Without a metric, the budget is measured as mean cosine or top-1 agreement with the float model."""
        budget_batches: int = Field(8, ge=1)
        """Batches used to measure agreement and rank nodes when there is no metric."""
        max_float_nodes: int | None = Field(None, ge=1)
        """At most this many nodes kept in float by the budget search."""
        min_cosine: float = Field(0.98, ge=-1.0, le=1.0)
        """The pipeline's check: each output's mean cosine similarity with the float model."""
        min_top1: float | None = Field(None, ge=0.0, le=1.0)
        """The pipeline's check: top-1 agreement of outputs with a class axis (None: not checked; integer
        outputs then need 90% of their elements equal)."""

    def compare(self, before: Sequence[Mapping[str, np.ndarray]],
                after: Sequence[Mapping[str, np.ndarray]]) -> list[Comparison]:
        """int8 changes every value a little: judge agreement, not elementwise tolerance."""
        return judge_cosine(before, after, min_cosine=self.config.min_cosine, min_top1=self.config.min_top1)

    # -- planning -------------------------------------------------------------------------

    def plan(self, model: onnx.ModelProto, has_calibration: bool) -> Plan:
        """Decide mode, format and types for this model, target and machine; refuse what cannot work."""
        c = self.config
        fast, advice = hardware.int8_advice("cpu" if c.target == "cpu" else "cuda")
        warnings = [] if fast else [f"int8 is likely slower than float32 here: {advice}"]
        if c.mode != "auto":
            mode, reason = c.mode, "as configured"
        elif c.target != "cpu":
            mode, reason = "static", f"{c.target} runs int8 only from calibrated QDQ models"
        else:
            share = _conv_share(model)
            mode = "static" if share >= 0.5 else "dynamic"
            reason = f"{share:.0%} of the compute is convolution" + (
                " (static suits CNNs)" if mode == "static" else " (dynamic suits MatMul-heavy models)")
        if mode == "dynamic" and c.target != "cpu":
            raise InputError(f"dynamic int8 does not run on {c.target}: ONNX Runtime has no CUDA kernel for "
                             "ConvInteger nor for uint8 DynamicQuantizeLinear/MatMulInteger, so those nodes would "
                             "fall back to the CPU", hint="use mode: static (QDQ) for cuda/tensorrt, or target: cpu")
        if mode == "static" and not has_calibration:
            why = "" if c.mode == "static" else f" (mode auto chose static: {reason})"
            raise InputError(f"static int8 quantization needs calibration data and none was given{why}",
                             hint=f"set {RECIPE_HINT}, or use mode: dynamic")
        fmt = c.format if mode == "static" else "integer-ops"
        if c.target == "tensorrt" and fmt == "qoperator":
            raise InputError("TensorRT takes int8 only as QDQ, not QOperator", hint="use format: qdq")
        act, why = hardware.int8_activation_type(c.target, c.format)
        if mode == "dynamic":
            act, why = "uint8", "dynamic quantization computes uint8 activations at run time (U8S8)"
        elif c.activation_type != "auto":
            if c.target == "tensorrt" and c.activation_type == "uint8":
                raise InputError("TensorRT takes signed int8 activations only", hint="use activation_type: int8 or auto")
            if c.activation_type != act:
                warnings.append(f"activation_type {c.activation_type} where {act} runs faster here: {why}")
            act, why = c.activation_type, "as configured"
        symmetric = c.target != "cpu" if c.activation_symmetric is None else c.activation_symmetric
        if c.target == "tensorrt" and not symmetric:
            raise InputError("TensorRT takes symmetric int8 only (zero point 0)", hint="drop activation_symmetric: false")
        quantize_bias = fmt == "qoperator"  # QOperator kernels take int32 biases; dynamic mode keeps them float
        if fmt == "qdq":
            quantize_bias = bool(c.quantize_bias)
            if quantize_bias and c.target == "tensorrt":
                raise InputError("TensorRT rejects DequantizeLinear on int32 biases",
                                 hint="drop quantize_bias: true; TensorRT folds float biases into its int8 kernels")
        elif mode == "static" and c.quantize_bias is False:
            warnings.append("quantize_bias: false has no effect on QOperator models: QLinearConv and QGemm "
                            "take int32 biases")
        if c.target == "cuda" and mode == "static":
            warnings.append("ONNX Runtime's CUDA provider runs QDQ models through float kernels; "
                            "int8 speed on NVIDIA GPUs comes through TensorRT (target: tensorrt)")
        supported = registry(mode, fmt if mode == "static" else "")
        unknown = sorted(set(c.op_types) - set(supported))
        if unknown:
            raise InputError(f"ONNX Runtime cannot quantize op type(s) {', '.join(unknown)} in {mode} {fmt} form",
                             hint=f"supported: {', '.join(supported)}")
        op_types = [t for t in (c.op_types or supported) if t not in c.exclude_op_types]
        # dynamic mode quantizes a Gemm as the MatMul ORT splits it into
        present = {n.op_type for n in model.graph.node} | ({"MatMul"} if mode == "dynamic" and any(
            n.op_type == "Gemm" for n in model.graph.node) and "Gemm" not in c.exclude_op_types else set())
        if not present.intersection(op_types):
            raise InputError(f"nothing to quantize: the model has none of the op types {', '.join(op_types)}",
                             hint="check op_types / exclude_op_types")
        reduce_range = c.reduce_range
        if reduce_range is None:
            reduce_range = act == "uint8" and c.per_channel and c.target == "cpu" and hardware.u8s8_saturates()
        hw = f"{advice}; activations {act}: {why}" + (
            "; 7-bit weights: uint8 x int8 pair sums saturate int16 without VNNI" if reduce_range else "")
        return Plan(mode, reason, fmt, act, symmetric, reduce_range, quantize_bias, op_types, hw, warnings)

    # -- preparation ----------------------------------------------------------------------

    def _prepare(self, model: onnx.ModelProto, work: Path, big: bool) -> tuple[Path, str]:
        """The float model ready to quantize, written under ``work``: opset 13+, pre-processed, every node named."""
        from onnxpipe.core.graph import convert_opset, default_opset

        opset = default_opset(model)
        if opset < MIN_OPSET:  # per-channel Q/DQ needs the axis attribute of opset 13
            try:
                model = external.with_weights_if_needed(lambda m: convert_opset(m, MIN_OPSET), model)
            except Exception as exc:  # noqa: BLE001 - the converter raises many kinds; the user gets one line
                raise InputError(f"int8 quantization needs opset >= {MIN_OPSET} and converting this opset {opset} "
                                 f"model failed: {first_line(exc)}", hint="export the model at opset 13 or later") from exc
        target, status = work / "prepared.onnx", "skipped"
        taken: dict[str, onnx.TensorProto] = {}
        if self.config.preprocess and external.lazy_bytes(model):
            # weights on disk: pre-processing (shape inference, ORT's basic optimizations) runs on the skeleton,
            # the large weights as inputs, instead of loading them all (and keeping copies) in ONNX Runtime
            bare, taken = skeleton.hollow(model)
            source = work / "skeleton.onnx"
            save_model(bare, source, external_data=False)
        else:
            source = work / "float.onnx"
            save_model(model, source, external_data=big)
        source_big = big and not taken  # the skeleton is small whatever the model's size
        if self.config.preprocess:
            require("onnxruntime")
            from onnxruntime.quantization import quant_pre_process

            failures = []
            for label, opts in (("full", {}), ("without symbolic shapes", {"skip_symbolic_shape": True})):
                try:
                    with quiet(), scratch_cwd():  # its shape inference drops debug files into the cwd
                        quant_pre_process(str(source), str(target), save_as_external_data=source_big,
                                          all_tensors_to_one_file=True, **opts)
                    status = label
                    break
                except Exception as exc:  # noqa: BLE001 - pre-processing helps; quantizing without it still works
                    failures.append(f"{label}: {first_line(exc)}")
            else:
                status = "failed (" + "; ".join(failures) + ")"
        prepared = load_model(target if target.exists() else source, load_external_data=not source_big)
        if taken:
            prepared = skeleton.fill(prepared, taken, model)
        seen = {n.name for n in prepared.graph.node if n.name}
        for i, node in enumerate(prepared.graph.node):  # nodes_to_exclude works by name
            if not node.name:
                name = f"{node.op_type}_{i}"
                while name in seen:
                    name += "_"
                node.name = name
                seen.add(name)
        save_model(prepared, target, external_data=big)
        return target, status

    def _check_exclusions(self, model: onnx.ModelProto, prepared: onnx.ModelProto) -> list[str]:
        import difflib

        ours = {n.name for n in prepared.graph.node}
        theirs = {n.name for n in model.graph.node}
        notes = []
        for name in self.config.exclude_nodes:
            if name in ours:
                continue
            if name in theirs:
                notes.append(f"node {name!r} was merged away by pre-processing; exclude its successor "
                             "or set preprocess: false")
                continue
            close = difflib.get_close_matches(name, sorted(ours | theirs), n=3)
            raise InputError(f"exclude_nodes: no node named {name!r}",
                             hint=f"did you mean {', '.join(close)}?" if close else "see the names with onnxpipe inspect")
        return notes

    # -- the pass -------------------------------------------------------------------------

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        c = self.config
        plan = self.plan(model, ctx.calibration is not None)
        ctx.log(f"quantize: {plan.mode} ({plan.reason}); {plan.hardware}")
        for w in plan.warnings:
            ctx.log(f"quantize: warning: {w}")
        on_disk = external.lazy_bytes(model)
        big = bool(on_disk) or tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
        with contextlib.ExitStack() as stack:
            work = ctx.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onnxpipe-quant-")))
            prepared_path, pre_status = self._prepare(model, work, big)
            prepared = load_model(prepared_path, load_external_data=not on_disk)
            warnings = plan.warnings + self._check_exclusions(model, prepared)
            quantize, calib = ort_quantizer(c, plan, prepared_path, work, ctx, big)
            quantized = quantize()
            twin = quantized if plan.fmt != "qoperator" else None
            quantized_nodes = changed_nodes(prepared, quantized)
            notes: dict[str, Any] = {
                "mode": plan.mode, "mode_reason": plan.reason, "target": c.target, "format": plan.fmt,
                "activation_type": plan.activation, "weight_type": "int8", "per_channel": c.per_channel,
                "activation_symmetric": plan.symmetric, "reduce_range": plan.reduce_range,
                "bias": "int32" if plan.quantize_bias else "float32",
                "hardware": plan.hardware, "preprocess": pre_status, "warnings": warnings,
                "nodes_quantized": len(quantized_nodes), "op_types": plan.op_types,
            }
            if calib:
                notes["calibration"] = {"method": c.calibration, **calib}
            if c.max_drop is not None:
                if twin is None:  # QOperator renames every tensor: rank on the QDQ twin of the same ranges
                    twin = quantize(fmt="qdq")
                budget = search_budget(model, prepared, prepared_path, twin, quantized, quantize, ctx, work,
                                       max_drop=c.max_drop, agreement=c.agreement, n_batches=c.budget_batches,
                                       max_float_nodes=c.max_float_nodes)
                best = budget.pop("model")
                notes.update(budget)
                if not budget["budget_met"]:
                    ctx.log(f"quantize: max_drop={c.max_drop:g} cannot be met (best drop {budget['drop']:.4g} with "
                            f"{len(budget['nodes_kept_float'])} nodes in float); the model stays float32")
                    return PassResult(model, modified=False, notes=notes)
                quantized = best
                notes["nodes_quantized"] = len(changed_nodes(prepared, quantized))
            if external.lazy_bytes(quantized):  # its data file is in the work folder, removed after the pass
                quantized = external.adopt(quantized)
        quantized = prune_opsets(quantized)
        size = quantized.ByteSize() + external.lazy_bytes(quantized)
        notes["size_bytes"] = {"before": model.ByteSize() + on_disk, "after": size}
        notes["name_bytes"] = name_bytes(quantized)
        if notes["name_bytes"] > NAMES_WORTH_STRIPPING * size:  # small models: names are a real share of the file
            ctx.log(f"quantize: tensor and node names are {notes['name_bytes'] / size:.0%} of this {size:,}-byte "
                    "model; the strip pass shortens them")
        kept = notes.get("nodes_kept_float")
        ctx.log(f"quantize: {notes['nodes_quantized']} nodes in int8 ({plan.mode}, {plan.fmt}, {plan.activation} "
                "activations)" + (f", {len(kept)} kept in float for max_drop" if kept else ""))
        return PassResult(quantized, notes=notes)
