"""The ``onnxpipe`` command line: user errors print one line and exit 2, bugs keep their traceback.

One module per command group; each has ``register(app)`` and is listed in ``_COMMANDS`` below.
Command modules import heavy libraries only inside the commands.

Floor: the top one; it may import every other floor and nothing imports it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated, Optional

import typer

from onnxpipe._version import __version__
from onnxpipe.core.errors import OnnxpipeError

app = typer.Typer(
    help="From a trained PyTorch or TensorFlow model to a fast, validated ONNX deployment.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts show device specs like cpu[threads=2] literally
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"onnxpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    _state["debug"] = debug


# explicit, in the order `onnxpipe --help` lists them
_COMMANDS = ("convert", "inspect", "optimize", "runtime", "tune", "auto", "serve", "split", "generate")

for _name in _COMMANDS:
    importlib.import_module(f"onnxpipe.cli.{_name}").register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``onnxpipe`` command."""
    try:  # typer >= 0.20 ships its own copy of click; its exceptions are those
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    args = sys.argv[1:] if argv is None else argv
    _state["debug"] = "--debug" in args
    try:
        try:
            app(args=args, prog_name="onnxpipe", standalone_mode=False)
        except click_errors.NoArgsIsHelpError as err:  # bare `onnxpipe` or a group: the help, as click shows it
            print(err.ctx.get_help() if err.ctx else "", file=sys.stderr)
            sys.exit(2)
        except click_errors.UsageError as err:  # one line, as every other user error
            command = f"onnxpipe {err.ctx.info_name} --help" if err.ctx and err.ctx.parent else "onnxpipe --help"
            if _state["debug"]:
                raise
            print(f"error: {_one_line(err.format_message())} (see `{command}`)", file=sys.stderr)
            sys.exit(2)
        except click_errors.ClickException as err:
            if _state["debug"]:
                raise
            print(f"error: {_one_line(err.format_message())}", file=sys.stderr)
            sys.exit(2)
        except typer.Exit as err:
            sys.exit(err.exit_code)
        except typer.Abort:
            raise KeyboardInterrupt from None
    except OnnxpipeError as err:
        if _state["debug"]:
            raise
        print(f"error: {_one_line(str(err))}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())
