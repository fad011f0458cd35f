"""The pass contract: a small class with a validated config and one method from model to model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, ValidationError

from onnxpipe.core import external
from onnxpipe.core.compare import Comparison, compare_runs
from onnxpipe.core.errors import InputError


class PassConfig(BaseModel):
    """Options every pass accepts; unknown keys are rejected.

    ``atol``/``rtol`` override the pass's own tolerance for the check the pipeline runs after it.
    """

    model_config = ConfigDict(extra="forbid")

    atol: float | None = None
    rtol: float | None = None


@dataclass
class PassContext:
    """What a pass may use besides the model: data, a scratch directory, a progress callback.

    Attributes:
        check_inputs: input batches the pipeline compares models on (a pass may use them too).
        calibration: a callable returning a fresh iterable of input dicts (streamed, not stored).
        evaluation: ``(inputs by name, labels)`` for task metrics, or None.
        metric: ``metric(model) -> float`` on the evaluation data, or None.
        workdir: a scratch directory private to this pass run.
        log: a callable taking one line of text for the report and the live view.
        measure_latency: whether a pass may time models (off in quick runs and tests).
        reference: the input model's outputs on ``check_inputs``, when the pipeline has them (a pass
            that checks candidates itself need not run the input model again).
    """

    check_inputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    calibration: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None
    evaluation: tuple[dict[str, np.ndarray], np.ndarray] | None = None
    metric: Callable[[onnx.ModelProto], float] | None = None
    workdir: Path | None = None
    log: Callable[[str], None] = lambda line: None
    measure_latency: bool = True
    reference: list[dict[str, np.ndarray]] | None = None


@dataclass
class PassResult:
    """The new model, whether it changed, and what the pass wants reported."""

    model: onnx.ModelProto
    modified: bool = True
    notes: dict[str, Any] = field(default_factory=dict)
    rejected: str | None = None
    """Why the pipeline should roll the result back although it is correct (e.g. it runs slower)."""


class Pass:
    """Base class: subclasses set ``name``, a nested ``Config`` and implement :meth:`apply`.

    The pipeline, not the pass, checks the result against the input and rolls it back when it
    breaks the model; a pass only has to do its job and say what it did.

    Example:
        >>> class Identity(Pass):
        ...     name = "identity"
        ...     def apply(self, model, ctx):
        ...         return PassResult(model, modified=False)
        >>> Identity({}).config.atol is None
        True
    """

    name: ClassVar[str] = "pass"
    structural: ClassVar[bool] = False
    """A pass that rewrites layers (prune): the pipeline rolls it back if it adds parameters."""
    lazy: ClassVar[bool] = False
    """The pass takes a model whose weights stay on disk (external data not loaded) and reads only what it
    changes. Other passes get such a model with its weights read into memory (a copy) first."""
    atol: ClassVar[float] = 1e-4
    rtol: ClassVar[float] = 1e-3

    class Config(PassConfig):
        pass

    def __init__(self, config: Mapping[str, Any] | PassConfig | None = None) -> None:
        if isinstance(config, PassConfig):
            self.config = config
        else:
            self.config = self.parse_config(config or {})

    @classmethod
    def parse_config(cls, raw: Mapping[str, Any]) -> PassConfig:
        """Validate a raw option mapping, naming the pass and the bad key in the error."""
        try:
            return cls.Config.model_validate(dict(raw))
        except ValidationError as exc:
            problems = "; ".join(
                f"option {'.'.join(str(p) for p in err['loc']) or '(options)'}: "
                + ("unknown option" if err["type"] == "extra_forbidden" else err["msg"]
                   + (f", received {err['input']!r}" if isinstance(err.get("input"), (int, float, str)) else ""))
                for err in exc.errors())
            known = ", ".join(cls.Config.model_fields)
            raise InputError(f"pass {cls.name!r}, {problems}", hint=f"options of {cls.name}: {known}") from exc

    @property
    def tolerance(self) -> tuple[float, float]:
        """(atol, rtol) for the pipeline's check after this pass."""
        c = self.config
        return (self.atol if c.atol is None else c.atol, self.rtol if c.rtol is None else c.rtol)

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def compare(self, before: Sequence[Mapping[str, np.ndarray]],
                after: Sequence[Mapping[str, np.ndarray]]) -> list[Comparison]:
        """How the pipeline judges this pass: outputs before vs after on the same inputs.

        The default is elementwise ``|after - before| <= atol + rtol * |before|`` per output.
        Passes that change numerics by design (quantization, pruning) override this with the
        criterion that fits them (cosine similarity, top-1 agreement, ...); a Comparison with
        ``ok=False`` rolls the pass back.
        """
        atol, rtol = self.tolerance
        return compare_runs(before, after, atol=atol, rtol=rtol)

    def __repr__(self) -> str:
        opts = self.config.model_dump(exclude_defaults=True)
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"


def apply_pass(p: Pass, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
    """``p.apply(model, ctx)`` for any model: a pass that needs the weights' bytes (not :attr:`Pass.lazy`) is
    given a model whose weights stay on disk with them read in (a copy; ``model`` stays as it is)."""
    if not p.lazy and external.lazy_bytes(model):
        model = external.materialize(model)
    return p.apply(model, ctx)
