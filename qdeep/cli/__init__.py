"""The `qdeep` command: `parser` turns the command line into arguments, `commands` calls the
workflow; here, every failure becomes one line (the traceback only with --debug) and an exit code."""

from __future__ import annotations

import sys
from typing import Sequence

from qdeep import paths
from qdeep.cli import commands
from qdeep.cli.parser import build_parser
from qdeep.errors import QdeepError, one_line
from qdeep.options import ArgumentError

__all__ = ["build_parser", "commands", "main", "one_line"]


def main(argv: Sequence[str] | None = None) -> int:
    import os

    try:
        args = build_parser().parse_args(argv)
    except ArgumentError as exc:  # already printed as one line
        return exc.code
    args.plugins = [*filter(None, os.environ.get("QDEEP_PLUGINS", "").split(",")), *args.plugin]
    try:
        from qdeep.data.planet import csv_encoding
        from qdeep.distributed.session import verbose
        from qdeep.parts import load_plugins

        load_plugins(args.plugins)
        if not args.verbose:  # MLflow's INFO lines (creating a store's tables, ...) are not results
            os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        with csv_encoding(getattr(args, "encoding", None)), verbose(args.verbose):
            args.func(args)
        log = commands.ray_log(args)
        if log is not None and log.is_file() and not args.verbose:
            print(f"Ray's output: {log}")
    except KeyboardInterrupt as exc:  # Ctrl+C; Ray Train's and Tune's graceful aborts end up here too
        print(f"qdeep: interrupted{f' ({exc})' if str(exc) else ''}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for users, the traceback with --debug
        if args.debug:
            raise
        if isinstance(exc, QdeepError):  # bad input, its message the whole story: exit 2
            line = str(exc)
        else:  # a filesystem error naming its path is one line too (exit 2); anything else, exit 1
            line = paths.os_error_line(exc) if isinstance(exc, OSError) else None
        if line is None:
            print(f"qdeep: error: {one_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
            return 1
        print(f"qdeep: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
