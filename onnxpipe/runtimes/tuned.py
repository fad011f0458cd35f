"""``tuned.json``: the session setup ``onnxpipe tune`` chose per device, as device specs every command takes.

Every setting tuning chooses (threads, execution mode, optimization level, arena, memory
pattern, spinning; cuDNN search, IO binding, CUDA graphs; TensorRT precision and builder level)
is a device option, so an entry's ``device`` string carries the whole setup: ``bench`` and
``serve`` sessions, ``infer``'s worker processes and a recipe's validation all rebuild the same
session from it.

Example:
    >>> TunedEntry(device="cpu:0[threads=2,spinning=false]", batch_size=8).tuned_device().options.spinning
    False
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from onnxpipe.core.errors import InputError
from onnxpipe.runtimes.providers import Device

FORMAT = "onnxpipe.tuned/1"
LEGACY_SESSION = ("execution_mode", "mem_pattern", "spinning")  # the first files kept these apart from the device


class Measured(BaseModel):
    """Median latency of one run at ``batch`` and the samples per second it gives."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: float
    samples_per_s: float
    batch: int


class CurvePoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch: int
    latency_ms: float
    samples_per_s: float


class TunedEntry(BaseModel):
    """What tuning chose for one device and what it measured, the default beside it.

    Example:
        >>> TunedEntry(device="cpu:0[threads=1]", batch_size=8).tuned_device().options.threads
        1
    """

    model_config = ConfigDict(extra="forbid")

    device: str
    """The chosen device spec, as ``--devices`` takes it (every tuned setting is one of its options)."""
    batch_size: int = Field(1, ge=1)
    default_device: str | None = None
    tuned: Measured | None = None
    default: Measured | None = None
    speedup: float = 1.0
    """Default latency / tuned latency, measured side by side at the end."""
    significant: bool = False
    """Whether the speedup exceeds the noise of those measurements."""
    noise: float | None = None
    max_batch: int | None = None
    """Largest batch estimated to fit the device's memory (None: fixed batch or unknown)."""
    knee_batch: int | None = None
    """Smallest batch reaching 90% of the best measured throughput."""
    curve: list[CurvePoint] = Field(default_factory=list)
    candidates: int = 0
    rejected: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _fold_session(cls, data: Any) -> Any:
        """Files written before these settings were device options kept them under ``session``."""
        if not isinstance(data, dict) or "session" not in data:
            return data
        rest = dict(data)
        session = rest.pop("session") or {}
        if not isinstance(session, dict) or set(session) - set(LEGACY_SESSION):
            raise ValueError(f"session settings must be a mapping of {', '.join(LEGACY_SESSION)}")
        if session and isinstance(rest.get("device"), str):
            rest["device"] = str(Device.parse(rest["device"], **session))
        return rest

    def tuned_device(self) -> Device:
        """The device this entry describes, its tuned options validated."""
        return Device.parse(self.device)


class TunedFile(BaseModel):
    """The whole ``tuned.json``.

    Example:
        >>> f = TunedFile(model="m.onnx", entries=[TunedEntry(device="cpu:0", batch_size=4)])
        >>> [d.label for d in f.devices()], f.batch_size()
        (['cpu:0'], 4)
    """

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    model: str
    objective: Literal["latency", "throughput"] = "latency"
    budget_s: float | None = None
    elapsed_s: float | None = None
    machine: dict[str, Any] = Field(default_factory=dict)
    entries: list[TunedEntry] = Field(default_factory=list)

    def devices(self) -> list[Device]:
        """The tuned devices, in the order they were tuned."""
        return [e.tuned_device() for e in self.entries]

    def entry(self, device: str | Device) -> TunedEntry:
        """The entry of ``device`` (matched by ``kind:index``)."""
        label = Device.parse(device).label
        for e in self.entries:
            if Device.parse(e.device).label == label:
                return e
        raise InputError(f"the tuned config has no entry for {label}",
                         hint=f"it has {', '.join(Device.parse(e.device).label for e in self.entries)}; "
                              f"run `onnxpipe tune --devices {label}`")

    def batch_size(self) -> int:
        """One batch size for commands that take one: the smallest of the entries' (safe for all)."""
        return min((e.batch_size for e in self.entries), default=1)


def save_tuned(tuned: TunedFile, path: str | os.PathLike) -> Path:
    """Write ``tuned.json`` atomically.

    Example:
        >>> save_tuned(TunedFile(model="m.onnx"), "tuned.json")  # doctest: +SKIP
    """
    from onnxpipe.core.files import write_json

    return write_json(tuned.model_dump(mode="json"), path)


def load_tuned(path: str | os.PathLike) -> TunedFile:
    """Read and validate ``tuned.json``; every device in it must still parse.

    Example:
        >>> load_tuned("tuned.json").devices()  # doctest: +SKIP
        [Device('cpu:0[threads=2,spinning=false]')]
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no such tuned config: {p}", hint="write one with `onnxpipe tune MODEL -o tuned.json`")
    from onnxpipe.core.userfiles import read_text

    text = read_text(p, what="tuned config")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{p}: not a JSON file ({str(exc)[:120]})", hint="give the tuned.json written by `onnxpipe tune`") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"{p}: not a tuned config (expected format {FORMAT!r}, received "
                         f"{doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r})",
                         hint="give the tuned.json written by `onnxpipe tune`")
    try:
        tuned = TunedFile.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InputError(f"{p}: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}",
                         hint="rewrite it with `onnxpipe tune`") from None
    if not tuned.entries:
        raise InputError(f"{p}: the tuned config has no devices", hint="rewrite it with `onnxpipe tune`")
    for e in tuned.entries:
        e.tuned_device()  # a device spec this version cannot read fails here, named
    return tuned
