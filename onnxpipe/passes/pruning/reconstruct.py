"""Recover accuracy without training: refit the layers that lost input channels by least squares.

In the style of He et al. 2017 (channel pruning): for each consumer of pruned channels (Conv,
Gemm, MatMul), in graph order, find the weights that map the *pruned* model's input of that
layer to the *unpruned* model's output of that layer. Earlier refits are already in place when
a later layer is fitted, so each fit also absorbs the error of the layers before it.

Calibration batches are streamed: only the normal equations (``P^T P`` and ``P^T Y``, of size
features x features) are accumulated; conv patches are sampled when a batch has more output
positions than ``rows``. A refit is kept only when it lowers the layer's squared error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpipe.core.external import tensor_array
from onnxpipe.core.session import Session
from onnxpipe.passes.pruning.graphview import GraphView

Batches = Callable[[], Iterable[dict[str, np.ndarray]]]


@dataclass
class Refit:
    """What happened to one consumer: features, rows seen, relative error before and after."""

    layer: str
    op: str
    features: int
    rows: int = 0
    error_before: float | None = None
    error_after: float | None = None
    kept: bool = False
    note: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _probe(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return out


def _conv_pads(node: onnx.NodeProto, spatial: tuple[int, ...], kernel: tuple[int, ...],
               strides: list[int], dilations: list[int]) -> list[tuple[int, int]]:
    auto = GraphView.attr(node, "auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            out.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
        return out
    if auto == "VALID":
        return [(0, 0)] * len(spatial)
    pads = GraphView.attr(node, "pads") or [0] * (2 * len(spatial))
    n = len(spatial)
    return [(pads[i], pads[i + n]) for i in range(n)]


def conv_patches(x: np.ndarray, node: onnx.NodeProto, kernel: tuple[int, ...], rows: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """im2col for N-D convs: ``(patches [S, C*prod(kernel)], (batch idx, out idx per spatial axis))``.

    At most ``rows`` output positions are taken (uniformly at random) from the batch.
    """
    n_sp = x.ndim - 2
    strides = GraphView.attr(node, "strides") or [1] * n_sp
    dilations = GraphView.attr(node, "dilations") or [1] * n_sp
    pads = _conv_pads(node, x.shape[2:], kernel, strides, dilations)
    xp = np.pad(x, [(0, 0), (0, 0), *pads])
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    out_sp = [(xp.shape[2 + i] - extent[i]) // strides[i] + 1 for i in range(n_sp)]
    total = x.shape[0] * int(np.prod(out_sp))
    flat = np.arange(total) if total <= rows else np.sort(rng.choice(total, rows, replace=False))
    idx = np.unravel_index(flat, (x.shape[0], *out_sp))
    windows = np.lib.stride_tricks.sliding_window_view(xp, extent, axis=tuple(range(2, 2 + n_sp)))
    picked = windows[(idx[0], slice(None), *[o * s for o, s in zip(idx[1:], strides)])]  # [S, C, *extent]
    picked = picked[(slice(None), slice(None), *[slice(None, None, d) for d in dilations])]
    return picked.reshape(picked.shape[0], -1), idx


class _Layer:
    """One consumer: how to turn its input/output into rows, and how to read/write its weights."""

    def __init__(self, model: onnx.ModelProto, out_name: str, kept_out: np.ndarray | None) -> None:
        self.model = model
        self.node = next(n for n in model.graph.node if n.output and n.output[0] == out_name)
        self.op = self.node.op_type
        self.inits = {i.name: i for i in model.graph.initializer}
        self.w = tensor_array(self.inits[self.node.input[1]]).astype(np.float64)
        self.groups = int(GraphView.attr(self.node, "group", 1)) if self.op == "Conv" else 1
        self.trans_b = self.op == "Gemm" and int(GraphView.attr(self.node, "transB", 0))
        self.alpha = float(GraphView.attr(self.node, "alpha", 1.0)) if self.op == "Gemm" else 1.0
        self.beta = float(GraphView.attr(self.node, "beta", 1.0)) if self.op == "Gemm" else 1.0
        has_c = len(self.node.input) > 2 and self.node.input[2] in self.inits
        self.bias = tensor_array(self.inits[self.node.input[2]]).astype(np.float64) if has_c else None
        n_out = self.w.shape[0] if self.op == "Conv" else (self.w.shape[0] if self.trans_b else self.w.shape[1])
        # a per-output bias is refitted with the weights; any other (scalar, per-row) stays and is
        # taken out of the target instead
        self.fit_bias = self.bias is not None and self.bias.size == n_out and (self.op == "Conv" or self.beta != 0)
        self.kept_out = kept_out if kept_out is not None else np.arange(n_out)
        self.n_out = n_out

    @property
    def features(self) -> int:
        per = int(np.prod(self.w.shape[1:])) if self.op == "Conv" else (self.w.shape[1] if self.trans_b else self.w.shape[0])
        return per + int(self.fit_bias)

    def current(self) -> list[np.ndarray]:
        """Current solution per group, in design-matrix layout ([features, outputs of the group])."""
        if self.op == "Conv":
            mats = []
            rows = self.n_out // self.groups
            for b in range(self.groups):
                m = self.w[b * rows:(b + 1) * rows].reshape(rows, -1).T
                if self.fit_bias:
                    m = np.vstack([m, self.bias.reshape(-1)[b * rows:(b + 1) * rows][None]])
                mats.append(m)
            return mats
        m = (self.w.T if self.trans_b else self.w) * self.alpha
        if self.fit_bias:
            m = np.vstack([m, self.beta * self.bias.reshape(-1)[None]])
        return [m]

    def rows(self, x: np.ndarray, y: np.ndarray, limit: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        """(design rows, target rows) per group for one batch."""
        if self.op == "Conv":
            kernel = tuple(self.w.shape[2:])
            cin_g, rows_g = x.shape[1] // self.groups, self.n_out // self.groups
            out = []
            state = rng.bit_generator.state
            for b in range(self.groups):
                rng.bit_generator.state = state  # the same sampled positions for every group
                p, idx = conv_patches(x[:, b * cin_g:(b + 1) * cin_g], self.node, kernel, limit, rng)
                yk = y[:, self.kept_out]
                t = yk[(idx[0], slice(None), *idx[1:])][:, b * rows_g:(b + 1) * rows_g]
                out.append((self._ones(p), t))
            return out
        if self.op == "Gemm" and not self.fit_bias and self.bias is not None:
            y = y - self.beta * np.broadcast_to(self.bias, y.shape)
        p = x.reshape(-1, x.shape[-1])
        t = y[..., self.kept_out].reshape(-1, len(self.kept_out))
        if p.shape[0] > limit:
            pick = np.sort(rng.choice(p.shape[0], limit, replace=False))
            p, t = p[pick], t[pick]
        return [(self._ones(p), t)]

    def _ones(self, p: np.ndarray) -> np.ndarray:
        p = p.astype(np.float64)
        return np.hstack([p, np.ones((p.shape[0], 1))]) if self.fit_bias else p

    def write(self, mats: list[np.ndarray]) -> None:
        """Store a solution (design layout) as the node's weights, in new initializers."""
        dtype = tensor_array(self.inits[self.node.input[1]]).dtype
        if self.op == "Conv":
            w = np.concatenate([m[:-1].T if self.fit_bias else m.T for m in mats]).reshape(self.w.shape)
            b = np.concatenate([m[-1] for m in mats]) if self.fit_bias else None
        else:
            m = mats[0]
            core = (m[:-1] if self.fit_bias else m) / self.alpha
            w = core.T if self.trans_b else core
            b = m[-1] / self.beta if self.fit_bias else None
        self._set(1, w.astype(dtype))
        if b is not None:
            self._set(2, b.reshape(self.bias.shape).astype(dtype))

    def _set(self, slot: int, value: np.ndarray) -> None:
        g = self.model.graph
        old = self.node.input[slot]
        taken = {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
        name, k = f"{old}_refit", 1
        while name in taken:
            k += 1
            name = f"{old}_refit{k}"
        g.initializer.append(numpy_helper.from_array(value, name))
        self.node.input[slot] = name
        if not any(old in n.input for n in g.node):
            keep = [i for i in g.initializer if i.name != old]
            del g.initializer[:]
            g.initializer.extend(keep)


def _relative_error(mats: list[np.ndarray], gram: list[np.ndarray], cross: list[np.ndarray],
                    energy: list[float]) -> float:
    """``||P W - Y||^2 / ||Y||^2`` from the normal equations, over every group of the layer."""
    e = sum(float(np.sum(m * (a @ m)) - 2 * np.sum(m * c)) + s for m, a, c, s in zip(mats, gram, cross, energy))
    return max(e, 0.0) / max(sum(energy), 1e-30)


def refit(original: onnx.ModelProto, pruned: onnx.ModelProto, layers: list[tuple[str, str, np.ndarray | None]],
          calibration: Batches, *, max_batches: int | None = None, max_features: int = 4096,
          rows: int = 8192, ridge: float = 1e-2, seed: int = 0,
          progress: Callable[[str], None] = lambda s: None) -> list[Refit]:
    """Refit ``layers`` (``(input tensor, output tensor, kept output positions)``, in graph order) in place.

    ``pruned`` is changed in place; ``original`` only provides the targets.

    Example:
        >>> reports = refit(model, pruned, [("relu", "conv2_out", None)], lambda: batches)  # doctest: +SKIP
    """
    outs = [o for _, o, _ in layers]
    reports: list[Refit] = []
    with Session(_probe(original, outs), optimization="basic") as target_session:
        for in_name, out_name, kept_out in layers:
            layer = _Layer(pruned, out_name, kept_out)
            rep = Refit(layer.node.name or out_name, layer.op, layer.features)
            reports.append(rep)
            if layer.features > max_features:
                rep.note = f"skipped: {layer.features} features > reconstruct_max_features={max_features}"
                continue
            progress(f"refit {rep.layer} ({layer.op}, {layer.features} features)")
            current = layer.current()
            gram = [np.zeros((m.shape[0], m.shape[0])) for m in current]
            cross = [np.zeros_like(m) for m in current]
            energy = [0.0 for _ in current]
            rng = np.random.default_rng(seed)
            with Session(_probe(pruned, [in_name]), optimization="basic") as source_session:
                for count, batch in enumerate(calibration()):
                    if max_batches is not None and count >= max_batches:
                        break
                    x = source_session.run(batch, outputs=[in_name])[in_name].astype(np.float64)
                    y = target_session.run(batch, outputs=[out_name])[out_name].astype(np.float64)
                    for g, (p, t) in enumerate(layer.rows(x, y, rows, rng)):
                        gram[g] += p.T @ p
                        cross[g] += p.T @ t
                        energy[g] += float(np.sum(t * t))
                        rep.rows += p.shape[0] if g == 0 else 0
            if rep.rows == 0:
                rep.note = "skipped: no calibration rows"
                continue

            # ridge towards the pruned weights, not towards zero: with few calibration rows per
            # feature (a Gemm after Flatten) the fit stays close to what the layer already does
            solved = []
            for a, c, w0 in zip(gram, cross, current):
                lam = ridge * float(np.trace(a)) / max(a.shape[0], 1) + 1e-12
                solved.append(np.linalg.solve(a + lam * np.eye(a.shape[0]), c + lam * w0))
            rep.error_before = _relative_error(current, gram, cross, energy)
            rep.error_after = _relative_error(solved, gram, cross, energy)
            if rep.error_after < rep.error_before:
                layer.write(solved)
                rep.kept = True
            else:
                rep.note = "kept the pruned weights: the refit did not lower the error"
    return reports
