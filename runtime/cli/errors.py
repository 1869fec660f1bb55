"""How every ``deleaker-trt`` command ends on a bad value, an error or a signal (``run``, ``verify``, ``build``,
``plugin``).

A bad value of an option is refused by the library's checks (`LibraryChecked` hands them what click could not
parse), with the option's allowed range. A `DeLeakerError` becomes one ``error:`` line on stderr and exit code 1;
Ctrl-C (SIGINT) and SIGTERM end the command with one ``error:`` line and exit code 130 and 143 (128 + the signal's
number, as shells report them) instead of click's ``Aborted!`` and exit 1. A light module: the commands import it
before torch.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Callable, Iterator

import click

from deleaker.errors import DeLeakerError

#: Exit code of a typed error (bad input, incompatible engine, verification beyond tolerance).
EXIT_ERROR = 1
#: Exit codes after Ctrl-C and SIGTERM (128 + the signal's number), as shells report them.
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class LibraryChecked(click.ParamType):
    """``parse(text)`` (``int`` or ``float``), or the text itself when it does not parse: the library's check then
    refuses it with the option's allowed range, one ``error:`` line and exit 1, as any out-of-range number (click's
    own types would stop with a usage error, exit 2). Ranges are the library's too, for the same reason."""

    def __init__(self, parse: Callable[[str], Any]) -> None:
        self.parse = parse
        self.name = {int: "integer", float: "float"}.get(parse, parse.__name__)  # help shows INTEGER, FLOAT

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if not isinstance(value, str):
            return value  # a default
        try:
            return self.parse(value)
        except ValueError:
            return value


#: Options whose values the library checks (`LibraryChecked`).
CHECKED_INT = LibraryChecked(int)
CHECKED_FLOAT = LibraryChecked(float)


class DeLeakerCliError(click.ClickException):
    """A library error shown as ``error: <message>`` on stderr, exit code 1."""

    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class _Terminated(BaseException):
    """SIGTERM, raised where the main thread is, so that it unwinds as Ctrl-C does (temporary files removed)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def _ignore_signals(*signums: int) -> None:
    for signum in signums:
        try:
            signal.signal(signum, signal.SIG_IGN)
        except ValueError:  # not the main thread
            return


@contextlib.contextmanager
def reported_errors(unfinished: str) -> Iterator[None]:
    """Library errors become one ``error:`` line (exit 1); Ctrl-C and SIGTERM end the command with exit 130 and
    143, saying that nothing was written for ``unfinished`` (e.g. "the image in progress"). Outputs are written
    atomically (temporary file, then rename; removed while unwinding), so an interrupted command leaves no
    partial file."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (the CLI called from a test runner's worker): keep the default
        previous = None
    try:
        yield
    except DeLeakerError as exc:
        raise DeLeakerCliError(str(exc)) from None
    except (KeyboardInterrupt, _Terminated) as exc:
        # The command is over: a second Ctrl-C could only interrupt the interpreter's own clean-up (a traceback
        # from an atexit handler of torch's), so the process ignores further signals on its way out.
        _ignore_signals(signal.SIGINT, signal.SIGTERM)
        previous = None  # so `finally` leaves SIGTERM ignored instead of restoring its handler
        interrupted = isinstance(exc, KeyboardInterrupt)
        what, code = ("interrupted", EXIT_INTERRUPTED) if interrupted else ("terminated", EXIT_TERMINATED)
        click.echo(f"error: {what}; no output was written for {unfinished}", err=True)
        raise click.exceptions.Exit(code) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
