"""``tuned.json``: the session setup ``onnxpipe tune`` chose per device, and the devices it turns into.

A tuned device is a :class:`Device` (its validated provider options: threads, optimization,
arena, cuDNN search, IO binding, CUDA graphs, TensorRT precision...) plus the session settings
ONNX Runtime takes outside the provider options (:class:`SessionTweaks`: execution mode, memory
pattern, thread spinning). Every command that opens a :class:`DeviceSession` on it gets both,
because :meth:`TunedDevice.session_options` is what the session asks for.

Example:
    >>> d = TunedDevice.from_spec("cpu[threads=2]", {"spinning": False})
    >>> d.describe()
    'cpu:0[threads=2] spinning=off'
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from onnxpipe.errors import InputError
from onnxpipe.runtimes.providers import Device

if TYPE_CHECKING:
    import onnxruntime as ort

FORMAT = "onnxpipe.tuned/1"


class SessionTweaks(BaseModel):
    """Session settings beside the provider options; the defaults are ONNX Runtime's.

    Example:
        >>> SessionTweaks(spinning=False).changed()
        {'spinning': False}
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    execution_mode: Literal["sequential", "parallel"] = "sequential"
    """Parallel runs independent branches on the inter-op pool (``inter_threads``)."""
    mem_pattern: bool = True
    """Plan memory from the first run's allocations (pays off when shapes repeat)."""
    spinning: bool = True
    """Idle pool threads spin instead of sleeping (fast wake-up, but burns the cores others need)."""

    def changed(self) -> dict[str, Any]:
        """The settings that differ from ONNX Runtime's defaults."""
        return self.model_dump(exclude_defaults=True)

    def describe(self) -> str:
        return " ".join(f"{k}={'on' if v is True else 'off' if v is False else v}" for k, v in self.changed().items())


@dataclass(frozen=True, repr=False)
class TunedDevice(Device):
    """A :class:`Device` whose sessions also get :class:`SessionTweaks`.

    ``str()`` stays the device spec every command understands; :meth:`describe` adds the tweaks.

    Example:
        >>> TunedDevice.from_spec("cpu", {"execution_mode": "parallel"}).session.execution_mode
        'parallel'
    """

    session: SessionTweaks = field(default_factory=SessionTweaks, hash=False)

    @classmethod
    def from_spec(cls, spec: str | Device, session: SessionTweaks | dict[str, Any] | None = None,
                  **options: Any) -> TunedDevice:
        """A tuned device from a device spec (plus option overrides) and session settings."""
        base = Device.parse(spec, **options)
        tweaks = session if isinstance(session, SessionTweaks) else _tweaks(session or {}, str(spec))
        return cls(base.kind, base.index, base.options, tweaks)

    def with_changes(self, options: dict[str, Any] | None = None, session: dict[str, Any] | None = None) -> TunedDevice:
        """This device with some options and session settings replaced (validated again)."""
        opts = {**self.options.model_dump(exclude_defaults=True), **(options or {})}
        opts = {k: v for k, v in opts.items() if v is not None}
        base = Device._build(self.kind, self.index, opts, str(self))
        tweaks = _tweaks({**self.session.changed(), **(session or {})}, str(self))
        return TunedDevice(base.kind, base.index, base.options, tweaks)

    def describe(self) -> str:
        extra = self.session.describe()
        return f"{self}{' ' + extra if extra else ''}"

    def __repr__(self) -> str:
        return f"TunedDevice({self.describe()!r})"

    def session_options(self, *, threads: int | None = None) -> ort.SessionOptions:
        """The device's session options with the tweaks applied."""
        from onnxpipe._deps import require

        ort_mod = require("onnxruntime")
        opts = super().session_options(threads=threads)
        t = self.session
        opts.execution_mode = (ort_mod.ExecutionMode.ORT_PARALLEL if t.execution_mode == "parallel"
                               else ort_mod.ExecutionMode.ORT_SEQUENTIAL)
        opts.enable_mem_pattern = t.mem_pattern
        spin = "1" if t.spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        return opts


def _tweaks(values: dict[str, Any], where: str) -> SessionTweaks:
    try:
        return SessionTweaks.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise InputError(f"{where}: session setting {key!r}: {err['msg']}",
                         hint=f"session settings: {', '.join(SessionTweaks.model_fields)}") from None


# the file ---------------------------------------------------------------------------------------

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
    """The chosen device spec, as ``--devices`` takes it."""
    session: SessionTweaks = Field(default_factory=SessionTweaks)
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

    def tuned_device(self) -> TunedDevice:
        return TunedDevice.from_spec(self.device, self.session)


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

    def devices(self) -> list[TunedDevice]:
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
    from onnxpipe.report import write_json

    return write_json(tuned.model_dump(mode="json"), path)


def load_tuned(path: str | os.PathLike) -> TunedFile:
    """Read and validate ``tuned.json``; every device in it must still parse.

    Example:
        >>> load_tuned("tuned.json").devices()  # doctest: +SKIP
        [TunedDevice('cpu:0[threads=2] spinning=off')]
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no such tuned config: {p}", hint="write one with `onnxpipe tune MODEL -o tuned.json`")
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{p}: not a JSON file ({exc})", hint="give the tuned.json written by `onnxpipe tune`") from None
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
