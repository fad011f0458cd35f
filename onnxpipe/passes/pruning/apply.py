"""The graph surgery: apply the recorded edits for the chosen channels, on a copy of the model.

Constants are never changed in place: a sliced constant becomes a new initializer for that one
node input, because exporters and simplifiers share identical weights between layers (a shared
tensor may be pruned one way for one layer and another way, or not at all, for the next).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpipe.core.external import INLINE_BELOW, SpillFile, lazy_bytes, tensor_array
from onnxpipe.passes.pruning.edits import SetAttr, SplitSizes, tensors_of
from onnxpipe.passes.pruning.groups import Analysis


def kept_positions(analysis: Analysis, removed_elements: np.ndarray) -> Callable[[str], np.ndarray]:
    """``kept(tensor)``: positions of the tensor's channel axis that survive, ascending.

    Example:
        >>> kept = kept_positions(analysis, removed)  # doctest: +SKIP
        >>> kept("conv_out")  # doctest: +SKIP
        array([0, 2, 3])
    """
    cache: dict[str, np.ndarray] = {}

    def kept(tensor: str) -> np.ndarray:
        if tensor not in cache:
            ids = analysis.labels[tensor].ids
            keep = np.ones(len(ids), dtype=bool)
            labeled = ids >= 0
            keep[labeled] = ~removed_elements[ids[labeled]]
            cache[tensor] = np.flatnonzero(keep)
        return cache[tensor]

    return kept


def _unique(base: str, taken: set[str]) -> str:
    name, n = f"{base}_pruned", 1
    while name in taken:
        n += 1
        name = f"{base}_pruned{n}"
    taken.add(name)
    return name


def _names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {i.name for i in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def prune_model(model: onnx.ModelProto, analysis: Analysis, removed_elements: np.ndarray) -> onnx.ModelProto:
    """A copy of ``model`` without the removed channels (``removed_elements``: bool per element id).

    ``model`` must be the model ``analysis`` was built from (same node order).

    Example:
        >>> pruned = prune_model(model, analysis, removed)  # doctest: +SKIP
    """
    view = analysis.view
    kept = kept_positions(analysis, removed_elements)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes = graph.node
    values: dict[tuple[int, int], np.ndarray] = {}
    attrs: dict[tuple[int, str], list[int] | int] = {}
    for edit in analysis.edits:
        if all(len(kept(t)) == len(analysis.labels[t].ids) for t in tensors_of(edit)):
            continue  # nothing removed there: leave the constant shared and untouched
        if isinstance(edit, SetAttr):
            attrs[(edit.node, edit.name)] = edit.value(kept)
        elif isinstance(edit, SplitSizes) and edit.slot is None:
            attrs[(edit.node, "split")] = edit.sizes(kept).tolist()
        else:
            key = (edit.node, edit.slot)
            current = values.get(key)
            if current is None:
                current = view.const(nodes[edit.node].input[edit.slot])
            values[key] = edit.transform(current, kept)
    taken = _names(graph)
    replaced: set[str] = set()
    shared = _Identical(graph)
    # a model whose weights stay on disk gets its pruned layers on disk too, as they are made: the model in
    # memory stays small (shape inference below copies it twice) and a view of a memory map is let go at once
    spill = SpillFile() if lazy_bytes(model) else None
    for k, slot in sorted(values):
        value = np.ascontiguousarray(values.pop((k, slot)))
        node = nodes[k]
        old = node.input[slot]
        name = shared.find(value)
        if name is None:  # layers pruned alike often end up with equal copies of a shared weight
            name = _unique(old, taken)
            tensor = numpy_helper.from_array(value, name)
            if spill is not None and value.nbytes >= INLINE_BELOW:
                spill.put(tensor)
            graph.initializer.append(tensor)
            shared.add(value, name)
        node.input[slot] = name
        replaced.add(old)
        del value
    if spill is not None:
        spill.close()
    for (k, name), value in attrs.items():
        node = nodes[k]
        for a in node.attribute:
            if a.name == name:
                node.attribute.remove(a)
                break
        node.attribute.append(onnx.helper.make_attribute(name, value))
    _drop_orphans(out, replaced)
    del graph.value_info[:]
    if out.ir_version < 4:  # new initializers need not be graph inputs from IR 4 on
        out.ir_version = 4
    try:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=False, data_prop=True)
    except Exception:  # shapes are a convenience; ORT infers its own
        pass
    return out


class _Identical:
    """Finds an initializer equal to a new value, so equal pruned copies share one tensor.

    Only initializers that are not graph inputs (overridable at run time, IR < 4) are candidates;
    old ones are hashed lazily, and only when their shape and dtype match a new value.
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        inputs = {i.name for i in graph.input}
        self.by_shape: dict[tuple, list[onnx.TensorProto]] = {}
        for init in graph.initializer:
            if init.name not in inputs and init.data_location != onnx.TensorProto.EXTERNAL:
                self.by_shape.setdefault((init.data_type, tuple(init.dims)), []).append(init)
        self.hashed: dict[tuple, str] = {}
        self.done: set[tuple] = set()

    @staticmethod
    def _key(value: np.ndarray) -> tuple:
        import hashlib

        return value.dtype.str, value.shape, hashlib.sha1(value.tobytes()).hexdigest()

    def find(self, value: np.ndarray) -> str | None:
        shape_key = (onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
        if shape_key not in self.done:
            self.done.add(shape_key)
            for init in self.by_shape.get(shape_key, []):
                self.hashed.setdefault(self._key(tensor_array(init)), init.name)
        return self.hashed.get(self._key(value))

    def add(self, value: np.ndarray, name: str) -> None:
        self.hashed.setdefault(self._key(value), name)


def _drop_orphans(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove initializers and Constant nodes among ``candidates`` that nothing reads any more."""
    from onnxpipe.core.graph import used_names

    graph = model.graph
    used = used_names(graph, set()) | {o.name for o in graph.output}
    dead = {c for c in candidates if c not in used}
    if not dead:
        return
    # delete by index, from the end: rebuilding the list would copy every weight of the model
    for field in (graph.initializer, graph.input):
        for i in reversed([i for i, t in enumerate(field) if t.name in dead]):
            del field[i]
    for i in reversed([i for i, n in enumerate(graph.node)
                       if n.op_type == "Constant" and n.output and n.output[0] in dead]):
        del graph.node[i]
