"""``basalseg compare A B``: per-structure change between two results of one person (:mod:`basalseg.longitudinal`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser("compare", help="volume change between two results of the same person (B - A)",
                       description="Per-structure absolute and percent change from result A (earlier) to result B "
                                   "(later), with the interval and the annualised change when the dates are known.")
    p.add_argument("a_dir", type=Path, help="the earlier result folder (basalseg segment/batch output)")
    p.add_argument("b_dir", type=Path, help="the later result folder")
    p.add_argument("--out", type=Path, default=None,
                   help="write the table as CSV to this file (a new file; see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (never a file of a result folder, nor a result's input)")
    p.add_argument("--date-a", default=None, help="acquisition date of A (YYYY-MM-DD), overrides what the results record")
    p.add_argument("--date-b", default=None, help="acquisition date of B (YYYY-MM-DD)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import BasalSegError
    from ..longitudinal import compare_results, format_table
    from ..outputs import atomic_write_text

    if args.out is not None and args.out.is_dir():
        raise BasalSegError(f"--out {args.out} is a folder; give a file name such as change.csv")
    comparison = compare_results(args.a_dir, args.b_dir, args.date_a, args.date_b)
    if args.out is not None:
        _check_out(args.out, (args.a_dir, args.b_dir), args.overwrite)
    for w in comparison.warnings:
        print(f"basalseg: warning: {w}", file=sys.stderr)
    sys.stdout.write(format_table(comparison))
    if args.out is not None:
        atomic_write_text(args.out, comparison.csv_text())
        print(f"wrote {args.out}")
    return 0


def _check_out(out: Path, folders, overwrite: bool) -> None:
    """Refuse an ``--out`` that would replace what is not the user's to lose: a result folder's own
    file (:data:`~basalseg.results.RESULT_FILES` next to a provenance.json), either result's input
    image (even with ``--overwrite``), or any existing file without ``--overwrite``."""
    import os

    from ..errors import BasalSegError
    from ..results import RESULT_FILES, read_result

    target = Path(os.path.realpath(out))
    if target.name in RESULT_FILES and (target.parent / "provenance.json").is_file():
        raise BasalSegError(f"--out {out} is a file of the result folder {target.parent}; write the table "
                            "elsewhere, e.g. --out change.csv")
    for tag, folder in zip("AB", folders):
        path = read_result(folder).input.get("path")
        if path and Path(os.path.realpath(path)) == target:
            raise BasalSegError(f"--out {out} is the input image of {tag}; write the table elsewhere")
    if target.exists() and not overwrite:
        raise BasalSegError(f"--out {out} already exists; give --overwrite to replace it, or another file name")
