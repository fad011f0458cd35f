"""A model's skeleton: its graph with the large weights turned into inputs, for tools that would copy them.

onnxsim, onnxslim, ONNX Runtime's offline optimizer, ORT's float16 converter and its quantization
pre-processing all take a whole ``ModelProto`` and make copies of it, weights included; on a model
of several GB that is the weights many times over, and onnxsim refuses a model over 2 GB outright.
They rewrite nodes, not weights: given the skeleton (:func:`hollow`), they work in little memory,
and :func:`fill` puts the weights back into what they return, still on disk if they were. Folding
through a large weight (a Transpose of a weight) is what the skeleton gives up.

Example:
    >>> skeleton, taken = hollow(model)  # doctest: +SKIP
    >>> simplified = fill(onnxsim.simplify(skeleton)[0], taken, model)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import onnx

from onnxpipe.core.external import initializers, load_tensor, nbytes

HOLLOW_ABOVE = 64 << 10  # weights at least this big become inputs of the skeleton; smaller ones stay (shapes, scales)


def _copy_fields(src: Any, dst: Any, *, skip: str) -> None:
    """Copy every set field of a message but ``skip`` (repeated fields extended, messages merged)."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        target = getattr(dst, fd.name)
        if hasattr(target, "extend"):  # a repeated field
            target.extend(value)
        elif hasattr(target, "CopyFrom"):
            target.CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def hollow(model: onnx.ModelProto, *, min_bytes: int = HOLLOW_ABOVE) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """The model with its top graph's large initializers turned into graph inputs of the same type and
    shape, and those initializers, by name. Nothing of the weights is copied: a graph tool (onnxsim,
    onnxslim, ORT's optimizer) works on the skeleton in little memory, and cannot fold through the
    weights (which would make new copies of them). Small external tensors (shapes, scales) are read
    into the skeleton, so folding through them still works. :func:`fill` puts the weights back.
    """
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")  # everything but the graph's initializers
    g = skeleton.graph
    _copy_fields(model.graph, g, skip="initializer")
    taken: dict[str, onnx.TensorProto] = {}
    declared = {i.name for i in g.input}
    for t in model.graph.initializer:
        if nbytes(t) >= min_bytes and t.data_type != onnx.TensorProto.STRING:
            taken[t.name] = t
            if t.name not in declared:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(t)
            load_tensor(g.initializer[-1])
    for t in initializers(skeleton):  # subgraphs keep their tensors; a tool needs their bytes
        load_tensor(t)
    return skeleton, taken


def fill(skeleton: onnx.ModelProto, taken: Mapping[str, onnx.TensorProto], original: onnx.ModelProto) -> onnx.ModelProto:
    """Put the weights :func:`hollow` took back into a (transformed) skeleton, in place: each one a
    node or output still reads becomes an initializer again (its input declaration goes, unless the
    original model declared it too); the ones nothing reads any more are dropped."""
    from onnxpipe.core.graph import used_names

    g = skeleton.graph
    declared = {i.name for i in original.graph.input}
    used = used_names(g, set()) | {o.name for o in g.output}
    keep = [i for i in g.input if i.name not in taken or i.name in declared]
    if len(keep) != len(g.input):
        del g.input[:]
        g.input.extend(keep)
    present = {t.name for t in g.initializer}
    for name, t in taken.items():
        if name in used and name not in present:
            g.initializer.append(t)
    return skeleton
