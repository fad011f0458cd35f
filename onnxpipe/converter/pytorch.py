"""PyTorch to ONNX: the dynamo exporter first, the TorchScript exporter when it fails."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpipe.converter.base import (
    Attempt,
    ExportOutcome,
    FrameworkModel,
    default_output_names,
    flatten_outputs,
    normalize_examples,
)
from onnxpipe.core.deps import require
from onnxpipe.core.errors import ConversionError, InputError
from onnxpipe.core.inputs import examples_from_specs
from onnxpipe.core.tensors import InputSpec, batched_inputs
from onnxpipe.core.userfiles import first_line


def _names_from_signature(model: Any) -> list[str]:
    torch = require("torch")
    if isinstance(model, torch.jit.ScriptModule):
        try:
            return [a.name for a in model.forward.schema.arguments[1:]]
        except Exception:  # noqa: BLE001 - a scripted function without a schema: fall back to input_i
            return []
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _make_reference(call: Any, names: list[str], by_keyword: bool):
    torch = require("torch")

    def reference(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        tensors = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names]
        with torch.no_grad():
            out = call(**dict(zip(names, tensors))) if by_keyword else call(*tensors)
        flat, _ = flatten_outputs(out)
        return [t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t) for t in flat]

    return reference


def _output_names(inputs: dict[str, np.ndarray], call: Any, names: list[str], by_keyword: bool) -> list[str]:
    torch = require("torch")
    tensors = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names]
    with torch.no_grad():
        out = call(**dict(zip(names, tensors))) if by_keyword else call(*tensors)
    flat, keyed = flatten_outputs(out)
    return keyed if keyed else default_output_names(len(flat))


def from_object(model: Any, example: Any, kind: str | None = None) -> FrameworkModel:
    """A ``torch.nn.Module`` (or scripted module) from a factory, with its example inputs."""
    torch = require("torch")
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"expected a torch.nn.Module, received {type(model).__name__}",
                         hint="return an nn.Module from the factory")
    model.eval()
    inputs, by_keyword = normalize_examples(example, _names_from_signature(model))
    names = list(inputs)
    reference = _make_reference(model, names, by_keyword)
    kind = kind or ("torchscript" if isinstance(model, torch.jit.ScriptModule) else "nn.Module")
    return FrameworkModel("torch", kind, model, inputs, reference,
                          _output_names(inputs, model, names, by_keyword), by_keyword)


TRUST_HINT = "load it only if you trust where it comes from: add --trust (recipe: trust: true)"


@contextlib.contextmanager
def weights_only(trust: bool) -> Iterator[None]:
    """Every ``torch.load`` inside (torch.export's own too) unpickles tensors and containers only,
    unless the user trusts the file: a pickle can run any code while it loads.

    torch.export.load reads pickled weights, constants and example inputs with
    ``weights_only=False`` (or falls back to it); here that fallback is refused.
    """
    torch = require("torch")
    if trust:
        yield
        return
    real = torch.load

    def safe(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real(f, *args, **kwargs)

    torch.load = safe
    try:
        yield
    finally:
        torch.load = real


def _needs_code(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return "weights_only" in text.lower() or "Unsupported global" in text or "UnpicklingError" in text


def _pickled_module(path: Path, specs: Sequence[InputSpec], trust: bool) -> FrameworkModel:
    """A ``torch.save`` pickle: weights (a state_dict: no model to convert) or a whole module (code)."""
    torch = require("torch")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if not _needs_code(exc):
            raise InputError(f"{path} is neither a TorchScript archive nor a torch.save file ({first_line(exc)})",
                             hint="save the model with torch.jit.save(torch.jit.script(model), path), "
                                  "or pass a factory file.py:build") from exc
        if not trust:
            raise InputError(f"{path} is a pickled Python object: loading it runs code from the file "
                             f"({first_line(exc, 120)})", hint=TRUST_HINT) from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise InputError(f"{path} cannot be loaded ({first_line(exc2)})",
                             hint="the classes it pickles must be importable; pass a factory file.py:build") from exc2
    if not isinstance(obj, torch.nn.Module):
        what = "weights (a state_dict)" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise InputError(f"{path} holds {what}, not a model",
                         hint="pass a factory file.py:build that builds the model and loads these weights")
    if not specs:
        raise InputError(f"a pickled module carries no input shapes: {path}",
                         hint="give each input with --input NAME:1x3x224x224:float32")
    rng = np.random.default_rng(0)
    return from_object(obj, tuple(examples_from_specs(specs, rng).values()), kind="nn.Module")


def from_archive(path: Path, kind: str, specs: Sequence[InputSpec], *, trust: bool = False) -> FrameworkModel:
    """A TorchScript (``.pt``) or torch.export (``.pt2``) archive, or a pickled module with ``trust``."""
    torch = require("torch")
    rng = np.random.default_rng(0)
    if kind == "torch.export":
        try:
            with weights_only(trust):
                ep = torch.export.load(str(path))
        except Exception as exc:
            if not trust and _needs_code(exc):
                raise InputError(f"{path} holds pickled objects that run code when loaded ({first_line(exc, 120)})",
                                 hint=TRUST_HINT) from None
            raise InputError(f"{path} is not a loadable torch.export archive ({first_line(exc)})",
                             hint="save it with torch.export.save(exported_program, path)") from exc
        if specs:
            example: Any = {s.name: torch.from_numpy(a) for s, a in zip(specs, examples_from_specs(specs, rng).values())}
            example = tuple(example.values())
        else:
            args, kwargs = ep.example_inputs or ((), {})
            example = kwargs if kwargs and not args else tuple(args)
        if not example:
            raise InputError(f"{path} carries no example inputs", hint="give them with --input NAME:1x3x224x224:float32")
        names = [s.name for s in specs] or [
            spec.arg.name for spec in ep.graph_signature.input_specs
            if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]
        inputs, by_keyword = normalize_examples(example, names)
        module = ep.module()
        reference = _make_reference(module, list(inputs), by_keyword)
        return FrameworkModel("torch", kind, ep, inputs, reference,
                              _output_names(inputs, module, list(inputs), by_keyword), by_keyword)
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        if _is_torch_save(path):
            return _pickled_module(path, specs, trust)
        raise InputError(f"{path} is not a loadable TorchScript archive ({first_line(exc)})",
                         hint="save the model with torch.jit.save(torch.jit.script(model), path), "
                              "or pass a factory file.py:build") from exc
    if not specs:
        raise InputError(f"a TorchScript archive carries no input shapes: {path}",
                         hint="give each input with --input NAME:1x3x224x224:float32")
    return from_object(model, tuple(examples_from_specs(specs, rng).values()), kind="torchscript")


def _is_torch_save(path: Path) -> bool:
    """A ``torch.save`` file (a zip with a data.pkl and no TorchScript code), or an old raw pickle."""
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            return any(n.endswith("data.pkl") for n in names) and not any("/code/" in n for n in names)
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"  # a pickle's PROTO opcode
    except OSError:
        return False


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Keep the exporters' prints and warnings off stdout (which may carry --json)."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def export(fm: FrameworkModel, *, opset: int, dynamic_batch: bool) -> ExportOutcome:
    """Try each of :data:`EXPORTERS` (dynamo, then TorchScript) in turn; report every attempt."""
    torch = require("torch")
    names = list(fm.inputs)
    batched, batch = batched_inputs(fm.inputs) if dynamic_batch else (set(), None)
    inputs = fm.inputs
    if batched and batch == 1:
        # torch.export specializes size-1 dims; trace with a batch of 2 so the axis stays symbolic
        inputs = {n: (np.concatenate([a, a]) if n in batched else a) for n, a in inputs.items()}
    tensors = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in inputs.items()}
    args = () if fm.call_with_kwargs else tuple(tensors.values())
    kwargs = tensors if fm.call_with_kwargs else None
    out_names = fm.output_names
    if batched:
        outs = fm.reference(inputs)
        two = 2 if batch == 1 else batch
        out_batched = {n for n, o in zip(out_names or [], outs) if o.ndim >= 1 and o.shape[0] == two}
    else:
        out_batched = set()
    attempts: list[Attempt] = []
    with tempfile.TemporaryDirectory(prefix="onnxpipe-export-") as tmp:
        for name, strategy in EXPORTERS:
            target = Path(tmp) / f"{name}.onnx"
            start = time.perf_counter()
            try:
                with _quiet():
                    strategy(fm, args, kwargs, target, names=names, out_names=out_names, opset=opset,
                             batched=batched | out_batched)
                model = onnx.load(str(target))
            except Exception as exc:  # each strategy's failure is recorded; the next one is tried
                attempts.append(Attempt(name, time.perf_counter() - start, first_line(exc)))
                continue
            attempts.append(Attempt(name, time.perf_counter() - start))
            return ExportOutcome(model, f"torch.onnx.export ({name})", attempts)
    detail = "; ".join(f"{a.strategy}: {a.error}" for a in attempts)
    raise ConversionError(f"every PyTorch exporter failed ({detail})",
                          hint="run with --debug, or simplify the model's forward for export")


def export_dynamo(fm, args, kwargs, target, *, names, out_names, opset, batched) -> None:
    """``torch.onnx.export(dynamo=True)`` with the batch axis as a ``torch.export.Dim``."""
    torch = require("torch")
    model = fm.obj
    dynamic_shapes = None
    if batched and fm.kind != "torch.export":
        dim = torch.export.Dim("batch")
        per_input = {n: ({0: dim} if n in batched else None) for n in names}
        dynamic_shapes = per_input if kwargs else tuple(per_input.values())
    torch.onnx.export(model, args, str(target), kwargs=kwargs, dynamo=True, opset_version=opset,
                      input_names=names, output_names=out_names, dynamic_shapes=dynamic_shapes,
                      external_data=True, report=False, verify=False)


def export_torchscript(fm, args, kwargs, target, *, names, out_names, opset, batched) -> None:
    """``torch.onnx.export(dynamo=False)`` (TorchScript tracing) with ``dynamic_axes`` for the batch."""
    torch = require("torch")
    model = fm.obj.module() if fm.kind == "torch.export" else fm.obj
    dynamic_axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in names if n in batched}
    dynamic_axes.update({n: {0: "batch"} for n in out_names or [] if n in batched})
    torch.onnx.export(model, args, str(target), kwargs=kwargs, dynamo=False, opset_version=opset,
                      input_names=names, output_names=out_names, dynamic_axes=dynamic_axes or None)


Exporter = Callable[..., None]
"""``exporter(fm, args, kwargs, target, *, names, out_names, opset, batched)`` writes ``target``
(an .onnx path) or raises; ``batched`` names the inputs and outputs whose axis 0 is the batch."""

EXPORTERS: list[tuple[str, Exporter]] = [("dynamo", export_dynamo), ("torchscript", export_torchscript)]
"""The exporters :func:`export` tries, in order, by name: the first whose model loads wins, and
every failure is reported in the conversion's attempts. Replace or reorder entries to change it."""
