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

import numpy as np
import onnx

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


def decoder_feeds(model: onnx.ModelProto, *, batch: int = 1, past: int = 3, seq: int = 2,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Consistent inputs for one cached decoder step (``past`` cached positions, ``seq`` new tokens).

    Random generated inputs do not fit a decoder: its mask must span the cached and the new
    positions and its positions continue the cache (:func:`onnxpipe.core.inputs.decoder_feeds`).

    Raises:
        InputError: the model is not a KV-cache decoder (``input_ids`` and 4-D ``past_key_values``).
    """
    from onnxpipe.core.inputs import decoder_feeds as feeds_for

    feeds = feeds_for(model, batch, past, seq, np.random.default_rng(seed))
    if feeds is None:
        raise InputError("the model is not a KV-cache decoder (input_ids and past_key_values.{i}.key|value "
                         "[batch, heads, positions, head size] inputs)",
                         hint="split a decoder written by onnxpipe convert --task text-generation")
    return feeds


def past_shape(name: str, declared: list | None, batch: int, positions: int) -> tuple[int, ...]:
    """The concrete shape of a cache input holding ``positions`` positions.

    The positions axis is the first symbolic axis after the batch (``[batch, heads, positions,
    head size]`` in Optimum's layout); every other axis but the batch must be static.
    """
    shape = list(declared or [])
    symbolic = [k for k, d in enumerate(shape) if k > 0 and not (isinstance(d, int) and d > 0)]
    if len(shape) < 2 or len(symbolic) != 1:
        raise InputError(f"{name} has shape {shape}: cannot tell its positions axis (one symbolic axis after "
                         "the batch expected)", hint="split a decoder written by onnxpipe convert --task text-generation")
    return tuple(batch if k == 0 else positions if k == symbolic[0] else int(d) for k, d in enumerate(shape))
