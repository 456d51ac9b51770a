"""Ctrl-C on the command line: one line and exit status 130, a merge's partial output kept resumable.

While a command runs, the first Ctrl-C raises KeyboardInterrupt, so a merge unwinds and keeps its journal;
a second one, or one while imports run (an interrupted extension module can fail in other ways) or while
the process exits, leaves at once, without a traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn

MESSAGE = "blockmerge: interrupted (rerun with --resume to continue)"
_said = False


def say() -> None:
    """Print the interrupt line on stderr (once per process for the handlers below)."""
    global _said
    _said = True
    print(MESSAGE, file=sys.stderr, flush=True)


def leave() -> NoReturn:
    """Print the interrupt line unless it was printed, and exit with status 130 now."""
    if not _said:
        try:
            say()
        except (OSError, ValueError):
            pass  # stderr is gone: the exit status still tells
    os._exit(130)


def leave_on_interrupt() -> None:
    """From now on a Ctrl-C exits at once (imports, the interpreter's exit)."""
    signal.signal(signal.SIGINT, _leave)


def unwind_on_interrupt() -> None:
    """A command starts: if `leave_on_interrupt` was called (the program, not a test calling the CLI in-process),
    the next Ctrl-C unwinds it."""
    if signal.getsignal(signal.SIGINT) is _leave:
        signal.signal(signal.SIGINT, _unwind)


def _unwind(signum: int, frame: object) -> None:
    leave_on_interrupt()
    raise KeyboardInterrupt


def _leave(signum: int, frame: object) -> None:
    leave()
