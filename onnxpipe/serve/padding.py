"""Batching requests of different sequence lengths: pad on the right where an attention mask says it is safe.

A model whose inputs include an attention mask (an input named ``*mask*`` whose second axis is a
symbolic dimension, e.g. ``attention_mask[batch, sequence]``) ignores the positions its mask
zeroes. Requests of different lengths can then share a batch: every input that has the
sequence dimension is padded with zeros on the right to the longest request (the mask's zeros
say "not a token"; the ids there are never looked at), and every output that has the sequence
dimension is cut back to each request's own length. The model must name the sequence dimension
with the same symbol in every input and output that has it (both PyTorch exporters and
``transformers`` exports do); otherwise, or with an output of unknown rank, nothing is padded.

Example:
    >>> plan = PadPlan.of(entry)  # doctest: +SKIP
    >>> feeds = plan.stack([a, b])  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxpipe.serve.repository import ModelEntry


@dataclass(frozen=True)
class PadPlan:
    """Which axis of which input is padded, which axis of which output is cut back.

    Example:
        >>> from onnxpipe.core.tensors import TensorInfo
        >>> ids = TensorInfo("input_ids", ["batch", "seq"], np.dtype("int64"))
        >>> mask = TensorInfo("attention_mask", ["batch", "seq"], np.dtype("int64"))
        >>> out = TensorInfo("hidden", ["batch", "seq", 8], np.dtype("float32"))
        >>> PadPlan.find([ids, mask], [out]).outputs
        {'hidden': 1}
    """

    symbol: str
    inputs: dict[str, int]  # input name -> its sequence axis
    outputs: dict[str, int]  # output name -> its sequence axis

    @classmethod
    def of(cls, entry: ModelEntry) -> PadPlan | None:
        """The plan for a served model, or None when its requests cannot be padded safely."""
        if not entry.batchable:
            return None
        return cls.find(entry.inputs, entry.outputs)

    @classmethod
    def find(cls, inputs: list, outputs: list) -> PadPlan | None:
        masks = [i for i in inputs if "mask" in i.name.lower() and i.shape and len(i.shape) >= 2
                 and isinstance(i.shape[1], str) and i.dtype.kind in "iub"]
        if not masks:
            return None
        symbol = masks[0].shape[1]

        def axis(shape: list | None) -> int | None | bool:
            if shape is None:
                return False  # unknown rank: the sequence axis cannot be found
            hits = [k for k, d in enumerate(shape) if d == symbol]
            if len(hits) > 1 or 0 in hits:
                return False  # [N, S, S] (a pairwise bias) or a batch axis that is the sequence: not padded
            return hits[0] if hits else None

        ins, outs = {}, {}
        for group, out in ((inputs, ins), (outputs, outs)):
            for t in group:
                a = axis(t.shape)
                if a is False:
                    return None
                if a is not None:
                    out[t.name] = a
        return cls(symbol, ins, outs)

    def key_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape a request is grouped by: the sequence axis left out (any length may join)."""
        a = self.inputs.get(name)
        if a is None:
            return shape[1:]
        return tuple(-1 if k == a else d for k, d in enumerate(shape))[1:]

    def length(self, feeds: dict[str, np.ndarray]) -> int:
        name = next(iter(self.inputs))
        return feeds[name].shape[self.inputs[name]]

    def stack(self, requests: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """One batch from requests of possibly different lengths (zeros on the right of the shorter ones)."""
        longest = max(self.length(f) for f in requests)
        out = {}
        for name in requests[0]:
            a = self.inputs.get(name)
            parts = [f[name] for f in requests]
            if a is not None:
                parts = [p if p.shape[a] == longest else
                         np.pad(p, [(0, longest - p.shape[a]) if k == a else (0, 0) for k in range(p.ndim)])
                         for p in parts]
            out[name] = np.concatenate(parts)
        return out

    def cut(self, outputs: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
        """A request's outputs cut back to its own ``length`` along the sequence axis."""
        return {k: v[(slice(None),) * self.outputs[k] + (slice(0, length),)] if k in self.outputs else v
                for k, v in outputs.items()}
