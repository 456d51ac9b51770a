"""What every `blockmerge` command shares: one-line errors with exit status 2, NAME=VALUE options, output that
suits a terminal or a log."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console

from . import interrupts
from .errors import BlockmergeError

LOG_WIDTH = 160  # tables written to a file or pipe with no $COLUMNS


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input: one line on stderr and exit status 2; an interrupt: exit status 130."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        interrupts.unwind_on_interrupt()
        try:
            return fn(*args, **kwargs)
        except BlockmergeError as err:
            click.echo(f"blockmerge: error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            interrupts.say()
            sys.exit(130)
    return wrapper


def parse_pairs(items: tuple[str, ...], option: str) -> dict[str, str]:
    """``NAME=VALUE`` strings of a repeated option as a mapping."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BlockmergeError(f"{option} expects NAME=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def console(*, stderr: bool = False) -> Console:
    """A rich console as wide as the terminal, or $COLUMNS / LOG_WIDTH columns when writing to a file or pipe."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else LOG_WIDTH
    return Console(stderr=stderr, width=width)


def show_progress(quiet: bool = False) -> bool:
    """Whether to draw progress bars: not with --quiet, and not into a log (bars redraw with carriage returns)."""
    return not quiet and sys.stderr.isatty()
