"""The errors a user should see: one line naming the problem and the fix."""

from __future__ import annotations


class OnnxpipeError(Exception):
    """Base of every error caused by the user's input or environment.

    The CLI prints ``error: <message>`` and exits with code 2 for these, without a traceback
    (unless ``--debug``). Anything that is not an ``OnnxpipeError`` is a bug in onnxpipe and
    keeps its traceback.

    Example:
        >>> raise OnnxpipeError("no such file: m.onnx", hint="check the path")
        Traceback (most recent call last):
        onnxpipe.core.errors.OnnxpipeError: no such file: m.onnx (check the path)
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class InputError(OnnxpipeError):
    """A file, option or value given by the user is missing, malformed or inconsistent."""


class RunFailedError(InputError):
    """ONNX Runtime loaded the model but could not run it on the inputs it was given.

    Most often the values: an index outside its table, a mask that is not 0/1, a size that
    does not fit; the message names what ONNX Runtime reported.
    """


class MissingDependencyError(OnnxpipeError):
    """An optional framework (torch, tensorflow, tf2onnx, ...) is needed but not installed."""


class ConversionError(OnnxpipeError):
    """Every strategy for turning a framework model into ONNX failed."""


class CheckFailedError(OnnxpipeError):
    """The ONNX model's outputs disagree with the reference beyond tolerance.

    Exits with code 1: the input was fine, the result is not.
    """

    exit_code = 1
