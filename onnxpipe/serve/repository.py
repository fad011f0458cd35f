"""The models a server serves: one ``.onnx`` file, or every model in a directory, with what batching they allow.

A directory may hold ``NAME.onnx`` files, ``NAME/model.onnx`` folders, or a Triton repository
(``NAME/<version>/model.onnx``; the highest version is served), mixed freely. A folder written by
``onnxpipe split`` (it holds ``pipeline.json``) is one model, served stage by stage; given as the
source itself it is the only model, named after the folder.

Example:
    >>> [m.name for m in discover("models/")]  # doctest: +SKIP
    ['digits', 'encoder']
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxpipe.core.errors import InputError
from onnxpipe.core.graph import subgraphs
from onnxpipe.core.modelio import load_model
from onnxpipe.core.tensors import TensorInfo, graph_inputs, value_infos
from onnxpipe.partition.spec import PipelineSpec

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# ops whose result for one sample depends on the others in its batch: dynamic activation
# quantization takes one scale over the whole tensor, so a request batched with others would get
# other numbers than alone
CROSS_SAMPLE_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention"})


def check_name(name: str) -> str:
    """Return ``name`` if it can be a model name in a URL path, else raise.

    Example:
        >>> check_name("digits-v2")
        'digits-v2'
    """
    if not _NAME.match(name):
        raise InputError(f"model name {name!r} is not allowed in a URL path",
                         hint="use letters, digits, '_', '-' and '.', e.g. --name digits")
    return name


def _dynamic(d: object) -> bool:
    return not (isinstance(d, int) and d > 0)


@dataclass
class ModelEntry:
    """One served model: its name, version, file and tensors.

    ``batch_axis`` is True when every input and output has a leading axis the model leaves free:
    only then can requests be stacked along it and split back. ``cross_sample`` names ops that
    make one sample's result depend on the rest of its batch (dynamic int8 quantization): such a
    model still takes batches from a client, but the server does not stack requests for it.

    Example:
        >>> entry = ModelEntry.load("m.onnx", "m")  # doctest: +SKIP
        >>> entry.batch_axis  # doctest: +SKIP
        True
    """

    name: str
    version: str
    path: Path
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    batch_axis: bool
    cross_sample: tuple[str, ...] = ()
    pipeline: PipelineSpec | None = None  # a split model: ``path`` is its folder

    @property
    def batchable(self) -> bool:
        """Whether requests may be stacked: a free batch axis and no op that mixes samples."""
        return self.batch_axis and not self.cross_sample

    @classmethod
    def load(cls, path: str | os.PathLike, name: str, version: str = "1") -> ModelEntry:
        check_name(name)
        path = Path(path)
        model = load_model(path, load_external_data=False)
        return cls.from_proto(model, name, version, path)

    @classmethod
    def load_pipeline(cls, folder: str | os.PathLike, name: str, version: str = "1") -> ModelEntry:
        """A split model: the whole model's inputs and outputs from ``pipeline.json``, ops from every part."""
        check_name(name)
        spec = PipelineSpec.load(folder)

        def infos(entries: list[dict]) -> list[TensorInfo]:
            return [TensorInfo(e["name"], e["shape"], np.dtype(e["dtype"])) for e in entries]

        inputs, outputs = infos(spec.inputs), infos(spec.outputs)
        if not inputs:
            raise InputError(f"model {name!r} ({folder}) has no inputs", hint="serve a model that takes inputs")
        for t in inputs + outputs:
            if t.dtype == object:
                raise InputError(f"model {name!r}: {t.name!r} is not a tensor",
                                 hint="only tensor inputs and outputs can be served over the protocol")
        cross = {op for k in range(len(spec.parts))
                 for op in _cross_sample(load_model(spec.part_path(k), load_external_data=False).graph)}
        return cls(name, version, Path(folder), inputs, outputs, _batch_axis(inputs, outputs), tuple(sorted(cross)), spec)

    @classmethod
    def from_proto(cls, model: onnx.ModelProto, name: str, version: str, path: Path) -> ModelEntry:
        inputs = graph_inputs(model)
        outputs = value_infos(model.graph.output)
        if not inputs:
            raise InputError(f"model {name!r} ({path}) has no inputs", hint="serve a model that takes inputs")
        for t in inputs + outputs:
            if t.dtype == object and t.extra.get("kind"):
                raise InputError(f"model {name!r}: {t.name!r} is a {t.extra['kind']}, not a tensor",
                                 hint="only tensor inputs and outputs can be served over the protocol")
        return cls(name, version, path, inputs, outputs, _batch_axis(inputs, outputs), _cross_sample(model.graph))

    @classmethod
    def open(cls, path: str | os.PathLike, name: str, version: str = "1") -> ModelEntry:
        """A model file, or a split model's folder (``pipeline.json``)."""
        path = Path(path)
        if path.is_dir():
            return cls.load_pipeline(path, name, version)
        return cls.load(path, name, version)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]


def _batch_axis(inputs: list[TensorInfo], outputs: list[TensorInfo]) -> bool:
    # an output of unknown shape is assumed batch-first; the batcher checks it on every batch
    return all(t.shape is not None and t.shape and _dynamic(t.shape[0]) for t in inputs) and all(
        t.shape is None or (t.shape and _dynamic(t.shape[0])) for t in outputs)


def _cross_sample(graph: onnx.GraphProto) -> tuple[str, ...]:
    found: set[str] = set()
    for node in graph.node:
        if node.op_type in CROSS_SAMPLE_OPS:
            found.add(node.op_type)
        for sub in subgraphs(node):
            found.update(_cross_sample(sub))
    return tuple(sorted(found))


def _versioned(folder: Path) -> tuple[str, Path] | None:
    versions = [(int(v.name), v / "model.onnx") for v in folder.iterdir()
                if v.is_dir() and v.name.isdigit() and (v / "model.onnx").is_file()]
    if not versions:
        return None
    number, path = max(versions)
    return str(number), path


def scan(source: str | os.PathLike) -> dict[str, tuple[str, Path]]:
    """The models under a directory by name: ``{name: (version, path)}`` without opening any of them.

    Raises:
        InputError: two models with one name.
    """
    src = Path(source)
    found: dict[str, tuple[str, Path]] = {}
    if not src.is_dir():
        return found
    for child in sorted(src.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_file() and child.suffix == ".onnx":
            key, hit = child.stem, ("1", child)
        elif PipelineSpec.is_pipeline(child):
            key, hit = child.name, ("1", child)
        elif child.is_dir():
            key = child.name
            hit = _versioned(child) or (("1", child / "model.onnx") if (child / "model.onnx").is_file() else None)
            if hit is None:
                continue
        else:
            continue
        if key in found:
            raise InputError(f"two models are named {key!r} in {src}: {found[key][1]} and {hit[1]}",
                             hint="rename one of them")
        found[key] = hit
    return found


def discover(source: str | os.PathLike, name: str | None = None) -> list[ModelEntry]:
    """The models under ``source``: one ``.onnx`` file (named ``name`` or its stem) or a directory.

    Raises:
        InputError: no such path, no models found, two models with one name, ``name`` with a directory.
    """
    src = Path(source)
    if src.is_file():
        return [ModelEntry.load(src, name or src.stem)]
    if PipelineSpec.is_pipeline(src):
        return [ModelEntry.load_pipeline(src, name or src.resolve().name)]
    if not src.is_dir():
        raise InputError(f"no such file or directory: {src}", hint="give an .onnx file or a directory of models")
    if name is not None:
        raise InputError("--name applies to a single .onnx file, not a directory",
                         hint="name the models by their file or folder names")
    found = scan(src)
    if not found:
        raise InputError(f"no models in {src}", hint="put NAME.onnx files, NAME/model.onnx, NAME/1/model.onnx "
                                                     "(Triton layout) or NAME/pipeline.json (onnxpipe split) there")
    return [ModelEntry.open(path, key, version) for key, (version, path) in found.items()]
