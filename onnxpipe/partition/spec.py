"""``pipeline.json``: the stages of a split model, what each hands to the next, and running them in sequence.

Format ``onnxpipe-pipeline/1``::

    {"format": "onnxpipe-pipeline/1", "source": ..., "balance": "flops", "batch": 1,
     "inputs": [{"name", "dtype", "shape"}], "outputs": [...same...],
     "parts": [{"index", "file", "sha256", "inputs", "outputs", "sends", "nodes",
                "flops", "weight_bytes", "peak_activation_bytes", "sent_bytes"}],
     "cuts": [{"after_part", "tensors": [{"name", "bytes"}], "bytes"}],
     "check": {...}}

``sends`` of part ``k`` are the tensors carried past it: its own outputs and earlier tensors
(graph inputs included) that a later part or the caller still needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.core.errors import InputError

FORMAT = "onnxpipe-pipeline/1"
FILE = "pipeline.json"


@dataclass
class PartSpec:
    """One stage as ``pipeline.json`` describes it."""

    index: int
    file: str
    inputs: list[str]
    outputs: list[str]
    sends: list[str]
    sha256: str = ""
    nodes: int = 0
    flops: int = 0
    weight_bytes: int = 0
    peak_activation_bytes: int = 0
    sent_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class PipelineSpec:
    """A split model on disk: its folder, interface, parts and cuts.

    Example:
        >>> spec = PipelineSpec.load("resnet_split")  # doctest: +SKIP
        >>> [p.file for p in spec.parts]  # doctest: +SKIP
        ['part0.onnx', 'part1.onnx']
    """

    folder: Path
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    parts: list[PartSpec]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.folder / FILE

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]

    def part_path(self, k: int) -> Path:
        return self.folder / self.parts[k].file

    @staticmethod
    def is_pipeline(path: str | os.PathLike) -> bool:
        """Whether ``path`` is a folder holding a ``pipeline.json``.

        Example:
            >>> PipelineSpec.is_pipeline("model.onnx")
            False
        """
        return Path(path).is_dir() and (Path(path) / FILE).is_file()

    @classmethod
    def load(cls, folder: str | os.PathLike) -> PipelineSpec:
        """Read ``folder/pipeline.json``, checking that every part file is there.

        Raises:
            InputError: no pipeline.json, another format, or a missing part.
        """
        folder = Path(folder)
        path = folder / FILE
        if not path.is_file():
            raise InputError(f"{folder} holds no {FILE}", hint="give the folder written by `onnxpipe split`")
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read {path} ({exc})", hint="split the model again") from exc
        if doc.get("format") != FORMAT:
            raise InputError(f"{path} is not an onnxpipe pipeline (format {doc.get('format')!r}, expected {FORMAT})",
                             hint="split the model again with `onnxpipe split`")
        parts = [PartSpec(**p) for p in doc["parts"]]
        for p in parts:
            if not (folder / p.file).is_file():
                raise InputError(f"{folder / p.file} is missing", hint="split the model again into this folder")
        rest = {k: v for k, v in doc.items() if k not in ("format", "inputs", "outputs", "parts")}
        return cls(folder, doc["inputs"], doc["outputs"], parts, rest)

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **{k: v for k, v in self.extra.items() if k not in ("cuts", "check")},
                "inputs": self.inputs, "outputs": self.outputs, "parts": [p.as_dict() for p in self.parts],
                **{k: self.extra[k] for k in ("cuts", "check") if k in self.extra}}

    def write(self, folder: Path) -> None:
        """Write the JSON document into ``folder`` (the caller makes it atomic)."""
        (folder / FILE).write_text(json.dumps(self.as_dict(), indent=2))


def carried(parts: list[PartSpec], outputs: list[str], k: int, inputs: list[str]) -> list[str]:
    """Tensors to carry past stage ``k``: read by a later stage or returned by the model.

    Example:
        >>> p = [PartSpec(0, "a", ["x"], ["h"], []), PartSpec(1, "b", ["h", "s"], ["y"], [])]
        >>> carried(p, ["y"], 0, ["x", "s"])
        ['s', 'h']
    """
    later = {t for p in parts[k + 1:] for t in p.inputs} | set(outputs)
    have = list(dict.fromkeys([*inputs, *(t for p in parts[:k + 1] for t in p.outputs)]))
    return [t for t in have if t in later]


def run_sequence(sessions: list[Any], parts: list[PartSpec], outputs: list[str],
                 feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the stages one after another on ``feeds``; the whole model's outputs.

    Args:
        sessions: one object with ``run(feeds) -> dict`` per part (a :class:`Session`).
        parts: the parts' specs (their inputs).
        outputs: the whole model's output names.
        feeds: the whole model's inputs.

    Example:
        >>> run_sequence([Session(p) for p in paths], spec.parts, spec.output_names, {"x": x})  # doctest: +SKIP
    """
    values = dict(feeds)
    for k, (s, p) in enumerate(zip(sessions, parts)):
        values.update(s.run({t: values[t] for t in p.inputs}))
        keep = set(carried(parts, outputs, k, list(feeds)))
        values = {t: v for t, v in values.items() if t in keep}
    return {t: values[t] for t in outputs}
