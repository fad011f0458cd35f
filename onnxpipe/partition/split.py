"""``onnxpipe split``: cut a model into stages, check that the stages in sequence give the model's outputs, write them.

The folder gets ``part<k>.onnx`` (weights in ``part<k>.onnx.data`` beside it) and
``pipeline.json`` (see :mod:`onnxpipe.partition.spec`), all at once: a failed cut or check
leaves the folder as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from rich.markup import escape
from rich.table import Table

from onnxpipe.core.compare import Comparison
from onnxpipe.core.errors import CheckFailedError, InputError, OnnxpipeError
from onnxpipe.core.files import atomic_output
from onnxpipe.core.modelio import check_model, load_model, save_model, tensor_bytes
from onnxpipe.core.tensors import graph_inputs, value_infos
from onnxpipe.core.units import human_bytes, human_count
from onnxpipe.partition.cut import find_capped_cuts, find_cuts, part_bytes
from onnxpipe.partition.extract import Stage, build_stages
from onnxpipe.partition.layers import decoder_feeds, layer_boundaries
from onnxpipe.partition.memory import report_from_profile
from onnxpipe.partition.profile import GraphProfile, profile_graph
from onnxpipe.partition.spec import FILE, PartSpec, PipelineSpec, carried

# the tolerance every pass is checked with (onnxpipe.passes.base.Pass)
ATOL, RTOL = 1e-4, 1e-3


@dataclass
class SplitResult:
    """What ``split`` wrote and how the stages compare with the whole model.

    Example:
        >>> r = split_model("resnet50.onnx", "out", parts=2)  # doctest: +SKIP
        >>> r.spec.parts[1].inputs, r.ok  # doctest: +SKIP
        (['res4a'], True)
    """

    spec: PipelineSpec
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    def as_dict(self) -> dict[str, Any]:
        return {**self.spec.as_dict(), "folder": str(self.spec.folder), "notes": self.notes}

    def table(self) -> Table:
        """Per part: nodes, FLOPs and share, weights, peak activations, what it receives and sends."""
        parts = self.spec.parts
        total = sum(p.flops for p in parts) or 1
        check = self.spec.extra.get("check", {})
        t = Table(title=f"{len(parts)} parts in {escape(str(self.spec.folder))} (balance {self.spec.extra.get('balance')}; "
                        f"sequence vs whole: max abs diff {check.get('max_abs', float('nan')):.3g}, "
                        f"{'pass' if check.get('ok') else 'not checked' if not check else 'FAIL'})")
        holds = self.spec.extra.get("part_bytes") or [None] * len(parts)
        for col in ("part", "nodes", "FLOPs", "share", "weights", "holds", "peak act.", "receives", "sends"):
            t.add_column(col, justify="left" if col in ("part", "receives") else "right")
        for p, held in zip(parts, holds):
            t.add_row(escape(p.file), str(p.nodes), human_count(p.flops, "FLOPs"), f"{p.flops / total:.0%}",
                      human_bytes(p.weight_bytes), human_bytes(held) if held is not None else "-",
                      human_bytes(p.peak_activation_bytes),
                      escape(", ".join(p.inputs[:3]) + (f" (+{len(p.inputs) - 3})" if len(p.inputs) > 3 else "")),
                      f"{human_bytes(p.sent_bytes)} ({len(p.sends)})" if p.sends else "-")
        return t


def _stage_spec(k: int, stage: Stage, profile: GraphProfile) -> PartSpec:
    shapes = {t: profile.shapes[t] for t in stage.inputs if t in profile.shapes}
    memory = report_from_profile(profile_graph(stage.model, batch=profile.batch, input_shapes=shapes))
    spec = PartSpec(k, f"part{k}.onnx", stage.inputs, stage.outputs, [], nodes=len(stage.model.graph.node),
                    flops=sum(profile.flops[i] for i in stage.nodes), weight_bytes=tensor_bytes(stage.model),
                    peak_activation_bytes=memory.peak_bytes)
    return spec  # sends: filled in once every part is known


def check_sequence(model: onnx.ModelProto, stages: Sequence[onnx.ModelProto], parts: list[PartSpec],
                   outputs: list[str], *, batch: int, batches: int = 2, seed: int = 0,
                   atol: float = ATOL, rtol: float = RTOL,
                   inputs: Sequence[Mapping[str, Any]] | None = None) -> list[Comparison]:
    """Compare the stages run in sequence with the whole model on random inputs, per output.

    Example:
        >>> all(c.ok for c in check_sequence(model, [s.model for s in stages], parts, ["y"], batch=2))  # doctest: +SKIP
        True
    """
    from onnxpipe.core.compare import compare_runs, outputs_on
    from onnxpipe.core.inputs import example_inputs
    from onnxpipe.core.session import Session

    if inputs is None:
        inputs = [example_inputs(model, batch=batch, seed=seed + k) for k in range(batches)]
    expected = outputs_on(model, list(inputs))
    # one stage's session at a time, every batch through it: memory holds one stage's weights, not all
    values = [dict(feeds) for feeds in inputs]
    names = list(inputs[0]) if inputs else []
    for k, (stage, part) in enumerate(zip(stages, parts)):
        keep = set(carried(parts, outputs, k, names))
        with Session(stage) as s:
            for v in values:
                v.update(s.run({t: v[t] for t in part.inputs}))
        values = [{t: x for t, x in v.items() if t in keep} for v in values]
    got = [{t: v[t] for t in outputs} for v in values]
    return compare_runs(expected, got, atol=atol, rtol=rtol)


def split_model(model: str | os.PathLike | onnx.ModelProto, outdir: str | os.PathLike, *, parts: int = 2,
                balance: str = "flops", cuts: Sequence[str] = (), batch: int = 1,
                dims: Mapping[str, int] | None = None, check: bool = True, atol: float = ATOL,
                rtol: float = RTOL, max_part_bytes: int | None = None, at_layers: bool = False,
                side_files: Sequence[str | os.PathLike] = (), inputs: Mapping[str, Any] | None = None) -> SplitResult:
    """Cut ``model`` into stages, check them against the whole, and write them with ``pipeline.json``.

    Args:
        model: an ``.onnx`` path or a ``ModelProto``.
        outdir: the folder to write (created; files of an earlier split there are replaced).
        parts: number of stages (``len(cuts) + 1`` when cuts are given).
        balance: ``flops``, ``params`` or ``memory`` (see :mod:`onnxpipe.partition.cut`).
        cuts: tensors to cut after, by hand.
        batch: batch size the costs and sizes are counted at.
        dims: sizes of named symbolic dims.
        check: run the stages in sequence against the whole model before writing anything.
        atol, rtol: tolerance of that check.
        max_part_bytes: instead of ``parts``, as many parts as needed for each to hold at most this
            many bytes (weights + the tensors it receives and sends), cut where little crosses.
        at_layers: cut only between decoder layers (a model with ``past_key_values.{i}`` inputs),
            so each stage holds whole layers and their KV cache.
        side_files: files copied into the folder beside the parts (a decoder's tokenizer and configs).
        inputs: a batch of real inputs for that check (default: generated ones).

    A model given as a path is read without its external data: weights are copied from file to
    file one tensor at a time and ONNX Runtime memory-maps them for the check, so memory stays
    near one copy of the weights however large the model.

    Raises:
        InputError: bad options or cut tensors, an ``outdir`` that is a file.
        CheckFailedError: the stages in sequence disagree with the whole model (nothing written).

    Example:
        >>> split_model("model.onnx", "split", parts=2, balance="params").spec.parts[0].file  # doctest: +SKIP
        'part0.onnx'
    """
    source = str(model) if not isinstance(model, onnx.ModelProto) else "<in memory>"
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model, load_external_data=False)
    if max_part_bytes is not None and cuts:
        raise InputError("--max-part-bytes and --cut both choose the cuts", hint="give one of them")
    if cuts and parts not in (2, len(cuts) + 1):
        raise InputError(f"{len(cuts)} --cut tensor(s) make {len(cuts) + 1} parts, not --parts {parts}",
                         hint="drop --parts when cutting by hand")
    folder = Path(outdir)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file", hint="give a folder for the parts with -o")
    check_inputs = None
    if inputs:  # the user's own data (--data): a batch of it, cut or repeated to the batch size
        from onnxpipe.core.tensors import tile_batch

        check_inputs = [tile_batch(inputs, batch)]
    elif at_layers:  # a cached decoder step needs consistent inputs (mask over past + new positions)
        check_inputs = [decoder_feeds(proto, batch=batch, seed=k) for k in range(2)]
    profile = profile_graph(proto, batch=batch, dims=dims,
                            input_shapes={k: v.shape for k, v in check_inputs[0].items()} if check_inputs else None)
    allowed = None
    if at_layers:
        if cuts:
            raise InputError("--cut and layer boundaries both choose the cuts", hint="give one of them")
        allowed = layer_boundaries(profile)
    if max_part_bytes is not None:
        plan = find_capped_cuts(profile, max_part_bytes, allowed=allowed)
    else:
        plan = find_cuts(profile, parts, balance=balance, cuts=cuts, allowed=allowed)
    stages = build_stages(profile, plan)
    outputs = list(profile.outputs)
    for k, stage in enumerate(stages):
        try:
            check_model(stage.model, what=f"part {k}")
        except InputError as exc:  # a stage we built is broken: our bug, but say which
            raise OnnxpipeError(f"split produced an invalid {exc.message}", hint="report this with the model") from exc
    specs = [_stage_spec(k, s, profile) for k, s in enumerate(stages)]
    names = [i.name for i in graph_inputs(proto)]
    for k, p in enumerate(specs[:-1]):
        p.sends = carried(specs, outputs, k, names)
        p.sent_bytes = sum(profile.nbytes.get(t, 0) for t in p.sends)
    comparisons = []
    if check:
        comparisons = check_sequence(proto, [s.model for s in stages], specs, outputs, batch=batch, atol=atol, rtol=rtol,
                                     inputs=check_inputs)
        bad = [c for c in comparisons if not c.ok]
        if bad:
            w = max(bad, key=lambda c: c.max_abs)
            raise CheckFailedError(f"the parts in sequence disagree with the whole model on {w.name!r} "
                                   f"(max abs diff {w.max_abs:.3g}, atol={atol:g}, rtol={rtol:g})",
                                   hint="cut elsewhere with --cut, or report this with the model")
    cut_info = [{"after_part": k, "bytes": sum(profile.nbytes.get(t, 0) for t in specs[k].sends),
                 "tensors": [{"name": t, "bytes": profile.nbytes.get(t, 0),
                              "shape": list(profile.shapes[t]) if t in profile.shapes else None}
                             for t in specs[k].sends]} for k in range(len(specs) - 1)]
    worst = max(comparisons, key=lambda c: c.max_abs, default=None)
    extra: dict[str, Any] = {
        "source": source, "balance": plan.balance, "batch": batch, "cuts": cut_info,
        "part_bytes": part_bytes(profile, plan.order, plan.bounds),
        **({"layers": [sorted({int(m) for t in (*p.inputs, *p.outputs) for m in _layer_of(t)}) for p in specs]}
           if at_layers else {}),
        **({"max_part_bytes": max_part_bytes} if max_part_bytes is not None else {}),
        "check": {"ok": all(c.ok for c in comparisons), "atol": atol, "rtol": rtol,
                  "max_abs": worst.max_abs if worst else 0.0, "outputs": [c.as_dict() for c in comparisons]}
        if check else {}}

    def io(infos: list) -> list[dict[str, Any]]:
        return [{"name": i.name, "dtype": str(i.dtype), "shape": i.shape} for i in infos]

    spec = PipelineSpec(folder, io(graph_inputs(proto)), io(value_infos(proto.graph.output)), specs, extra)
    _write(spec, stages, side_files)
    return SplitResult(spec, comparisons, list(profile.notes))


def _layer_of(name: str) -> list[str]:
    from onnxpipe.partition.layers import PAST, PRESENT

    m = PAST.match(name) or PRESENT.match(name)
    return [m.group(1)] if m else []


def _write(spec: PipelineSpec, stages: list[Stage], side_files: Sequence[str | os.PathLike] = ()) -> None:
    """Every part, then pipeline.json, moved into the folder together; older parts there removed."""
    from onnxpipe.core.files import file_digest

    folder = spec.folder
    old: set[str] = set()
    if (folder / FILE).is_file():
        try:
            old = {f for p in json.loads((folder / FILE).read_text()).get("parts", [])
                   for f in (p["file"], f"{p['file']}.data")}
        except (OSError, ValueError, KeyError, TypeError):  # an unreadable old split: leave its files
            old = set()
    with atomic_output(folder / FILE) as tmp:
        for part, stage in zip(spec.parts, stages):
            save_model(stage.model, tmp / part.file, external_data=True)
            part.sha256 = file_digest(tmp / part.file)
        for f in side_files:
            shutil.copy2(f, tmp / Path(f).name)
        spec.write(tmp)
        new = {f.name for f in tmp.iterdir()}
    for name in old - new:
        (folder / name).unlink(missing_ok=True)
