"""``basalseg report OUT_DIR``: the cohort QC page of a batch folder (:mod:`basalseg.report`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register", "run", "add_threshold_options", "thresholds"]


def add_threshold_options(p) -> None:
    """The cohort flags' thresholds (``report`` and ``batch``), defaults from :class:`~basalseg.cohortqc.Thresholds`."""
    from ..cohortqc import Thresholds

    t = Thresholds()
    p.add_argument("--iqr-factor", type=float, default=t.iqr_factor,
                   help=f"outlier: volume beyond Q1/Q3 -/+ this many IQRs of the cohort (default {t.iqr_factor:g})")
    p.add_argument("--min-cohort", type=int, default=t.min_cohort,
                   help=f"outlier flags need at least this many scans with the structure (default {t.min_cohort})")
    p.add_argument("--asymmetry-threshold", type=float, default=100 * t.asymmetry,
                   help=f"asymmetry: |L-R|/((L+R)/2) above this many percent (default {100 * t.asymmetry:g})")
    p.add_argument("--dice-threshold", type=float, default=t.dice,
                   help=f"disagreement: foundation-vs-student Dice below this (default {t.dice:g}; "
                        "0.15 lower for the pallidi)")
    p.add_argument("--embed", action="store_true", help="inline the montages in report.html (one self-contained file)")


def thresholds(args: argparse.Namespace):
    """The :class:`~basalseg.cohortqc.Thresholds` of :func:`add_threshold_options`' options, checked."""
    from ..errors import BasalSegError
    from ..cohortqc import Thresholds

    if args.iqr_factor <= 0 or args.min_cohort < 1 or not 0 < args.asymmetry_threshold or not 0 <= args.dice_threshold <= 1:
        raise BasalSegError("thresholds: --iqr-factor > 0, --min-cohort >= 1, --asymmetry-threshold > 0 (percent), "
                            "--dice-threshold in 0..1")
    return Thresholds(iqr_factor=args.iqr_factor, min_cohort=args.min_cohort, asymmetry=args.asymmetry_threshold / 100.0,
                      dice=args.dice_threshold)


def register(sub) -> None:
    p = sub.add_parser("report", help="write OUT_DIR/report.html: QC montages, volumes and flags of every result in OUT_DIR",
                       description="Write OUT_DIR/report.html; in a batch folder also the cohort tables again "
                                   "(volumes.csv, volumes_wide.csv, changes.csv), so that all of them read the "
                                   "results and the dataset's dates as they are now.")
    p.add_argument("out_dir", type=Path, help="folder of result folders (a basalseg batch --out folder)")
    add_threshold_options(p)
    p.add_argument("--no-prompts", action="store_true", help="do not draw prompt boxes on the montages")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import BasalSegError
    from ..report import build_report
    from ..results import find_results, read_failures

    limits = thresholds(args)
    if not args.out_dir.is_dir():
        raise BasalSegError(f"{args.out_dir}: no such folder")
    records, broken = find_results(args.out_dir)
    failures = read_failures(args.out_dir)
    if not records and not broken and not failures:
        raise BasalSegError(f"{args.out_dir}: no results in it (no folder below it holds a BasalSegSAM "
                            "provenance.json); give the --out folder of segment or batch")
    from ..longitudinal import consecutive_changes

    pairs = consecutive_changes(records)  # the report's longitudinal view and a batch folder's changes.csv
    path = build_report(args.out_dir, limits, embed=args.embed, prompts=not args.no_prompts, records=records,
                        broken=broken, pairs=pairs)
    print(f"wrote {path} ({len(records)} results, {len(failures)} failed)")
    if _is_batch_folder(args.out_dir):  # its tables from the same reading as the report (dates corrected since, ...)
        from ..batch import write_cohort_tables

        tables = write_cohort_tables(args.out_dir, records, pairs)
        print("refreshed the cohort tables: " + ", ".join(p.name for p in tables))
    for folder, reason in broken:
        print(f"basalseg: warning: {folder} is not a complete result ({reason}); left out", file=sys.stderr)
    return 0


def _is_batch_folder(folder: Path) -> bool:
    """A folder whose ``volumes.csv`` is a ``basalseg batch`` cohort table (its first columns), so
    ``report`` may write the cohort tables again; a user's own ``volumes.csv`` is left alone."""
    from ..batch import COHORT_COLUMNS

    try:
        with open(folder / "volumes.csv", encoding="utf-8") as f:
            header = f.readline().strip().split(",")
    except (OSError, UnicodeDecodeError):
        return False
    return header[:5] == COHORT_COLUMNS[:5]
