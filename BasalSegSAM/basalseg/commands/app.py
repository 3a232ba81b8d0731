"""The ``basalseg`` parser and the one wrapper that turns a command's outcome into an exit status.

Exit status: 0 on success; 2 for a problem with the input, checkpoints, prompts or outputs
(one line ``basalseg: error: ...`` on standard error); 3 when some scans of a batch failed (the
others are done); 130 when cancelled (Ctrl-C or SIGTERM); 1 for an unexpected failure
(``--debug`` shows the traceback). With ``--progress json`` an error is also one JSON line
``{"event": "error", "message": ..., "kind": ...}`` on standard output.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable

from .. import __version__
from ..errors import BasalSegError, Cancelled

__all__ = ["build_parser", "main", "run_command"]

log = logging.getLogger("basalseg")


def _subcommands() -> list:
    """Every subcommand module, in the order ``basalseg --help`` lists them."""
    from . import (batch, bench, calibrate, compare, demo, evaluate, evaluate_cohort, prompts, report, segment,
                   training)

    return [segment, prompts, demo, batch, compare, report, evaluate, training, evaluate_cohort, calibrate, bench]


def build_parser() -> argparse.ArgumentParser:
    """The ``basalseg`` parser; each subcommand sets ``handler`` (its module's ``run``)."""
    parser = argparse.ArgumentParser(prog="basalseg", description="Basal ganglia and thalamus segmentation and volumes from T1 MRI.")
    parser.add_argument("--version", action="version", version=f"basalseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _subcommands():
        module.register(sub)
    for subparser in sub.choices.values():
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through a subprocess test
    raise Cancelled("cancelled (terminated)")


def run_command(args: argparse.Namespace, handler: Callable[[argparse.Namespace], int] | None = None) -> int:
    """Run ``handler(args)`` (default ``args.handler``) and map its outcome to the exit status.

    Sets up logging (``--debug``: INFO and tracebacks), turns SIGTERM into :class:`Cancelled`
    (when called from the main thread), and reports every failure as one line on standard error
    (plus a JSON ``error`` event with ``--progress json``): Ctrl-C/SIGTERM -> 130,
    :class:`BasalSegError` -> its ``exit_code``, ``MemoryError`` -> 2, anything else -> 1.
    """
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="basalseg: %(message)s")
    os.environ.setdefault("SAM2_BUILD_CUDA", "0")
    if hasattr(signal, "SIGTERM"):
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread (embedded use)
            pass
    json_mode = getattr(args, "progress", None) == "json"
    try:
        return int((handler or args.handler)(args) or 0)
    except KeyboardInterrupt:
        return _fail(Cancelled("cancelled (interrupted)"), json_mode, debug)
    except BasalSegError as exc:
        return _fail(exc, json_mode, debug)
    except MemoryError:
        return _fail(BasalSegError("out of memory; try a smaller image or --device cuda"), json_mode, debug)
    except Exception as exc:  # unexpected: one line unless --debug
        if debug:
            raise
        print(f"basalseg: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        if json_mode:
            from ..progress import emit_json

            emit_json(event="error", message=f"{type(exc).__name__}: {exc}", kind="internal")
        return 1


def _fail(exc: BasalSegError, json_mode: bool, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    message = " ".join(str(exc).split())  # one line, whatever a library put in it
    print(f"basalseg: error: {message}", file=sys.stderr)
    if json_mode:
        from ..progress import emit_json

        emit_json(event="error", message=message, kind=type(exc).__name__)
    return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``basalseg``; returns the exit status (parse errors exit 2 through argparse)."""
    return run_command(build_parser().parse_args(argv))
