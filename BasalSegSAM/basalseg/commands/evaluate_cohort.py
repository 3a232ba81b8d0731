"""``basalseg evaluate-cohort``: the held-out evaluation and its ablations (:mod:`basalseg.training.evaluate_cohort`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (add_context_option, add_device_option, add_foundation_options, add_planes_option,
                      add_threads_option, device)

__all__ = ["register", "run", "parse_strides"]


def parse_strides(text: str) -> tuple[int, ...]:
    """``--stride``: comma-separated integers >= 1."""
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stride expects integers such as 2 or 2,3; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--stride values must be >= 1; got {text!r}")
    return values


def register(sub) -> None:
    p = sub.add_parser("evaluate-cohort", help="held-out evaluation of the method and its ablations on labelled cohorts")
    p.add_argument("--cohort", action="append", required=True, type=Path, help="held-out cohort (nnU-Net layout); repeatable")
    p.add_argument("--label-mapping", default=None)
    p.add_argument("--work", required=True, type=Path, help="working folder (prepared cases, foundation cache)")
    p.add_argument("--prompter", required=True, type=Path, help="prompter checkpoint")
    p.add_argument("--student", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="a student to score, as name=path; repeatable (the first is the method)")
    add_foundation_options(p)
    add_device_option(p, help=None)
    add_threads_option(p)
    add_context_option(p, help="foundation variant: 3-slice context (slices k-1, k, k+1 as the colour channels; the "
                               "pipeline's default); --no-context: slice k repeated")
    add_planes_option(p, help="foundation variant: planes to run and fuse, e.g. axial,coronal,sagittal (default axial); "
                              "'foundation alone' is then each structure's majority vote (>= 2 of 3 planes)")
    p.add_argument("--stride", type=parse_strides, default=(1,), metavar="K[,K...]",
                   help="also score the foundation masks and the first student as a '--stride K' run gives them, "
                        "for each K given (e.g. 2,3; derived from the all-slices masks; the speed lever's quality check)")
    p.add_argument("--mirror-tta", action=argparse.BooleanOptionalAction, default=True,
                   help="students with left-right test-time augmentation, as segment runs them (default; the first "
                        "also without: '<name> (no TTA)'); --no-mirror-tta: single passes")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import BasalSegError
    from ..training.evaluate_cohort import evaluate_cohorts

    students = {}
    for item in args.student:
        if "=" not in item:
            raise BasalSegError(f"--student expects name=checkpoint, got {item!r}")
        name, path = item.split("=", 1)
        students[name] = path
    evaluate_cohorts(args.cohort, args.work, args.prompter, students, args.out, label_mapping=args.label_mapping,
                     foundation=args.foundation, checkpoint=args.checkpoint, device=device(args), threads=args.threads,
                     context=args.context, planes=args.planes, strides=args.stride,
                     mirror=args.mirror_tta)
    return 0
