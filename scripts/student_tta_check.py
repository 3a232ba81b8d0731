"""Does test-time augmentation or a student ensemble raise the held-out scores? (issue 11)

Scores, on the foundation caches an ``evaluate-cohort`` run left in its ``--work`` folder (the
same foundation masks the report scored), each variant of the final prediction:

* ``A``: the first student (its calibration offsets applied), as ``segment`` runs it;
* ``A+flip``: the mean of its logits and of its left-right mirrored pass (input mirrored along the
  RAS+ grid's axis 0 with the left/right prior channels swapped, logits mirrored and swapped
  back; :func:`basalseg.structures.left_right_permutation`);
* ``A+B``: the mean logits of the two students (mean offsets);
* ``A+B+flip``: both, mirrored and not.

Usage: ``python scripts/student_tta_check.py WORK A.pt B.pt [--threads N] [--json OUT]``
(WORK holds ``<cohort>/foundation/<variant>/*.npz`` and ``<cohort>/cases/*.npz``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "BasalSegSAM"))

from basalseg.calibration import apply_offsets, offsets_from_meta  # noqa: E402
from basalseg.evaluation import evaluate_labelmaps  # noqa: E402
from basalseg.networks import load_checkpoint  # noqa: E402
from basalseg.structures import NUM_CLASSES, left_right_permutation  # noqa: E402
from basalseg.student import build_student_input, predict_student  # noqa: E402
from basalseg.training.evaluate_cohort import _full  # noqa: E402
from basalseg.training.foundation_cache import load_cached_case  # noqa: E402
from basalseg.training.prepare import load_prepared  # noqa: E402


def _logits(net, meta, case, mirror: bool) -> np.ndarray:
    perm = left_right_permutation()
    x = build_student_input(case.image01, case.masks, meta.get("input_mode", "sdm"), float(meta.get("band", 10.0)))
    if mirror:
        x = np.ascontiguousarray(x[:, ::-1][[0] + perm[1:NUM_CLASSES]])
    out = predict_student(net, x, "cpu", return_logits=True)
    return np.ascontiguousarray(out[perm][:, ::-1]) if mirror else out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    nets = [load_checkpoint(p, "student") for p in (args.a, args.b)]
    scores: dict = {}
    for cohort in sorted(p for p in args.work.iterdir() if (p / "foundation").is_dir()):
        for path in sorted(cohort.glob("foundation/*/*.npz")):
            case = load_cached_case(path)
            ref = load_prepared(cohort / "cases" / f"{case.name}.npz").classes
            (la, lfa), (lb, lfb) = [(_logits(n, m, case, False), _logits(n, m, case, True)) for n, m in nets]
            oa, ob = (offsets_from_meta(m) for _, m in nets)
            ob = oa if ob is None else ob
            mean_off = None if oa is None else (oa + ob) / 2
            variants = {"A": apply_offsets(la, oa), "A+flip": apply_offsets((la + lfa) / 2, oa),
                        "A+B": apply_offsets((la + lb) / 2, mean_off),
                        "A+B+flip": apply_offsets((la + lfa + lb + lfb) / 4, mean_off)}
            for name, classes in variants.items():
                rows = evaluate_labelmaps(_full(classes, case.roi_start, case.full_shape), ref, values="class")
                scores.setdefault(cohort.name, {}).setdefault(name, []).append(
                    [np.mean([r["dice"] for r in rows]), np.mean([r["volume_accuracy"] for r in rows])])
            print(case.name, {k: round(v[-1][0], 4) for k, v in scores[cohort.name].items()}, flush=True)
    table = {c: {v: {"cases": len(x), "dice": round(float(np.mean(x, 0)[0]), 4),
                     "volume_accuracy": round(float(np.mean(x, 0)[1]), 4)} for v, x in d.items()}
             for c, d in scores.items()}
    for c, d in table.items():
        for v, r in d.items():
            print(f"{c:26s} {v:10s} Dice {r['dice']:.4f}  volume accuracy {r['volume_accuracy']:.4f}  ({r['cases']} cases)")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
