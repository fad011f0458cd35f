"""How heavy is a model: I/O, opsets, op histogram, parameters, and MACs/FLOPs per op type.

Costs are counted for concrete input shapes: a symbolic first axis becomes ``batch``, named
dims come from ``dims``, other unknown dims become 1, and ``input_shapes`` overrides whole
inputs. Shapes come from ``onnx.shape_inference`` (with data propagation); tensors it cannot
size are read from one ONNX Runtime run on random inputs. An op whose cost still cannot be
determined is listed in ``ModelSummary.uncounted``, never silently counted as zero.

The per-op counting conventions are in :mod:`onnxpipe.core.cost`.

Parameters are the elements of all initializers (subgraphs included, sparse ones by their
stored values) plus the tensors of Constant nodes (functions included).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import onnx
from rich.markup import escape
from rich.table import Table

from onnxpipe.core.cost import UncountedOp, graph_cost, op_key
from onnxpipe.core.errors import InputError
from onnxpipe.core.graph import all_graphs, subgraphs
from onnxpipe.core.modelio import tensor_bytes
from onnxpipe.core.shapes import Shape, concrete_inputs, infer_shapes, runtime_shapes
from onnxpipe.core.tensors import TensorInfo, graph_inputs, value_infos
from onnxpipe.core.units import human_bytes, human_count

if TYPE_CHECKING:
    from rich.console import Console

@dataclass
class OpCost:
    """Nodes of one op type and their summed cost."""

    count: int = 0
    macs: int = 0
    flops: int = 0


@dataclass
class ModelSummary:
    """Everything ``onnxpipe inspect`` reports about a model.

    Example:
        >>> s = summarize(onnx.load("model.onnx"), batch=8)  # doctest: +SKIP
        >>> s.flops, s.params, s.uncounted  # doctest: +SKIP
        (3660000000, 25557032, [])
    """

    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    input_shapes: dict[str, Shape]
    batch: int
    opsets: dict[str, int]
    ir_version: int
    producer_name: str
    producer_version: str
    op_counts: Counter[str]
    params: int
    param_bytes: int
    macs: int
    flops: int
    cost_by_op: dict[str, OpCost]
    uncounted: list[UncountedOp] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain python types only, ready for ``json.dumps``.

        Example:
            >>> json.dumps(summarize(model).as_dict())  # doctest: +SKIP
        """
        def io(infos: list[TensorInfo]) -> list[dict[str, Any]]:
            return [{"name": i.name, "shape": None if i.shape is None else list(i.shape),
                     "dtype": str(i.dtype)} for i in infos]

        by_op = {k: {**vars(c), "share": c.flops / self.flops if self.flops else 0.0}
                 for k, c in self.cost_by_op.items()}
        return {"ir_version": self.ir_version, "opsets": dict(self.opsets),
                "producer": {"name": self.producer_name, "version": self.producer_version},
                "inputs": io(self.inputs), "outputs": io(self.outputs), "batch": self.batch,
                "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
                "op_counts": dict(self.op_counts), "parameters": {"count": self.params, "bytes": self.param_bytes},
                "cost": {"macs": self.macs, "flops": self.flops, "by_op": by_op,
                         "uncounted": [{"node": u.node, "op_type": u.op_type, "reason": u.reason}
                                       for u in self.uncounted]},
                "notes": list(self.notes)}

    def render(self, console: Console) -> None:
        """Print the I/O table, the op table with costs and shares, and a totals line.

        Example:
            >>> summarize(model).render(rich.console.Console())  # doctest: +SKIP
        """
        opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in self.opsets.items())
        producer = f"{self.producer_name} {self.producer_version}".strip() or "unknown"
        console.print(f"producer {escape(producer)} · IR {self.ir_version} · opsets {escape(opsets)}")
        io_table = Table(title="inputs and outputs")
        for col in ("", "name", "shape", "counted as", "dtype"):
            io_table.add_column(col)
        for kind, infos in (("input", self.inputs), ("output", self.outputs)):
            for i in infos:
                used = self.input_shapes.get(i.name) if kind == "input" else None
                io_table.add_row(kind, escape(i.name), escape(i.shape_str()),
                                 "x".join(map(str, used)) if used is not None else "", str(i.dtype))
        console.print(io_table)
        ops = Table(title=f"ops (batch {self.batch})")
        ops.add_column("op")
        for col in ("count", "MACs", "FLOPs", "share"):
            ops.add_column(col, justify="right")
        missed = Counter(u.op_type for u in self.uncounted)
        # heaviest first; the histogram itself (op_counts) stays ordered by count
        for op in sorted(self.op_counts, key=lambda k: -self.cost_by_op.get(k, OpCost()).flops):
            c = self.cost_by_op.get(op, OpCost())
            share = f"{100 * c.flops / self.flops:.1f}%" if self.flops else "-"
            count = f"{self.op_counts[op]}" + (f" ({missed[op]} uncounted)" if missed[op] else "")
            ops.add_row(escape(op), count, human_count(c.macs) if c.macs else "-",
                        human_count(c.flops, "FLOPs") if c.flops else "-", share)
        console.print(ops)
        console.print(f"[bold]total[/]: {human_count(self.params)} parameters ({human_bytes(self.param_bytes)}) · "
                      f"{human_count(self.macs, 'MACs')} · {human_count(self.flops, 'FLOPs')}")
        if self.uncounted:
            console.print(f"[yellow]{len(self.uncounted)} op(s) not counted[/] (totals are a lower bound):")
            for u in self.uncounted[:20]:
                console.print(f"  {escape(u.op_type)} {escape(u.node)}: {escape(u.reason)}")
            if len(self.uncounted) > 20:
                console.print(f"  ... and {len(self.uncounted) - 20} more")
        for note in self.notes:
            console.print(f"[dim]note: {escape(note)}[/]")


def summarize(model: onnx.ModelProto, *, batch: int = 1, dims: Mapping[str, int] | None = None,
              input_shapes: Mapping[str, Sequence[int]] | None = None) -> ModelSummary:
    """Describe a model and count its parameters and compute for concrete input shapes.

    Args:
        model: the model (not modified).
        batch: size given to a symbolic first axis.
        dims: sizes of named symbolic dims, e.g. ``{"seq": 128}``; other symbolic dims are 1.
        input_shapes: full shapes for some inputs, overriding ``batch`` and ``dims``.

    Raises:
        InputError: ``input_shapes`` names an unknown input or has a dim <= 0, or batch < 1.

    Example:
        >>> s = summarize(onnx.load("bert.onnx"), batch=4, dims={"seq": 128})  # doctest: +SKIP
        >>> print(s.flops)  # doctest: +SKIP
    """
    if batch < 1:
        raise InputError(f"batch must be >= 1, got {batch}", hint="give a positive batch size")
    inputs = graph_inputs(model)
    concrete, notes = concrete_inputs(model, batch=batch, dims=dims, input_shapes=input_shapes)
    work, shapes = infer_shapes(model, concrete, notes)

    records, uncounted, loop_notes = graph_cost(work.graph, shapes)
    if uncounted:
        produced = {o for n in work.graph.node for o in n.output if o}
        missing = sorted({t for u in uncounted for t in u.tensors if t in produced and t not in shapes})
        if missing:
            found = runtime_shapes(model, concrete, missing, notes)
            if found:
                shapes.update(found)
                records, uncounted, loop_notes = graph_cost(work.graph, shapes)
    notes.extend(loop_notes)

    cost: dict[str, OpCost] = {}
    for key, macs, flops in records:
        c = cost.setdefault(key, OpCost())
        c.count, c.macs, c.flops = c.count + 1, c.macs + macs, c.flops + flops
    cost = dict(sorted(cost.items(), key=lambda kv: (-kv[1].flops, kv[0])))
    hist = Counter(op_key(n) for g in all_graphs(work.graph) for n in g.node)
    params, const_bytes = _parameters(model)
    return ModelSummary(
        inputs=inputs, outputs=value_infos(model.graph.output), input_shapes=concrete, batch=batch,
        opsets={o.domain: o.version for o in model.opset_import}, ir_version=model.ir_version,
        producer_name=model.producer_name, producer_version=model.producer_version,
        op_counts=Counter(dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))),
        params=params, param_bytes=tensor_bytes(model) + const_bytes,
        macs=sum(c.macs for c in cost.values()), flops=sum(c.flops for c in cost.values()),
        cost_by_op=cost, uncounted=uncounted, notes=notes,
    )


def parameter_count(model: onnx.ModelProto) -> int:
    """The one parameter count: elements of every initializer (sparse ones by their values) and
    Constant tensor, in the main graph, its subgraphs (If, Loop, Scan) and its functions.

    Example:
        >>> parameter_count(model)  # doctest: +SKIP
        15306
    """
    return _parameters(model)[0]


def parameter_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the parameters that :func:`~onnxpipe.core.modelio.tensor_bytes` does not see
    (Constant nodes' tensors and sparse initializers' values)."""
    return _parameters(model)[1]


def _parameters(model: onnx.ModelProto) -> tuple[int, int]:
    """(elements of initializers and Constant tensors, bytes not in ``tensor_bytes``: Constant and sparse)."""
    graphs = [*all_graphs(model.graph), *(g for f in model.functions for n in f.node
                                       for sub in subgraphs(n) for g in all_graphs(sub))]
    tensors = [t for g in graphs for t in g.initializer]
    extra = [s.values for g in graphs for s in g.sparse_initializer]
    for n in [*(n for g in graphs for n in g.node), *(n for f in model.functions for n in f.node)]:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name in ("value", "sparse_value"):
                    extra.append(a.t if a.name == "value" else a.sparse_tensor.values)
                elif a.name in ("value_float", "value_floats", "value_int", "value_ints"):  # value_float(s) / value_int(s): 4 / 8 bytes each
                    k = 1 if a.name in ("value_float", "value_int") else len(a.floats) + len(a.ints)
                    dtype = onnx.TensorProto.FLOAT if "float" in a.name else onnx.TensorProto.INT64
                    extra.append(onnx.TensorProto(dims=[k], data_type=dtype))
    return sum(math.prod(t.dims) for t in (*tensors, *extra)), sum(_nbytes(t) for t in extra)


def _nbytes(t: onnx.TensorProto) -> int:
    try:
        item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        item = 4
    return math.prod(t.dims) * item
