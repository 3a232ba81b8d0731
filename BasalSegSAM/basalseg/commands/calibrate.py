"""``basalseg calibrate``: fit a student's volume calibration on validation cases (:mod:`basalseg.training.calibrate`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (add_context_option, add_device_option, add_foundation_options, add_overwrite_option,
                      add_threads_option, device)

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="fit a student's per-structure volume calibration on validation cases")
    p.add_argument("--cohort", action="append", required=True, type=Path,
                   help="validation cohort (nnU-Net layout), cases the student was not trained on; repeatable")
    p.add_argument("--label-mapping", default=None)
    p.add_argument("--validation-split", type=Path, default=None, metavar="SPLIT_JSON",
                   help="use only the cases listed under 'val' in this split file (basalseg train's "
                        "WORK/split.json), so the training cohorts themselves can be given as --cohort")
    p.add_argument("--work", required=True, type=Path, help="working folder (prepared cases, foundation cache)")
    p.add_argument("--prompter", required=True, type=Path, help="prompter checkpoint")
    p.add_argument("--student", required=True, type=Path, help="student checkpoint to calibrate")
    p.add_argument("--out", required=True, type=Path, help="calibrated student checkpoint to write")
    add_overwrite_option(p, help="replace an existing --out file")
    p.add_argument("--tie-sides", action="store_true", help="one offset per left/right pair")
    add_context_option(p, help="foundation masks with 3-slice context, as the pipeline's default (--no-context: without)")
    p.add_argument("--mirror-tta", action=argparse.BooleanOptionalAction, default=True,
                   help="fit on the student's left-right test-time augmentation, as segment runs it (default; "
                        "--no-mirror-tta: on single passes, for runs with --no-mirror-tta)")
    p.add_argument("--manifest", type=Path, default=None,
                   help="weights folder whose manifest.json should record the calibrated student (--out must be in it)")
    add_foundation_options(p)
    add_device_option(p, help=None)
    add_threads_option(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..training.calibrate import calibrate_student

    calibrate_student(args.cohort, args.work, args.prompter, args.student, args.out,
                      label_mapping=args.label_mapping, validation_split=args.validation_split,
                      overwrite=args.overwrite, tie_sides=args.tie_sides, context=args.context,
                      manifest=args.manifest, foundation=args.foundation, checkpoint=args.checkpoint,
                      device=device(args), threads=args.threads, mirror=args.mirror_tta)
    return 0
