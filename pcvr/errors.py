"""The project's own error types, and how the command lines report them.

Each is raised with a message that names the file (and column, row group or key) at fault.
A command line started through ``run_cli`` prints such an error as its message and a hint,
without a traceback, and exits with the error type's own code; ``--debug`` (or the
environment variable ``PCVR_DEBUG=1``) shows the traceback too. Any other exception is a bug
and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional, Sequence


class PCVRError(ValueError):
    """Base of the errors that a user can fix; ``exit_code`` and ``hint`` per type."""
    exit_code = 2
    hint = "see the message above"


class DataError(PCVRError):
    """Parquet data that cannot be read as the schema describes; names file/column/row group."""
    exit_code = 3
    hint = ("check the data folder (python3 train.py --check_data ... lists every damaged row "
            "group at once)")


class SchemaError(PCVRError):
    """A schema.json that is missing, malformed, or inconsistent with the data."""
    exit_code = 4
    hint = "fix schema.json, or pass --schema_path to the right one"


class ConfigError(PCVRError):
    """A configuration that cannot be used: a bad flag value, or a train_config.json that
    cannot rebuild the model exactly."""
    exit_code = 5
    hint = "check the flags (python3 train.py --help) or the checkpoint's train_config.json"


class CheckpointError(PCVRError):
    """A checkpoint folder or file that is missing, damaged or of another kind."""
    exit_code = 6
    hint = "point to another checkpoint folder (a global_step* folder with model.pt)"


DEBUG_FLAG = "--debug"
DEBUG_ENV = "PCVR_DEBUG"


def run_cli(main: Callable[[Optional[List[str]]], object],
            argv: Optional[Sequence[str]] = None) -> None:
    """Runs a command line's ``main(argv)``, reporting the project's errors as message + hint.

    Args:
        main: the entry point; it receives ``argv`` (default ``sys.argv[1:]``).
        argv: the arguments.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        main(argv)
    except PCVRError as exc:
        if debug:
            raise
        print(f"error: {exc}\nhint: {exc.hint} (add {DEBUG_FLAG} for the traceback)",
              file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
