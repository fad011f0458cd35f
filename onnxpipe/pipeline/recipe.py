"""The YAML recipe, validated with pydantic; every error names the file and line.

Example recipe::

    model: {source: models/digits_cnn/model.py:build}
    data:
      calibration: models/digits_cnn/data.py:calibration
      evaluation: models/digits_cnn/data.py:evaluation
    passes:
      - simplify
      - fp16: {keep_fp32_ops: [Softmax]}
    validate: {providers: [cpu], atol: 1.0e-4, rtol: 1.0e-3, metric: top1}
    output: runs/digits
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from onnxpipe.core.errors import InputError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """What to convert: anything ``onnxpipe convert`` accepts."""

    source: str
    framework: str | None = None
    inputs: list[str] = Field(default_factory=list)
    dynamic_batch: bool = True
    opset: int | None = Field(None, ge=7, le=30)
    atol: float = Field(1e-4, ge=0, allow_inf_nan=False)
    rtol: float = Field(1e-3, ge=0, allow_inf_nan=False)
    check: bool = True
    task: str | None = None
    """Hugging Face folders (or a ``file.py:function`` returning one): the task to export for."""
    trust: bool = False
    """Allow a source that runs code while it loads (a pickled module, a SavedModel with file ops)."""


class DataSpec(_Strict):
    calibration: str | None = None
    """``file.py:function`` (iterable of input dicts), a ``.npz``, or a directory of .npy/.npz."""
    evaluation: str | None = None
    """``file.py:function`` returning (inputs, labels), or a ``.npz`` with a ``labels`` array."""
    batch_size: int = Field(32, ge=1, le=1 << 20)
    check_batches: int = Field(2, ge=1, le=100_000)


class ValidateSpec(_Strict):
    providers: list[str] = Field(default_factory=lambda: ["cpu"])
    atol: float = Field(1e-4, ge=0, allow_inf_nan=False)
    rtol: float = Field(1e-3, ge=0, allow_inf_nan=False)
    metric: str | None = None
    latency: bool = True


class TargetSpec(_Strict):
    """Where the objective is measured: any device spec the runtimes accept, and the batch size."""

    device: str = "cpu"
    batch_size: int = Field(1, ge=1)


class ObjectiveSpec(_Strict):
    """What to optimize; a stage that makes it worse beyond noise is rolled back (see onnxpipe/objective.py)."""

    goal: Literal["latency", "throughput", "size"]
    max_drop: float | None = Field(None, ge=0.0)
    """Largest drop of validate.metric from the input model that a stage may cause."""
    min_change: float = Field(0.02, ge=0.0)
    rounds: int = Field(7, ge=2)
    round_s: float = Field(0.05, gt=0.0)


class Recipe(_Strict):
    """A whole run: convert, passes, validation and where to write it."""

    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    passes: list[Any] = Field(default_factory=list)
    validate_: ValidateSpec = Field(default_factory=ValidateSpec, alias="validate")
    runtime: str | None = None
    """A tuned.json from ``onnxpipe tune``: its devices are validated on unless validate.providers is given."""
    target: TargetSpec | None = None
    objective: ObjectiveSpec | None = None
    """``latency``, ``throughput`` or ``size``, or ``{goal: ..., max_drop: ...}``: measured on ``target`` after every pass."""
    output: str | None = None
    base_dir: Path | None = Field(default=None, exclude=True)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"source": v} if isinstance(v, str) else v

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_shorthand(cls, v: Any) -> Any:
        return {"goal": v} if isinstance(v, str) else v

    def objective_for_run(self) -> Any:
        """The :class:`onnxpipe.objective.Objective` of this recipe, or None when it states none."""
        if self.objective is None:
            return None
        from onnxpipe.pipeline.objective import Objective

        t = self.target or TargetSpec()
        return Objective.parse(self.objective.model_dump(), device=t.device, batch_size=t.batch_size)

    @model_validator(mode="after")
    def _check_passes(self) -> Recipe:
        from onnxpipe.passes import get_pass

        for i, spec in enumerate(self.passes):
            if isinstance(spec, dict) and "keep" in spec and len(spec) == 2:
                if not isinstance(spec["keep"], bool):
                    raise _PassError(i, None, f"keep: must be true or false, received {spec['keep']!r}")
                spec = {k: v for k, v in spec.items() if k != "keep"}
            if isinstance(spec, str):
                name, cfg = spec, {}
            elif isinstance(spec, dict) and len(spec) == 1:
                (name, cfg), = spec.items()
                cfg = cfg or {}
                if not isinstance(cfg, dict):
                    raise _PassError(i, name, f"options of {name} must be a mapping, received {cfg!r}")
            else:
                raise _PassError(i, None, f"a pass is a name or {{name: {{options}}}}, received {spec!r}")
            try:
                get_pass(name).parse_config(cfg)
            except InputError as exc:
                raise _PassError(i, name, str(exc)) from None
        return self


class _PassError(ValueError):
    def __init__(self, index: int, name: str | None, message: str) -> None:
        self.index, self.name = index, name
        super().__init__(message)


def _lines(text: str) -> dict[tuple, int]:
    """Line number (1-based) of every key and item, keyed by its path in the document."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[path + (key.value,)] = key.start_mark.line + 1
                walk(value, path + (key.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def load_recipe(source: str | os.PathLike | dict[str, Any]) -> Recipe:
    """Read and validate a recipe from a YAML file (or a dict); errors give ``file:line: what``."""
    if isinstance(source, dict):
        where, text, data, lines = "recipe", None, source, {}
        base = Path.cwd()
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"no such recipe file: {path}", hint="give the path of a .yaml recipe")
        from onnxpipe.core.userfiles import read_text

        where, text, base = str(path), read_text(path, what="recipe"), path.resolve().parent
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise InputError(f"{where}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})",
                             hint="fix the YAML syntax") from exc
        lines = _lines(text)
        if not isinstance(data, dict):
            raise InputError(f"{where}: a recipe is a mapping with model, passes, ... (received "
                             f"{'an empty file' if data is None else type(data).__name__})",
                             hint="see models/digits_cnn/pipeline.yaml")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        hint = "see the recipe keys in onnxpipe/pipeline/recipe.py"
        if isinstance(cause, _PassError):
            loc = ("passes", cause.index) + ((cause.name,) if cause.name else ())
            msg, hint = str(cause), None
        else:
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = f"unknown key {loc[-1]!r}"
        line = _line_of(lines, loc)
        dotted = ".".join(str(p) for p in loc if p != "validate_") or "(top)"
        raise InputError(f"{where}{f':{line}' if line else ''}: {dotted}: {msg}", hint=hint) from exc
    recipe.base_dir = base
    _check_files(recipe, where, lines)
    if recipe.target is not None:
        from onnxpipe.runtimes.providers import Device

        try:
            Device.parse(recipe.target.device)
        except InputError as exc:
            line = _line_of(lines, ("target", "device"))
            raise InputError(f"{where}{f':{line}' if line else ''}: target.device: {exc.message}", hint=exc.hint) from None
    if recipe.runtime:
        from onnxpipe.runtimes.tuned import load_tuned

        try:
            tuned = load_tuned(resolve_path(recipe, recipe.runtime))
        except InputError as exc:
            line = _line_of(lines, ("runtime",))
            raise InputError(f"{where}{f':{line}' if line else ''}: runtime: {exc.message}", hint=exc.hint) from None
        if "providers" not in recipe.validate_.model_fields_set:
            recipe.validate_.providers = [str(d) for d in tuned.devices()]
    return recipe


def resolve_path(recipe: Recipe, text: str) -> str:
    """A relative path in the recipe: from the recipe's folder if it exists there, else as given."""
    path_part, sep, rest = text.partition(".py:")
    p = Path(path_part + (".py" if sep else ""))
    if recipe.base_dir is not None and not p.is_absolute() and not p.exists() and (recipe.base_dir / p).exists():
        p = recipe.base_dir / p
    return f"{p}:{rest}" if sep else str(p)


def _check_files(recipe: Recipe, where: str, lines: dict[tuple, int]) -> None:
    checks = [(("model", "source"), recipe.model.source),
              (("data", "calibration"), recipe.data.calibration),
              (("data", "evaluation"), recipe.data.evaluation)]
    for loc, value in checks:
        if not value:
            continue
        resolved = resolve_path(recipe, value)
        file_part = resolved.partition(".py:")[0] + ".py" if ".py:" in resolved else resolved
        if not Path(file_part).exists():
            line = _line_of(lines, loc)
            raise InputError(f"{where}{f':{line}' if line else ''}: {'.'.join(loc)}: no such file {file_part}",
                             hint="paths are relative to the recipe's folder or the current directory")
