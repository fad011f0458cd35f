"""What ``onnxpipe tune`` may try on each kind of device, and which combinations cannot apply.

The space is a list of :class:`Dimension` s of device options (threads, spinning, execution
mode, optimization level, arena, memory pattern on CPU; cuDNN search, IO binding / CUDA graphs,
arena on CUDA; precision and builder level on TensorRT). The search walks them one at a time from the best
setup so far (coordinate descent), so a dimension costs its few values, not a product. A value
that cannot apply to this model or device is :class:`Skipped` with the reason, never tried.
Options the user set on the device (``cpu[threads=1]``) are kept, not searched.

Example:
    >>> facts = ModelFacts(static_inputs=False, control_flow=False, qdq=False, width=1)
    >>> [d.name for d in space(Device.parse("cpu"), facts, cores=2)[0]]
    ['threads', 'spinning', 'optimization', 'arena', 'mem_pattern']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxpipe.core.tensors import graph_inputs
from onnxpipe.runtimes.device_options import CudaOptions, TensorrtOptions
from onnxpipe.runtimes.providers import Device

CONTROL_FLOW = {"If", "Loop", "Scan"}


@dataclass(frozen=True)
class ModelFacts:
    """What decides which options can apply to a model.

    Example:
        >>> ModelFacts.of(onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
        ... g (float[N,4] x) => (float[N,4] y) { a = Relu(x)  b = Neg(x)  y = Add(a, b) }''')).width
        2
    """

    static_inputs: bool
    """Every input dim is a fixed number (CUDA graphs need that)."""
    control_flow: bool
    """If/Loop/Scan nodes (CUDA graphs cannot capture them)."""
    qdq: bool
    """QuantizeLinear/DequantizeLinear nodes (TensorRT int8 needs them or a calibration table)."""
    width: int
    """Most nodes at one depth of the graph: 1 means no branches for parallel execution to overlap."""

    @classmethod
    def of(cls, model: onnx.ModelProto) -> ModelFacts:
        infos = graph_inputs(model)
        static = all(i.shape is not None and all(isinstance(d, int) and d > 0 for d in i.shape) for i in infos)
        ops = {n.op_type for n in model.graph.node}
        return cls(static, bool(ops & CONTROL_FLOW), bool(ops & {"QuantizeLinear", "DequantizeLinear"}),
                   _width(model.graph))


def _width(graph: onnx.GraphProto) -> int:
    """Widest level of the graph's nodes by depth (longest path from the inputs)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    depth: dict[int, int] = {}
    for i, node in enumerate(graph.node):  # models are topologically sorted (the checker insists)
        depth[i] = 1 + max((depth.get(producer[x], 0) for x in node.input if x in producer), default=0)
    counts: dict[int, int] = {}
    for i, node in enumerate(graph.node):
        if node.op_type not in ("Constant", "Identity"):  # free nodes do not keep a thread busy
            counts[depth[i]] = counts.get(depth[i], 0) + 1
    return max(counts.values(), default=1)


def with_options(device: Device, changes: Mapping[str, Any]) -> Device:
    """``device`` with some options replaced (validated again); None puts an option back to its default.

    Example:
        >>> str(with_options(Device.parse("cpu[threads=2,inter_threads=2]"), {"threads": None, "spinning": False}))
        'cpu:0[inter_threads=2,execution_mode=parallel,spinning=false]'
    """
    opts = {**device.options.model_dump(exclude_defaults=True), **changes}
    return Device.parse(device.label, **{k: v for k, v in opts.items() if v is not None})


@dataclass(frozen=True)
class Value:
    """One setting of a dimension: the device options it changes, with a label."""

    label: str
    options: dict[str, Any] = field(default_factory=dict)

    def apply(self, device: Device) -> Device:
        return with_options(device, self.options)


@dataclass(frozen=True)
class Skipped:
    """A value that cannot apply here, and why."""

    dimension: str
    label: str
    why: str


@dataclass
class Dimension:
    """A named choice; ``check(device, value)`` returns why a value cannot apply, or None."""

    name: str
    values: list[Value]
    check: Callable[[Device, Value], str | None] = lambda d, v: None


def thread_counts(cores: int) -> list[int]:
    """Intra-op thread counts worth trying: 1, half, all (and the powers of two between).

    Example:
        >>> thread_counts(2), thread_counts(16)
        ([1, 2], [1, 2, 4, 8, 16])
    """
    out = {1, max(1, cores // 2), cores}
    p = 2
    while p < cores:
        out.add(p)
        p *= 2
    return sorted(out)


def space(device: Device, facts: ModelFacts, *, cores: int) -> tuple[list[Dimension], list[Skipped]]:
    """The dimensions to search on ``device`` for a model with ``facts``, and what cannot apply.

    Example:
        >>> dims, skipped = space(Device.parse("cuda:0"), ModelFacts(False, False, False, 1), cores=8)
        >>> [s.label for s in skipped]
        ['io_binding+cuda_graph']
    """
    fixed = set(device.options.model_fields_set)
    skipped: list[Skipped] = []
    dims: list[Dimension] = []
    if device.kind == "cpu":
        dims += _cpu(facts, cores, skipped)
    else:
        dims += _gpu(device, facts, skipped)
    dims.append(Dimension("optimization", [Value(f"optimization={lvl}", {"optimization": lvl})
                                           for lvl in ("all", "extended", "basic")]))
    if device.kind == "cpu":
        dims.append(Dimension("arena", [Value("arena=on", {"arena": True}), Value("arena=off", {"arena": False})]))
        dims.append(Dimension("mem_pattern", [Value("mem_pattern=on", {"mem_pattern": True}),
                                              Value("mem_pattern=off", {"mem_pattern": False})]))
    kept = []
    for d in dims:
        keys = {k for v in d.values for k in v.options}
        if keys and keys <= fixed:
            skipped.append(Skipped(d.name, "*", f"set on the device ({', '.join(sorted(keys))}): kept as given"))
        else:
            kept.append(d)
    return kept, skipped


def _cpu(facts: ModelFacts, cores: int, skipped: list[Skipped]) -> list[Dimension]:
    dims = [Dimension("threads", [Value("threads=auto", {"threads": None})]
                      + [Value(f"threads={n}", {"threads": n}) for n in thread_counts(cores)]),
            Dimension("spinning", [Value("spinning=on", {"spinning": True}),
                                   Value("spinning=off", {"spinning": False})])]
    modes = [Value("sequential", {"inter_threads": None, "execution_mode": "sequential"})]
    if facts.width < 2:
        skipped.append(Skipped("execution", "parallel", "the graph has no parallel branches to overlap"))
    elif cores < 2:
        skipped.append(Skipped("execution", "parallel", "one core: no second thread for a branch"))
    else:
        # inter-op threads only mean something in parallel mode, so they are tried only there
        for n in sorted({2, min(cores, facts.width)}):
            modes.append(Value(f"parallel, inter_threads={n}", {"inter_threads": n, "execution_mode": "parallel"}))
    if len(modes) > 1:
        dims.append(Dimension("execution", modes))
    return dims


def _gpu(device: Device, facts: ModelFacts, skipped: list[Skipped]) -> list[Dimension]:
    dims: list[Dimension] = []
    if isinstance(device.options, TensorrtOptions):
        precisions = [Value("fp32", {"fp16": False, "int8": False}), Value("fp16", {"fp16": True, "int8": False})]
        if facts.qdq or device.options.int8_table:
            precisions.append(Value("int8", {"int8": True, "fp16": True}))  # fp16 for the layers int8 cannot take
        else:
            skipped.append(Skipped("precision", "int8", "no Q/DQ nodes and no int8_table: quantize the model first"))
        dims.append(Dimension("precision", precisions))
        dims.append(Dimension("builder_level", [Value("builder_level=default", {"builder_level": None})]
                              + [Value(f"builder_level={n}", {"builder_level": n}) for n in (4, 5)]))
    else:
        dims.append(Dimension("cudnn", [Value(f"cudnn={a}", {"cudnn": a}) for a in ("exhaustive", "heuristic", "default")]))
    binding = [Value("io_binding=off", {"io_binding": False, "cuda_graph": False}),
               Value("io_binding=on", {"io_binding": True, "cuda_graph": False})]
    why = cuda_graph_blocker(facts)
    if why:
        skipped.append(Skipped("binding", "io_binding+cuda_graph", why))
    else:
        binding.append(Value("io_binding+cuda_graph", {"io_binding": True, "cuda_graph": True}))
    dims.append(Dimension("binding", binding))
    if isinstance(device.options, CudaOptions) and not isinstance(device.options, TensorrtOptions):
        dims.append(Dimension("arena", [Value(f"arena={a}", {"arena": a}) for a in ("next_power_of_two", "same_as_requested")]))
    return dims


def cuda_graph_blocker(facts: ModelFacts) -> str | None:
    """Why CUDA graphs cannot capture this model, or None.

    Example:
        >>> cuda_graph_blocker(ModelFacts(False, False, False, 1))
        'dynamic input shapes (CUDA graphs need static ones: fix them with `onnxpipe optimize -p fix-shapes`)'
    """
    if not facts.static_inputs:
        return "dynamic input shapes (CUDA graphs need static ones: fix them with `onnxpipe optimize -p fix-shapes`)"
    if facts.control_flow:
        return "If/Loop/Scan nodes cannot be captured in a CUDA graph"
    return None
