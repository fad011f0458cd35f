"""Where to cut a graph into pipeline stages: every crossing tensor carried over, parts balanced, little sent.

The nodes are laid out in one topological order and a cut is a position in it: everything
before goes to one stage, the rest to the next. Any position is a valid cut, whatever the
branches and skip connections, because every tensor produced before and read after (graph
inputs needed later and graph outputs produced earlier included) is handed over; its bytes are
the cut's communication cost. Outputs of input-less ``Constant`` nodes are not handed over: the
node is copied into the stage that reads it.

With a size cap (``max_part_bytes``) the number of parts is not given but found: the fewest
parts each holding at most the cap (its weights, a weight shared across a cut counted in every
part that reads it, plus the bytes it receives and sends), and among those the split sending the
fewest bytes (:func:`find_capped_cuts`).

Otherwise the search is two dynamic programs over the positions. The first finds the smallest possible
bottleneck: the largest part load, where a part's load is its FLOPs (``flops``), its weight
bytes (``params``) or its weights plus peak activations (``memory``), and for ``flops``
each byte a part receives or sends costs :data:`FLOPS_PER_BYTE`. The second picks, among the
splits whose every part stays within ``slack`` of that bottleneck, the one sending the fewest bytes.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxpipe.core.errors import InputError
from onnxpipe.partition.memory import live_bytes
from onnxpipe.partition.profile import GraphProfile

BALANCES = ("flops", "params", "memory")
# moving a byte between stages (written to shared memory, copied by the dispatcher, read back)
# costs about as much time as this many FLOPs of a single-threaded convolution
FLOPS_PER_BYTE = 16.0


@dataclass
class CutPlan:
    """Stages as runs of one node order.

    Attributes:
        order: node indices of the profile, in the order the stages take them.
        bounds: the first position of every stage, then ``len(order)``.
        crossing: per cut, the tensors handed from the stages before it to the ones after.
        loads: per stage, its load in the balance's unit.
        balance: ``flops``, ``params``, ``memory`` or ``manual`` (forced cuts).

    Example:
        >>> plan = find_cuts(profile, 2)  # doctest: +SKIP
        >>> plan.crossing[0]  # doctest: +SKIP
        ['layer3.0.relu_out']
    """

    order: list[int]
    bounds: list[int]
    crossing: list[list[str]]
    loads: list[float]
    balance: str

    def stage_nodes(self, k: int) -> list[int]:
        """Node indices of stage ``k``, in order."""
        return self.order[self.bounds[k]:self.bounds[k + 1]]


def free_tensors(profile: GraphProfile) -> set[str]:
    """Outputs of input-less Constant nodes: copied into each stage that reads them, never sent."""
    return {o for n, r in zip(profile.nodes, profile.reads)
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and not r and not n.input for o in n.output}


def _spans(profile: GraphProfile, order: Sequence[int]) -> dict[str, tuple[int, int]]:
    """Tensor -> (position of its producer, position of its last reader) in ``order`` (inputs born at -1)."""
    pos = {node: p for p, node in enumerate(order)}
    n = len(order)
    free = free_tensors(profile)
    born = {t: -1 for t in profile.inputs}
    last: dict[str, int] = {}
    for node in order:
        for o in profile.nodes[node].output:
            if o:
                born[o] = pos[node]
        for t in profile.reads[node]:
            last[t] = max(last.get(t, -1), pos[node])
    for t in profile.outputs:
        last[t] = n
    return {t: (b, last[t]) for t, b in born.items() if t in last and t not in free and last[t] > b}


def crossing_at(profile: GraphProfile, order: Sequence[int], bounds: Sequence[int]) -> list[list[str]]:
    """Per cut position in ``bounds`` (first and last excluded), the tensors that cross it."""
    spans = _spans(profile, order)
    return [[t for t, (b, last) in spans.items() if b < k <= last] for k in bounds[1:-1]]


def _cross_bytes(profile: GraphProfile, order: Sequence[int]) -> np.ndarray:
    """Bytes crossing each position 0..n (position k: between order[k-1] and order[k])."""
    n = len(order)
    delta = np.zeros(n + 2)
    for t, (b, last) in _spans(profile, order).items():
        size = profile.nbytes.get(t, 0)
        delta[b + 1] += size
        delta[min(last, n) + 1] -= size
    return np.cumsum(delta)[:n + 1]


def forced_order(profile: GraphProfile, tensors: Sequence[str]) -> tuple[list[int], list[int]]:
    """A node order and cut positions placing each named tensor's whole computation before its cut.

    The nodes each tensor depends on come first (in their original order), then the remaining
    nodes: the result is still topological.

    Raises:
        InputError: a name that is not a tensor computed by a node, or cuts that leave a stage empty.
    """
    produced = profile.producer
    for t in tensors:
        if t not in produced:
            what = "a graph input" if t in profile.inputs else (
                "an initializer" if t in profile.init_bytes else "not a tensor of the model")
            close = difflib.get_close_matches(t, list(produced), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else "name an intermediate tensor (see `onnxpipe inspect`)"
            raise InputError(f"cannot cut at {t!r}: it is {what}", hint=hint)
    placed: set[int] = set()
    order: list[int] = []
    bounds = [0]
    for t in sorted(dict.fromkeys(tensors), key=lambda t: produced[t]):
        stack, ancestors = [produced[t]], set()
        while stack:
            i = stack.pop()
            if i in ancestors or i in placed:
                continue
            ancestors.add(i)
            stack.extend(produced[r] for r in profile.reads[i] if r in produced)
        if not ancestors:
            raise InputError(f"cut at {t!r} leaves a stage empty: it is computed before the previous cut",
                             hint="give each --cut tensor once, or cut at tensors further apart")
        order += sorted(ancestors)
        placed |= ancestors
        bounds.append(len(order))
    rest = [i for i in range(len(profile.nodes)) if i not in placed]
    if not rest:
        raise InputError(f"cut at {tensors[-1]!r} leaves nothing for the last stage",
                         hint="cut at a tensor before the model's last node")
    order += rest
    bounds.append(len(order))
    return order, bounds


def _loads(profile: GraphProfile, order: Sequence[int], balance: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-position load (prefix-summable) and, for ``memory``, live bytes per position."""
    if balance == "flops":
        return np.array([profile.flops[i] for i in order], dtype=float), None
    seen: set[str] = set()
    weights = []
    for i in order:  # a weight shared by several nodes counts where it is first read
        new = [w for w in profile.weights[i] if w not in seen]
        seen.update(new)
        weights.append(sum(profile.init_bytes.get(w, 0) for w in new))
    live = None
    if balance == "memory":
        reordered = GraphProfile(**{**vars(profile), "nodes": [profile.nodes[i] for i in order],
                                    "reads": [profile.reads[i] for i in order]})
        live = np.array(live_bytes(reordered), dtype=float)
    return np.array(weights, dtype=float), live


def find_cuts(profile: GraphProfile, parts: int, *, balance: str = "flops", cuts: Sequence[str] = (),
              slack: float = 0.05, allowed: Sequence[int] | None = None) -> CutPlan:
    """Cut ``profile``'s graph into ``parts`` stages, or at the named tensors.

    Args:
        profile: the graph, from :func:`~onnxpipe.partition.profile.profile_graph`.
        parts: number of stages (ignored when ``cuts`` are given, which make ``len(cuts) + 1``).
        balance: ``flops`` (speed), ``params`` (weight bytes) or ``memory`` (weights + peak activations).
        cuts: tensors to cut after, by hand.
        slack: how far above the best bottleneck a part may go to send fewer bytes.
        allowed: the only positions a cut may take (e.g. layer boundaries); None: any.

    Raises:
        InputError: an unknown balance, fewer than 2 parts, more parts than nodes, or a bad cut tensor.

    Example:
        >>> find_cuts(profile_graph(model), 2, balance="params").bounds  # doctest: +SKIP
        [0, 88, 175]
    """
    if balance not in BALANCES:
        raise InputError(f"unknown balance {balance!r}", hint=f"use one of {', '.join(BALANCES)}")
    n = len(profile.nodes)
    if cuts:
        order, bounds = forced_order(profile, cuts)
        load, live = _loads(profile, order, balance)
        prefix = np.concatenate([[0.0], np.cumsum(load)])
        loads = [float(prefix[b] - prefix[a]) for a, b in itertools.pairwise(bounds)]
        return CutPlan(order, bounds, crossing_at(profile, order, bounds), loads, "manual")
    if parts < 2:
        raise InputError(f"--parts must be >= 2, received {parts}", hint="split into 2 or more parts")
    if parts > n:
        if n < 2:
            raise InputError(f"cannot cut a model of {n} node into {parts} parts: there is nothing to split",
                             hint="run the whole model on one device (onnxpipe infer)")
        raise InputError(f"cannot cut a model of {n} nodes into {parts} parts", hint=f"use --parts {n} or fewer")
    if allowed is not None and parts - 1 > len(set(allowed)):
        raise InputError(f"only {len(set(allowed))} cut position(s) are allowed, too few for {parts} parts",
                         hint=f"use --parts {len(set(allowed)) + 1} or fewer")
    blocked = _blocked(n, allowed)
    order = list(range(n))
    load, live = _loads(profile, order, balance)
    cross = _cross_bytes(profile, order)
    prefix = np.concatenate([[0.0], np.cumsum(load)])
    comm = FLOPS_PER_BYTE * cross if balance == "flops" else np.zeros(n + 1)

    def seg(j: int) -> np.ndarray:
        """Loads of the segments [i, j) for every i < j."""
        i = np.arange(j)
        value = prefix[j] - prefix[i] + comm[i] + comm[j]
        if live is not None:
            value = value + np.maximum.accumulate(live[j - 1::-1])[::-1]
        return value

    inf = np.inf
    best = np.full((parts + 1, n + 1), inf)
    best[0, 0] = 0.0
    for p in range(1, parts + 1):
        for j in range(p, n - (parts - p) + 1):
            best[p, j] = np.inf if blocked[j] else np.min(np.maximum(best[p - 1, :j], seg(j)))
    cap = best[parts, n] * (1 + slack) + 1e-9
    # among splits within the cap, the fewest bytes sent
    sent = np.full((parts + 1, n + 1), inf)
    back = np.zeros((parts + 1, n + 1), dtype=int)
    sent[0, 0] = 0.0
    for p in range(1, parts + 1):
        for j in range(p, n - (parts - p) + 1):
            load_j = seg(j)
            # ties in bytes go to the more even split (sum of squared loads; worth far less than a byte)
            cand = np.where(load_j <= cap, sent[p - 1, :j], inf) + (cross[j] if j < n else 0.0) + 1e-3 * (load_j / cap) ** 2
            i = int(np.argmin(cand))
            sent[p, j], back[p, j] = (inf if blocked[j] else cand[i]), i
    bounds = [n]
    for p in range(parts, 0, -1):
        bounds.append(int(back[p, bounds[-1]]))
    bounds.reverse()
    loads = [float(seg(b)[a]) for a, b in itertools.pairwise(bounds)]
    return CutPlan(order, bounds, crossing_at(profile, order, bounds), loads, balance)


def _node_own_bytes(node: onnx.NodeProto) -> int:
    """Bytes a node carries itself: tensor attributes (Constant) and initializers of its subgraphs."""
    from onnxpipe.core.external import nbytes
    from onnxpipe.core.graph import all_graphs, subgraphs

    total = sum(nbytes(a.t) for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    for sub in subgraphs(node):
        for g in all_graphs(sub):
            total += sum(nbytes(t) for t in g.initializer)
            total += sum(nbytes(a.t) for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)
    return total


def part_bytes(profile: GraphProfile, order: Sequence[int], bounds: Sequence[int]) -> list[int]:
    """Per stage: weight bytes (shared weights counted in each stage reading them) + bytes in + bytes out."""
    cross = _cross_bytes(profile, order)
    out = []
    for a, b in itertools.pairwise(bounds):
        names = {w for i in order[a:b] for w in profile.weights[i]}
        weights = sum(profile.init_bytes.get(w, 0) for w in names)
        own = sum(_node_own_bytes(profile.nodes[i]) for i in order[a:b])
        out.append(int(weights + own + (cross[a] if a > 0 else 0) + (cross[b] if b < len(order) else 0)))
    return out


def _blocked(n: int, allowed: Sequence[int] | None) -> np.ndarray:
    """Per position 0..n: True where a cut may not go (the ends are always open)."""
    blocked = np.zeros(n + 1, dtype=bool)
    if allowed is not None:
        blocked[1:n] = True
        blocked[[p for p in allowed if 0 < p < n]] = False
    return blocked


def find_capped_cuts(profile: GraphProfile, max_part_bytes: int, *, allowed: Sequence[int] | None = None) -> CutPlan:
    """The fewest stages each holding at most ``max_part_bytes``, then the fewest bytes sent between them.

    A stage holds its weights (a weight read on both sides of a cut is counted on both), the bytes
    of the tensors it receives and the bytes it sends. One dynamic program over the positions of
    the node order, with the weight bytes of every segment ending at ``j`` kept up to date
    incrementally (each weight read adds its size to the segments that newly contain it).

    ``allowed`` limits the cuts to those positions (e.g. layer boundaries).

    Raises:
        InputError: a cap that is not positive, or one node that alone holds more than the cap.

    Example:
        >>> [len(p) for p in find_capped_cuts(profile, 1 << 30).bounds]  # doctest: +SKIP
    """
    if max_part_bytes <= 0:
        raise InputError(f"--max-part-bytes must be positive, received {max_part_bytes}",
                         hint="give a size such as 1GB or 500MB")
    n = len(profile.nodes)
    order = list(range(n))
    cross = _cross_bytes(profile, order)
    seg_weights = np.zeros(n + 1)  # seg_weights[i]: bytes of the segment [i, j) for the current j
    last_read: dict[str, int] = {}
    parts = np.full(n + 1, np.iinfo(np.int64).max, dtype=np.int64)
    sent = np.full(n + 1, np.inf)
    back = np.zeros(n + 1, dtype=int)
    parts[0], sent[0] = 0, 0.0
    cap = float(max_part_bytes)
    blocked = _blocked(n, allowed)
    for j in range(1, n + 1):
        node = order[j - 1]
        for w in dict.fromkeys(profile.weights[node]):
            q = last_read.get(w, -1)
            seg_weights[q + 1:j] += profile.init_bytes.get(w, 0)
            last_read[w] = j - 1
        seg_weights[:j] += _node_own_bytes(profile.nodes[node])
        if blocked[j]:
            continue
        load = seg_weights[:j] + np.where(np.arange(j) > 0, cross[:j], 0.0) + (cross[j] if j < n else 0.0)
        ok = (load <= cap) & (parts[:j] < np.iinfo(np.int64).max)
        if not ok.any():
            if load[j - 1] > cap and allowed is None:
                big = profile.nodes[node]
                label = big.name or (big.output[0] if big.output else big.op_type)
                raise InputError(f"node {label!r} ({big.op_type}) alone holds {int(load[j - 1]):,} bytes, over "
                                 f"--max-part-bytes {max_part_bytes:,}",
                                 hint="raise --max-part-bytes above the largest single layer, or quantize the model first")
            continue
        fewest = parts[:j][ok].min()
        cand = np.where(ok & (parts[:j] == fewest), sent[:j] + np.where(np.arange(j) > 0, cross[:j], 0.0), np.inf)
        i = int(np.argmin(cand))
        parts[j], sent[j], back[j] = fewest + 1, cand[i], i
    if parts[n] == np.iinfo(np.int64).max:
        why = ("some layer, with what crosses its boundaries, holds more" if allowed is not None else
               "the tensors crossing every cut are too large")
        raise InputError(f"the model cannot be cut into parts of at most {max_part_bytes:,} bytes: {why}",
                         hint="raise --max-part-bytes, or lower --batch-size")
    bounds = [n]
    while bounds[-1] > 0:
        bounds.append(int(back[bounds[-1]]))
    bounds.reverse()
    loads = [float(b) for b in part_bytes(profile, order, bounds)]
    return CutPlan(order, bounds, crossing_at(profile, order, bounds), loads, "max_part_bytes")
