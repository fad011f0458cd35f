"""ONNX Runtime's quantizers as the quantize pass drives them: the plan it decided, the op registries,
and ``quantize(excluded, fmt, only) -> model`` closures that calibrate once and re-quantize cheaply
(the accuracy budget calls them many times)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxpipe.core import external
from onnxpipe.core.deps import require
from onnxpipe.core.graph import subgraphs, toposort
from onnxpipe.core.modelio import load_model
from onnxpipe.core.tensors import graph_inputs
from onnxpipe.passes.base import PassContext
from onnxpipe.passes.quant_data import StreamingReader, calibrate, progress_bar
from onnxpipe.passes.quant_targets import nested_nodes


@dataclass
class Plan:
    """What the pass decided to do, and why: the first lines of its report."""

    mode: str
    reason: str
    fmt: str
    activation: str
    symmetric: bool
    reduce_range: bool
    quantize_bias: bool
    op_types: list[str]
    hardware: str
    warnings: list[str] = field(default_factory=list)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence ORT's quantization tools, which log advice and progress at WARNING on the root logger."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def registry(mode: str, fmt: str) -> list[str]:
    """The op types ORT's quantizer handles in ``mode`` (and static ``fmt``)."""
    require("onnxruntime")
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry

    table = IntegerOpsRegistry if mode == "dynamic" else QDQRegistry if fmt == "qdq" else QLinearOpsRegistry
    return sorted(table)


def load_sorted(path: Path) -> onnx.ModelProto:
    """Load a quantizer's output, nodes sorted again (ORT sorts them without the outer-scope inputs of If/Loop bodies)."""
    model = load_model(path, load_external_data=False)  # a big output's weights stay in its data file
    toposort(model.graph)
    return model


def prune_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop opset imports no node uses (ORT's optimizer saves a dozen; tools downstream warn on them)."""
    used, graphs = {"", "ai.onnx"}, [model.graph]
    while graphs:  # If/Loop bodies count too
        g = graphs.pop()
        for n in g.node:
            used.add(n.domain)
            graphs.extend(subgraphs(n))
    keep = [o for o in model.opset_import if o.domain in used]
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)
    return model


def _dynamic_by_weight(model: onnx.ModelProto, op_types: Sequence[str], excluded: set[str],
                       only: Sequence[str] | None, dynamic: Callable[..., None], work: Path,
                       ctx: PassContext) -> onnx.ModelProto:
    """ORT's dynamic quantizer on each group of nodes that share weights (:mod:`quant_by_weight`): every node it
    would take reads a weight (it quantizes MatMuls with a constant B only), and it quantizes each on its own."""
    from onnxpipe.passes.quant_by_weight import quantize_by_weight

    wanted = set(only) if only else None
    targets = [n.name for n in model.graph.node if n.op_type in set(op_types) | {"Gemm"} and n.name
               and n.name not in excluded and (wanted is None or n.name in wanted)]
    counter = iter(range(1 << 30))

    def one(tiny: onnx.ModelProto) -> onnx.ModelProto:
        k = next(counter)
        source, out = work / f"group-{k}.onnx", work / f"group-{k}-int8.onnx"
        onnx.save_model(tiny, str(source))
        dynamic(source, out, external_data=False)
        quantized = onnx.load(str(out))
        source.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        return quantized

    return quantize_by_weight(model, targets, one, ctx.log)


def ort_quantizer(c: Any, plan: Plan, prepared: Path, work: Path, ctx: PassContext,
                  big: bool) -> tuple[Callable[..., onnx.ModelProto], dict[str, Any]]:
    """``quantize(excluded=(), fmt=None, only=None) -> model`` by ORT's dynamic or static quantizer for
    ``plan`` and the pass config ``c``; static models calibrate once and reuse the ranges."""
    require("onnxruntime")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    counter = iter(range(1 << 30))
    info: dict[str, Any] = {}
    if plan.mode == "dynamic":
        # ORT's dynamic quantizer turns Gemm into MatMul "<name>_MatMul" + Add before it
        # looks at nodes_to_exclude: a Gemm kept in float must be named that way too
        gemms = {n.name for n in onnx.load(str(prepared), load_external_data=False).graph.node
                 if n.op_type == "Gemm"}
        always = [*c.exclude_nodes, *(gemms if "Gemm" in c.exclude_op_types else ())]

        def ort_names(names: Sequence[str]) -> list[str]:
            return [*names, *(f"{n}_MatMul" for n in names if n in gemms)]

        def dynamic(source: Path, out: Path, excluded: Sequence[str] = (), only: Sequence[str] | None = None,
                    external_data: bool = big) -> None:
            with quiet():
                quantize_dynamic(str(source), str(out), op_types_to_quantize=plan.op_types,
                                 per_channel=c.per_channel, reduce_range=plan.reduce_range,
                                 weight_type=QuantType.QInt8, nodes_to_exclude=ort_names(excluded),
                                 nodes_to_quantize=ort_names(only) if only else None,
                                 use_external_data_format=external_data)

        def run_dynamic(excluded: Sequence[str] = (), fmt: str | None = None,
                        only: Sequence[str] | None = None) -> onnx.ModelProto:
            out = work / f"dynamic-{next(counter)}.onnx"
            header = load_model(prepared, load_external_data=False)
            if external.lazy_bytes(header) and not nested_nodes(header, plan.op_types):  # weights on disk: group by group, never all in memory
                return _dynamic_by_weight(header, plan.op_types, {*always, *excluded}, only, dynamic, out.parent, ctx)
            dynamic(prepared, out, [*always, *excluded], only)
            return load_sorted(out)
        return run_dynamic, info

    inputs = graph_inputs(onnx.load(str(prepared), load_external_data=False))
    # a QOperator model is ranked through its QDQ twin: calibrate the ops of both forms
    twin_ops = [t for t in registry("static", "qdq") if t not in c.exclude_op_types]
    calib_ops = sorted(set(plan.op_types) | (set(twin_ops) if plan.fmt == "qoperator" else set()))
    cache = work / "calibration.json"
    with progress_bar("quantize: calibrating ({task.fields[samples]} samples)") as bar:
        task = bar.add_task("calibrate", total=c.calibration_batches, samples=0)
        reader = StreamingReader(ctx.calibration, inputs, max_batches=c.calibration_batches)
        reader.on_batch = lambda _: bar.update(task, completed=reader.batches, samples=reader.samples,
                                               total=c.calibration_batches or reader.total)

        def progress(batches: int, samples: int) -> None:
            ctx.log(f"quantize: calibrated on {batches} batches ({samples} samples)")

        with quiet():
            ranges = calibrate(prepared, reader, method=c.calibration, op_types=calib_ops,
                               symmetric=plan.symmetric, percentile=c.percentile, workdir=work,
                               external_data=big, progress=progress)
    save_tensors_data(ranges, cache)
    info.update(batches=reader.batches, samples=reader.samples)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[c.calibration]
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[plan.activation]
    extra = {"ActivationSymmetric": plan.symmetric, "WeightSymmetric": True, "QuantizeBias": plan.quantize_bias}

    def run_static(excluded: Sequence[str] = (), fmt: str | None = None,
                   only: Sequence[str] | None = None) -> onnx.ModelProto:
        out = work / f"static-{next(counter)}.onnx"
        form = QuantFormat.QDQ if (fmt or plan.fmt) == "qdq" else QuantFormat.QOperator
        op_types = plan.op_types if (fmt or plan.fmt) == plan.fmt else twin_ops
        with quiet():
            quantize_static(str(prepared), str(out), None, quant_format=form, op_types_to_quantize=op_types,
                            per_channel=c.per_channel, reduce_range=plan.reduce_range, activation_type=qtype,
                            weight_type=QuantType.QInt8, nodes_to_exclude=[*c.exclude_nodes, *excluded],
                            nodes_to_quantize=list(only) if only else None, use_external_data_format=big,
                            calibrate_method=method, extra_options=dict(extra),
                            calibration_cache_path=str(cache))
        return load_sorted(out)
    return run_static, info
