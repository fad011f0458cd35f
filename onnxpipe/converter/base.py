"""What every framework backend hands to the converter: a loaded model and its export attempts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxpipe.core.errors import InputError

DEFAULT_OPSET = 18
"""Opset 18: exported by torch's dynamo exporter, run by ONNX Runtime and parsed by TensorRT 10."""


@dataclass
class FrameworkModel:
    """A framework model loaded for conversion, with example inputs and a reference runner.

    Attributes:
        framework: ``torch``, ``tensorflow`` or ``onnx``.
        kind: what the source was (``nn.Module``, ``torchscript``, ``torch.export``, ``keras``,
            ``tf.function``, ``savedmodel``, ``onnx``).
        obj: the framework object itself.
        inputs: example inputs by name, in positional order.
        reference: runs the framework model on inputs by name, returns flat outputs in order.
        output_names: names for the flat outputs, when the framework gives them.
        call_with_kwargs: whether the model takes its inputs by keyword (dict example inputs).
    """

    framework: str
    kind: str
    obj: Any
    inputs: dict[str, np.ndarray]
    reference: Callable[[dict[str, np.ndarray]], list[np.ndarray]]
    output_names: list[str] | None = None
    call_with_kwargs: bool = False


@dataclass
class Attempt:
    """One export strategy and how it went (``error`` is None on success)."""

    strategy: str
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "seconds": round(self.seconds, 3), "ok": self.ok, "error": self.error}


@dataclass
class ExportOutcome:
    """The ONNX model a backend produced and every strategy it tried on the way."""

    model: Any  # onnx.ModelProto
    exporter: str
    attempts: list[Attempt] = field(default_factory=list)


def flatten_outputs(out: Any) -> tuple[list[Any], list[str] | None]:
    """Flatten nested tuples, lists and dicts of tensors in pytree order; dict keys give names."""
    flat: list[Any] = []
    names: list[str] = []
    named = isinstance(out, dict)

    def walk(o: Any, prefix: str) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{prefix}{'.' if prefix else ''}{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{prefix}{'.' if prefix else ''}{i}")
        elif o is None:
            return
        else:
            flat.append(o)
            names.append(prefix)

    walk(out, "")
    return flat, (names if named else None)


def default_output_names(n: int) -> list[str]:
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def to_numpy(value: Any, what: str) -> np.ndarray:
    """Tensor-like (numpy, torch, tf, scalars) to a numpy array."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch.Tensor
        return value.detach().cpu().numpy()
    if hasattr(value, "numpy"):  # tf.Tensor
        return np.asarray(value.numpy())
    if isinstance(value, (int, float, bool, list)):
        return np.asarray(value)
    raise InputError(f"example input {what} is a {type(value).__name__}, not an array or tensor",
                     hint="return arrays or tensors (a tuple, or a dict by input name)")


def normalize_examples(example: Any, names: Sequence[str] | None) -> tuple[dict[str, np.ndarray], bool]:
    """Example inputs (tensor, tuple/list or dict) -> ordered ``{name: array}`` and whether by keyword."""
    if isinstance(example, dict):
        return {str(k): to_numpy(v, repr(k)) for k, v in example.items()}, True
    items = list(example) if isinstance(example, (tuple, list)) else [example]
    names = list(names or [])
    if len(names) < len(items):
        names += [f"input_{i}" for i in range(len(names), len(items))]
    return {names[i]: to_numpy(v, names[i]) for i, v in enumerate(items)}, False
