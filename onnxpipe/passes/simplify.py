"""simplify: onnxsim, onnxslim and ORT's basic offline optimizations, chained to a fixpoint.

Each backend alone and their chain are candidates; the smallest candidate (fewest nodes) whose
outputs still match the input model wins, so the result never has more nodes than the better
of onnxsim and onnxslim alone.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Literal

import onnx

from onnxpipe.core import external, skeleton
from onnxpipe.core.compare import compare_runs, outputs_on
from onnxpipe.core.deps import require
from onnxpipe.core.graph import subgraphs, used_names
from onnxpipe.core.modelio import EXTERNAL_DATA_THRESHOLD, tensor_bytes
from onnxpipe.core.units import human_bytes
from onnxpipe.core.userfiles import first_line
from onnxpipe.passes.base import Pass, PassConfig, PassContext, PassResult

Backend = Literal["onnxsim", "onnxslim", "ort"]


def count_nodes(model: onnx.ModelProto | onnx.GraphProto) -> int:
    """Nodes in the graph and all its subgraphs."""
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    return sum(1 + sum(count_nodes(g) for g in subgraphs(node)) for node in graph.node)


def repair(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Fix what the backends are known to leave behind.

    - ORT's saved optimized model can keep graph inputs that stood for folded initializers;
      ORT then refuses to load it. Such inputs, unused and not inputs of the original's
      interface, are dropped.
    - onnxslim can write IR version 3 with initializers that are not graph inputs, which
      ``onnx.checker`` rejects; the IR version is raised to 4, where that is legal.
    """
    g = model.graph
    inits = {i.name for i in g.initializer}
    original_inits = {i.name for i in original.graph.initializer}
    real_inputs = {i.name for i in original.graph.input if i.name not in original_inits}
    used = used_names(g, set()) | {o.name for o in g.output}
    keep = [i for i in g.input if i.name in real_inputs or i.name in used or i.name in inits]
    # an input backed by an initializer that nothing reads any more is dead weight too
    keep = [i for i in keep if i.name in real_inputs or i.name in used]
    if len(keep) != len(g.input):
        del g.input[:]
        g.input.extend(keep)
    if model.ir_version < 4 and any(name not in {i.name for i in g.input} for name in inits):
        model.ir_version = 4
    model.ir_version = max(model.ir_version, min(original.ir_version, onnx.IR_VERSION))
    return model


class Simplify(Pass):
    """Constant folding, dead-node and identity removal, shape folding and fusions.

    Each backend is a public method, model in, model out: :meth:`onnxsim`, :meth:`onnxslim`,
    :meth:`ort_basic` (named in :attr:`BACKENDS`). Every backend alone and their chain are candidates;
    the smallest whose outputs still match wins. A subclass may override a backend method.

    Example:
        >>> Simplify({"skip": ["ort"], "skip_fusions": ["FusionGemm"]})
        simplify(skip=['ort'], skip_fusions=['FusionGemm'])
    """

    name = "simplify"
    lazy = True

    class Config(PassConfig):
        skip: list[Backend] = []
        """Backends not to run: onnxsim, onnxslim, ort."""
        skip_fusions: list[str] = []
        """onnxslim fusion patterns (e.g. FusionGemm) and onnxsim optimizers (e.g. fuse_bn_into_conv) to skip."""
        max_rounds: int = 4
        """Rounds of the chained backends before giving up on a fixpoint."""

    BACKENDS: ClassVar[dict[str, str]] = {"onnxsim": "onnxsim", "onnxslim": "onnxslim", "ort": "ort_basic"}
    """Backend name (as ``skip`` takes it) -> the method that runs it."""

    def backends(self) -> list[tuple[str, Callable[[onnx.ModelProto], onnx.ModelProto]]]:
        """The backends this configuration runs, by name, in order."""
        return [(n, getattr(self, m)) for n, m in self.BACKENDS.items() if n not in self.config.skip]

    def onnxsim(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """onnxsim's simplify (its optimizers in ``skip_fusions`` left out)."""
        onnxsim = require("onnxsim")
        skipped = [f for f in self.config.skip_fusions if not f[:1].isupper()] or None
        out, _ = onnxsim.simplify(model, check_n=0, skipped_optimizers=skipped)
        return out

    def onnxslim(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """onnxslim's slim on a copy (its fusion patterns in ``skip_fusions`` left out)."""
        onnxslim = require("onnxslim")
        patterns = [f for f in self.config.skip_fusions if f[:1].isupper()] or None
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # onnxslim edits its input in place
        return onnxslim.slim(copy, skip_fusion_patterns=patterns, model_check=False)

    def ort_basic(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The model as ONNX Runtime's basic graph optimizations leave it."""
        ort = require("onnxruntime")
        with tempfile.TemporaryDirectory(prefix="onnxpipe-ort-") as tmp:
            target = Path(tmp) / "basic.onnx"
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            opts.optimized_model_filepath = str(target)
            opts.log_severity_level = 3
            ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            return onnx.load(str(target))

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        backends = self.backends()
        if not backends:
            return PassResult(model, modified=False, notes={"skipped": "every backend is skipped"})
        atol, rtol = self.tolerance
        reference = ctx.reference or (outputs_on(model, ctx.check_inputs) if ctx.check_inputs else None)
        failures: dict[str, str] = {}
        original, taken = model, {}
        if external.lazy_bytes(model) or tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
            # a large model: the backends work on its skeleton (big weights as inputs), never on copies of them
            model, taken = skeleton.hollow(model)
            ctx.log(f"simplify: {len(taken)} weights ({human_bytes(sum(external.nbytes(t) for t in taken.values()))}) "
                    "stay out of the backends (no folding through them)")

        def attempt(label: str, fn: Callable[[onnx.ModelProto], onnx.ModelProto],
                    m: onnx.ModelProto) -> onnx.ModelProto | None:
            try:
                with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = repair(fn(m), model)
                onnx.checker.check_model(out)
            except Exception as exc:  # a backend that fails leaves the others to do the job
                failures[label] = first_line(exc)
                return None
            return out

        candidates: dict[str, onnx.ModelProto] = {}
        for label, fn in backends:
            out = attempt(label, fn, model)
            if out is not None:
                candidates[label] = out
        # chain every backend, round after round, until the node count stops falling
        current, rounds = model, 0
        for rounds in range(1, self.config.max_rounds + 1):
            before = count_nodes(current)
            for label, fn in backends:
                start = candidates.get(label) if (rounds == 1 and current is model and label in candidates) else None
                out = start if start is not None else attempt(f"chain:{label}", fn, current)
                if out is not None:
                    current = out
            if count_nodes(current) >= before:
                break
        if current is not model:
            candidates["chain"] = current

        candidates["unchanged"] = model  # when nothing gets smaller, the input stays as it was
        sizes = {label: count_nodes(m) for label, m in candidates.items()}
        rejected: dict[str, str] = {}
        order = sorted(candidates, key=lambda k: (sizes[k], candidates[k].ByteSize(), k != "unchanged"))
        for label in order:
            m = candidates[label]
            if label == "unchanged":
                return PassResult(original, modified=False, notes={"chosen": None, "nodes_by_candidate": sizes,
                                                                   "backend_failures": failures, "rejected": rejected,
                                                                   "weights_kept_out": len(taken)})
            if taken:
                m = skeleton.fill(m, taken, original)
            if reference is not None:
                try:
                    worst = compare_runs(reference, outputs_on(m, ctx.check_inputs), atol=atol, rtol=rtol)
                except Exception as exc:  # ORT refusing the candidate is a failed check too
                    rejected[label] = first_line(exc)
                    continue
                bad = [c for c in worst if not c.ok]
                if bad:
                    rejected[label] = f"{bad[0].name}: max abs diff {bad[0].max_abs:.3g}"
                    continue
            notes = {"chosen": label, "nodes_by_candidate": sizes, "chain_rounds": rounds,
                     "backend_failures": failures, "rejected": rejected, "weights_kept_out": len(taken)}
            modified = sizes[label] != count_nodes(model) or m.ByteSize() != original.ByteSize()
            ctx.log(f"simplify: {count_nodes(model)} -> {sizes[label]} nodes ({label})")
            return PassResult(m, modified=modified, notes=notes)
        raise AssertionError("unreachable: the unchanged model is always a candidate")
