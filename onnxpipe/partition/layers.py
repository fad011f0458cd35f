"""Layer boundaries of a decoder with a KV cache: where a stage may end so that it holds whole layers.

A decoder exported for generation names its cache ``past_key_values.{i}.key|value`` (inputs) and
``present.{i}.key|value`` (outputs), as Optimum and onnxruntime-genai do. Every node that reads
layer ``i``'s past or writes its present belongs to layer ``i``. Between the last such node of
layer ``i`` and the first of layer ``i + 1`` lie the rest of layer ``i`` (its MLP) and the start of
layer ``i + 1`` (its norm, its projections); the boundary is the last position in that gap where
the fewest bytes cross (the residual stream alone, with what every layer shares such as the mask
and the rotary tables: the stream also crosses alone after the attention's residual add, so the
last such position is the one before the next layer). Cutting only there gives each stage whole layers and their own cache.
"""

from __future__ import annotations

import re

from onnxpipe.core.errors import InputError
from onnxpipe.partition.profile import GraphProfile

PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


def kv_layer_count(names: list[str]) -> int:
    """Layers named by ``past_key_values.{i}.*`` / ``present.{i}.*`` among ``names`` (0 when none)."""
    found = {int(m.group(1)) for n in names for m in (PAST.match(n), PRESENT.match(n)) if m}
    return max(found) + 1 if found else 0


def layer_boundaries(profile: GraphProfile) -> list[int]:
    """Cut positions (in the profile's node order) between consecutive decoder layers.

    Raises:
        InputError: the model has no KV-cache inputs/outputs, or its layers' nodes interleave.
    """
    from onnxpipe.partition.cut import _cross_bytes

    n = len(profile.nodes)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for pos, (node, reads) in enumerate(zip(profile.nodes, profile.reads)):
        for name in (*reads, *node.output):
            m = PAST.match(name) or PRESENT.match(name)
            if m:
                layer = int(m.group(1))
                first.setdefault(layer, pos)
                last[layer] = pos
    if not first:
        raise InputError("the model has no past_key_values.{i} / present.{i} tensors: no decoder layers to cut at",
                         hint="split a decoder exported with `onnxpipe convert DIR --task text-generation`")
    layers = sorted(first)
    cross = _cross_bytes(profile, list(range(n)))
    bounds = []
    for a, b in zip(layers, layers[1:]):
        lo, hi = last[a] + 1, first[b]
        if lo > hi:
            raise InputError(f"layers {a} and {b} of the decoder interleave in the graph: no boundary between them",
                             hint="split by --parts without layer boundaries, or re-export the model")
        # the latest of the cheapest: after the attention's residual add the stream alone crosses too,
        # but only after the MLP's does the next layer begin
        bounds.append(min(range(lo, hi + 1), key=lambda p: (cross[p], -p)))
    return bounds
