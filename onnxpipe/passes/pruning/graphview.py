"""A read-only view of a graph for the pruner: constants, inferred shapes, consumers, attributes."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpipe.core import external
from onnxpipe.core.graph import subgraph_inputs

Dim = int | str | None

# initializers at least this big become typed inputs of the copy used for shape inference:
# inference only needs their shapes, and a copy without them stays fast and under 2 GiB
_SMALL_CONST = 1 << 16


def node_label(node: onnx.NodeProto) -> str:
    """The name a user sees for a node: its name, else its first output."""
    return node.name or (node.output[0] if node.output else node.op_type)


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple[Dim, ...]]:
    """Shapes of every tensor onnx shape inference can tell (symbolic dims as names, unknown as None).

    Example:
        >>> inferred_shapes(model)["conv_out"]  # doctest: +SKIP
        ('N', 16, 8, 8)
    """
    src = model.graph
    light = onnx.ModelProto(ir_version=max(model.ir_version, 4), opset_import=model.opset_import,
                            functions=model.functions)
    g = light.graph
    g.node.extend(src.node)
    g.output.extend(src.output)
    typed = []
    for init in src.initializer:
        elements = int(np.prod(init.dims)) if init.dims else 1  # ByteSize() would walk the data
        if init.data_location != onnx.TensorProto.EXTERNAL and elements < _SMALL_CONST // 8:
            g.initializer.append(init)  # small ones may feed shape math (Reshape targets)
        else:
            typed.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    init_names = {i.name for i in src.initializer}
    g.input.extend(i for i in src.input if i.name not in init_names)
    g.input.extend(typed)
    try:
        light = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # best effort: rules that need a missing shape mark their group unsafe
        pass
    shapes: dict[str, tuple[Dim, ...]] = {}
    for vi in (*light.graph.input, *light.graph.value_info, *light.graph.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                    for d in tt.shape.dim)
    for init in src.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


class GraphView:
    """Constants, shapes and uses of the tensors of one (top-level) graph.

    Args:
        model: the model, already in topological order; it is read, never changed.
        probe: concrete shapes from one ONNX Runtime run (:func:`probe_shapes`), consulted only
            to tell whether a dim inference left unknown is a broadcast 1.

    Example:
        >>> view = GraphView(model)  # doctest: +SKIP
        >>> view.const("conv.weight").shape, view.shape("x")  # doctest: +SKIP
        ((16, 3, 3, 3), ('N', 3, 8, 8))
    """

    def __init__(self, model: onnx.ModelProto, probe: dict[str, tuple[int, ...]] | None = None) -> None:
        self.model = model
        self.probe = probe or {}  # shapes seen in one run, for broadcasts inference cannot tell
        self.graph = model.graph
        self.opset = default_opset(model)
        self.nodes = list(self.graph.node)
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.constant_nodes = {n.output[0]: n for n in self.nodes if n.op_type == "Constant" and n.output}
        self.uses: dict[str, list[tuple[int, int]]] = defaultdict(list)  # tensor -> [(node, input slot)]
        self.implicit_uses: dict[str, list[int]] = defaultdict(list)  # tensor -> nodes whose subgraphs read it
        self.implicit_inputs: dict[int, set[str]] = {}  # node -> tensors its subgraphs read
        self.producer: dict[str, int] = {}
        for k, node in enumerate(self.nodes):
            for slot, name in enumerate(node.input):
                if name:
                    self.uses[name].append((k, slot))
            for name in subgraph_inputs(node):
                self.implicit_uses[name].append(k)
                self.implicit_inputs.setdefault(k, set()).add(name)
            for name in node.output:
                if name:
                    self.producer[name] = k
        self.graph_outputs = {o.name for o in self.graph.output}
        self.shapes = inferred_shapes(model)
        self._cache: dict[str, np.ndarray] = {}

    def is_const(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output, else None."""
        if not name or not self.is_const(name):
            return None
        if name not in self._cache:
            if name in self.initializers:
                t = self.initializers[name]
                if external.on_disk(t):  # on disk: a fresh memory map, not kept mapped
                    return external.tensor_array(t)
                self._cache[name] = numpy_helper.to_array(t)
            else:
                attr = self.constant_nodes[name].attribute[0]
                self._cache[name] = np.asarray(onnx.helper.get_attribute_value(attr)
                                               if attr.type != onnx.AttributeProto.TENSOR
                                               else numpy_helper.to_array(attr.t))
        return self._cache[name]

    def const_shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of a constant without reading its data."""
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        value = self.const(name)
        return None if value is None else tuple(value.shape)

    def shape(self, name: str) -> tuple[Dim, ...] | None:
        if self.is_const(name):
            return self.const_shape(name)
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def dim(self, name: str, axis: int) -> int | None:
        """A static dim, or None when unknown or symbolic."""
        s = self.shape(name)
        if s is None or not -len(s) <= axis < len(s):
            return None
        d = s[axis]
        return d if isinstance(d, int) and d > 0 else None

    def probed_shape(self, name: str) -> tuple[Dim, ...] | None:
        """The inferred shape with the dims inference left unknown filled in from the probed run.

        Only dims that are neither static nor named get filled; named ones (a dynamic batch or
        sequence) stay symbolic, so a Reshape that copies them still reads as a copy.
        """
        shape = self.shape(name)
        probe = self.probe.get(name)
        if probe is None:
            return shape
        if shape is None or len(shape) != len(probe):
            return tuple(probe)
        return tuple(d if (isinstance(d, int) and d > 0) or (isinstance(d, str) and not d.startswith("unk__"))
                     else p for d, p in zip(shape, probe))

    def broadcast_dim(self, name: str, axis: int) -> int | None:
        """Like :meth:`dim`, falling back to the probed run for a dim inference left unknown.

        Used only to tell a broadcast 1 (an attention mask over heads) from a full axis: a dim
        that is 1 in a run at batch 2 and sequence 8 is 1 for any input.
        """
        d = self.dim(name, axis)
        if d is not None or name not in self.probe:
            return d
        s = self.probe[name]
        return s[axis] if -len(s) <= axis < len(s) else None

    def consumers(self, name: str) -> list[int]:
        return sorted({k for k, _ in self.uses.get(name, [])} | set(self.implicit_uses.get(name, [])))

    @staticmethod
    def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
        for a in node.attribute:
            if a.name == name:
                value = onnx.helper.get_attribute_value(a)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def input_const(self, node: onnx.NodeProto, slot: int) -> np.ndarray | None:
        """The constant at an input slot (None when absent or computed at run time)."""
        return self.const(node.input[slot]) if slot < len(node.input) and node.input[slot] else None

    def has_input(self, node: onnx.NodeProto, slot: int) -> bool:
        return slot < len(node.input) and bool(node.input[slot])

