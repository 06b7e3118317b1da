"""Pieces shared by the ``qjax`` subcommands: the one-line error type and output folders."""

from __future__ import annotations

import argparse
from pathlib import Path


class CLIError(Exception):
    """A mistake in how the command was called; shown as one line, no traceback."""


def prepare_out(out: str | None) -> Path | None:
    """``--out DIR`` created (parents too); ``None`` when not given.

    Raises:
      CLIError: DIR is a file or cannot be created.
    """
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out {out}: cannot create directory ({e.strerror or e})") from None
    return path


def seconds_arg(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def seed_arg(text: str) -> int:
    """argparse type of ``--seed``: a non-negative integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (for one-line errors)."""
    return (str(e).splitlines() or [""])[0]
