"""``basalseg evaluate PRED REF``: Dice, volume accuracy and HD95 against a reference (:mod:`basalseg.evaluation`)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run"]

def register(sub) -> None:
    """``basalseg evaluate PRED REF``: metrics of one segmentation against a reference."""
    p = sub.add_parser("evaluate", help="Dice, volume accuracy and HD95 of a segmentation against a reference")
    p.add_argument("pred", type=Path, help="predicted labelmap (FreeSurfer values), e.g. OUT/segmentation.nii.gz")
    p.add_argument("ref", type=Path, help="reference labelmap")
    p.add_argument("--ref-mapping", default=None, help="JSON: reference label value -> FreeSurfer value")
    p.add_argument("--resample", action="store_true", help="resample the prediction onto the reference grid if they differ")
    p.add_argument("--out", type=Path, default=None, help="folder for metrics.csv and report.md")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..evaluation import evaluate_files, metrics_csv, summarise
    from ..outputs import atomic_write_text

    mapping = None
    if args.ref_mapping:
        from ..data.cohort import read_label_mapping

        mapping = read_label_mapping(args.ref_mapping)
    rows = evaluate_files(args.pred, args.ref, mapping, args.resample)
    summary = summarise(rows)
    lines = ["| structure | Dice | volume accuracy | HD95 (mm) | V pred (mL) | V ref (mL) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['structure']} | {r['dice']:.3f} | {r['volume_accuracy']:.3f} | {r['hd95_mm']:.2f} | "
                     f"{r['volume_pred_ml']:.3f} | {r['volume_ref_ml']:.3f} |")
    m = summary["mean"]
    lines.append(f"| **mean** | **{m['dice']:.3f}** | **{m['volume_accuracy']:.3f}** | **{m['hd95_mm']:.2f}** | | |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        atomic_write_text(args.out / "metrics.csv", metrics_csv(rows))
        atomic_write_text(args.out / "report.md", f"# {args.pred} vs {args.ref}\n\n{table}\n"
                          "Dice = 2|P∩R|/(|P|+|R|); volume accuracy = 1 − |Vpred − Vref|/Vref; "
                          "HD95 = 95th percentile symmetric surface distance (mm).\n")
        atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=1))
    return 0
