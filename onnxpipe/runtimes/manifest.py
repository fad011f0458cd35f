"""Inference outputs on disk: ``shard-NNNNN.npz`` files and a ``manifest.json``, both written atomically.

Shard ``k`` holds samples ``[k * shard_size, (k + 1) * shard_size)`` in input order: every
batched output concatenated along axis 0, ``_index`` (the samples' positions in the input; a
sample that failed is missing from it and listed in the manifest), and per micro-batch
``<output>@<first sample>`` for outputs without a sample axis. The manifest is rewritten (to a
temporary file, then renamed) after every shard, so an interrupted job leaves a consistent
record, and ``resume`` skips every shard it lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.core.errors import InputError
from onnxpipe.core.files import file_digest

FORMAT = "onnxpipe-infer/1"
INDEX = "_index"


@dataclass
class Shard:
    """One shard's samples: positions, outputs (batched), per-batch outputs and failures."""

    index: int
    start: int
    count: int
    indices: np.ndarray
    outputs: dict[str, np.ndarray]
    per_batch: dict[str, np.ndarray] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)


def data_digest(data: Any) -> str | None:
    """sha256 of what a job reads: a file, every .npy/.npz of a folder (names and contents), or the
    Python file of ``file.py:function`` (its code, not what it returns); None for in-memory data.

    Example:
        >>> len(data_digest("inputs.npz"))  # doctest: +SKIP
        64
    """
    if not isinstance(data, (str, os.PathLike)):
        return None
    text = str(data)
    path = Path(text.rpartition(":")[0] if ".py:" in text else text)
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz")):
            h.update(f.name.encode() + b"\0" + file_digest(f).encode())
        return h.hexdigest()
    return None


def _atomic_bytes(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ShardWriter:
    """Writes shards in order and keeps the manifest current; on ``resume`` reads what is done.

    Args:
        outdir: the job's folder.
        meta: what identifies the job (model digest, shard size, inputs); a resumed job must match.
        resume: continue the job in ``outdir`` instead of refusing to touch it.

    Example:
        >>> w = ShardWriter(tmp / "out", {"model_sha256": "...", "shard_size": 1024})  # doctest: +SKIP
    """

    def __init__(self, outdir: str | os.PathLike, meta: Mapping[str, Any], *, resume: bool = False) -> None:
        self.outdir = Path(outdir)
        self.path = self.outdir / "manifest.json"
        self.meta = dict(meta)
        self.shards: dict[int, dict[str, Any]] = {}
        self.failed: dict[int, str] = {}
        if self.path.exists():
            if not resume:
                raise InputError(f"{self.outdir} already holds an inference job (manifest.json)",
                                 hint="add --resume to continue it, or choose another output folder")
            self._load()
        elif self.outdir.exists() and any(self.outdir.glob("shard-*.npz")) and not resume:
            raise InputError(f"{self.outdir} holds shards but no manifest", hint="choose an empty output folder")
        # the folder is created with the first shard: a job that fails on its inputs leaves nothing behind

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise InputError(f"cannot read {self.path} ({str(exc)[:120]})", hint="remove the folder and start again") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise InputError(f"{self.path} is not an onnxpipe inference manifest", hint="choose another output folder")
        for key in ("model_sha256", "shard_size", "inputs"):
            if doc.get(key) != self.meta.get(key):
                raise InputError(f"cannot resume {self.outdir}: it was written with another {key.replace('_', ' ')} "
                                 f"({doc.get(key)!r}, now {self.meta.get(key)!r})",
                                 hint="resume with the same model, inputs and --shard-size, or use a new folder")
        if doc.get("data_sha256") != self.meta.get("data_sha256") and "data_sha256" in doc:
            raise InputError(f"cannot resume {self.outdir}: its outputs were computed from other data "
                             f"({doc.get('source')}, sha256 {str(doc.get('data_sha256'))[:12]}...; now "
                             f"{self.meta.get('source')}, sha256 {str(self.meta.get('data_sha256'))[:12]}...)",
                             hint="resume with the data the job started with, or use a new folder")
        for s in doc.get("shards", []):
            f = self.outdir / s["file"]
            if f.exists() and f.stat().st_size == s["bytes"]:  # a shard lost or cut short is redone
                self.shards[int(s["index"])] = s
                self.failed.update({int(k): v for k, v in s.get("failed", {}).items()})

    @property
    def done(self) -> set[int]:
        """Indices of the shards already written (skipped when resuming)."""
        return set(self.shards)

    def write(self, shard: Shard) -> Path:
        """Write one shard atomically, then the manifest."""
        name = f"shard-{shard.index:05d}.npz"
        self.outdir.mkdir(parents=True, exist_ok=True)
        path = self.outdir / name
        arrays = {INDEX: shard.indices, **shard.outputs, **shard.per_batch}
        _atomic_bytes(path, lambda f: np.savez(f, **arrays))
        self.shards[shard.index] = {
            "index": shard.index, "file": name, "start": shard.start, "count": shard.count,
            "rows": len(shard.indices), "bytes": path.stat().st_size,
            "failed": {str(k): v for k, v in sorted(shard.failed.items())}}
        self.failed.update(shard.failed)
        self.save(complete=False)
        return path

    def save(self, *, complete: bool, extra: Mapping[str, Any] | None = None) -> None:
        """Rewrite the manifest (atomically)."""
        doc = {"format": FORMAT, **self.meta, "complete": complete,
               "samples": sum(s["count"] for s in self.shards.values()),
               "failed": [{"index": i, "error": e} for i, e in sorted(self.failed.items())],
               "shards": [self.shards[k] for k in sorted(self.shards)], **(extra or {})}
        text = json.dumps(doc, indent=2).encode()
        self.outdir.mkdir(parents=True, exist_ok=True)
        _atomic_bytes(self.path, lambda f: f.write(text))


def read_manifest(outdir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a job folder.

    Example:
        >>> read_manifest("out")["complete"]  # doctest: +SKIP
        True
    """
    path = Path(outdir) / "manifest.json"
    if not path.is_file():
        raise InputError(f"{outdir} has no manifest.json", hint="give the output folder of `onnxpipe infer`")
    return json.loads(path.read_text())


def iter_shards(outdir: str | os.PathLike) -> Iterator[dict[str, np.ndarray]]:
    """The arrays of every shard, in input order.

    Example:
        >>> for arrays in iter_shards("out"):  # doctest: +SKIP
        ...     print(arrays["_index"][0], arrays["y"].shape)
    """
    doc = read_manifest(outdir)
    for s in doc["shards"]:
        with np.load(Path(outdir) / s["file"], allow_pickle=False) as z:
            yield {k: z[k] for k in z.files}


def load_outputs(outdir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All batched outputs of a job, concatenated in input order, with ``_index``.

    Example:
        >>> load_outputs("out")["y"].shape  # doctest: +SKIP
        (10000, 10)
    """
    parts: dict[str, list[np.ndarray]] = {}
    for arrays in iter_shards(outdir):
        for k, v in arrays.items():
            if "@" not in k:
                parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}
