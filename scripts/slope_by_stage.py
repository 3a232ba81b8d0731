"""Which stage shrinks volume differences: the local slope of each variant of an ``evaluate-cohort`` run.

``evaluate-cohort`` scores the stages of the method separately ("prompter alone", "foundation
alone", each student) on the same cases. On cohorts that were already put through the brain
localisation (``synth --localised``, ``localise_cohort``: the cases are in the template's space, so
each case's affine scale is 1) the slope of log predicted on log reference volume over the cases is
the **local slope** of README "Results" (:func:`basalseg.evaluation.volume_agreement`): how much of
each structure's own size the stage's output follows (1 = all of it). Pooled over every cohort of
the run; mean over the 8 structures and per structure.

    .venv/bin/python scripts/slope_by_stage.py runs/eret/report_val/metrics.csv
"""

from __future__ import annotations

import csv
import sys

import numpy as np


def main(argv=None) -> int:
    from basalseg.evaluation import volume_agreement
    from basalseg.structures import STRUCTURES

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    rows = [dict(r, affine_scale=1.0) for r in csv.DictReader(open(argv[0]))]
    names = [s.name for s in STRUCTURES]
    print("| variant | cases | local slope (mean of 8) | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        sel = [r for r in rows if r["variant"] == variant and float(r["volume_pred_ml"]) > 0]
        agreement = volume_agreement(sel)
        slopes = [agreement[n]["local_slope"] for n in names]
        cases = len({(r.get("cohort"), r["case"]) for r in sel})
        print(f"| {variant} | {cases} | {np.nanmean(slopes):.2f} | " + " | ".join(f"{x:.2f}" for x in slopes) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
