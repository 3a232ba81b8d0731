"""Held-out evaluation of whole-head inputs, without and with brain localisation (issue 11).

Each case of a labelled cohort (nnU-Net layout, e.g. ``basalseg synth --head``) is segmented by
the full pipeline (``basalseg segment`` defaults, shipped weights unless given) once per
``--localise`` value, and scored **on the input grid** against the cohort's labels (which the
head generator puts on that grid): per structure Dice, volume accuracy, HD95 (mm, the input's
voxel size) and the signed volume error ``V_pred / V_ref - 1``, volumes = voxel count x input
voxel volume (as ``volumes.csv``). Resumable: each (case, variant) is stored in
``OUT/cases/<case>__<variant>.json`` and skipped when present.

    .venv/bin/python scripts/evaluate_heads.py --cohort runs/cohorts/heldout_head --out runs/eval_heads \
        --localise off --localise on --threads 1

Writes ``OUT/metrics.csv`` and ``OUT/report.md`` (mean over structures and cases per variant, and
per structure; with the **volume slope**, the least-squares slope of predicted on reference volume
over the cases, per structure and its mean over the 8, :func:`basalseg.evaluation.volume_agreement`:
1 = differences between subjects measured at full size; and the **local slope**, the same on log
volumes after dividing each case's volumes by its localisation's affine scale ``|det A|``: how much
of each structure's own size, which the affine does not explain, reaches the output; a case the
pipeline refused counts as an empty prediction in the means and is left out of both slopes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cohort", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--localise", action="append", choices=["auto", "on", "off"], default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--localise-transform", default="affine", choices=["affine", "rigid"],
                   help="the localisation's transform (default affine, the pipeline's; rigid: before 2026-12-07)")
    p.add_argument("--weights", default=None)
    p.add_argument("--limit", type=int, default=None, help="first N cases only")
    p.add_argument("--tables-only", action="store_true",
                   help="run nothing: tables from the stored cases that every --localise variant has")
    args = p.parse_args(argv)

    from basalseg.data.cohort import read_cohort
    from basalseg.errors import BasalSegError
    from basalseg.evaluation import evaluate_labelmaps
    from basalseg.imageio import load_volume
    from basalseg.pipeline import Pipeline, PipelineConfig
    from basalseg.structures import STRUCTURES

    variants = args.localise or ["off", "on"]
    cases = read_cohort(args.cohort)[: args.limit]
    (args.out / "cases").mkdir(parents=True, exist_ok=True)
    pipelines = {} if args.tables_only else {v: Pipeline(PipelineConfig(weights_dir=args.weights, threads=args.threads, localise=v,
                                                                                 localise_transform=args.localise_transform)) for v in variants}
    rows = []
    if args.tables_only:
        for case in cases:
            paths = [args.out / "cases" / f"{case.name}__{v}.json" for v in variants]
            if all(p.is_file() for p in paths):
                for path in paths:
                    rows += _scored_rows(json.loads(path.read_text()))
        write_tables(rows, args.out, [s.name for s in STRUCTURES])
        return 0
    for case in cases:
        for v in variants:
            path = args.out / "cases" / f"{case.name}__{v}.json"
            if path.is_file():
                rows += _scored_rows(json.loads(path.read_text()))
                continue
            volume = load_volume(case.image_path)
            ref = np.asarray(load_volume(case.label_path).data).round().astype(np.int16)
            t = time.perf_counter()
            record = {"case": case.name, "variant": f"localise {v}"}
            try:
                result = pipelines[v].segment(volume)
                pred = result.labels
                record["localisation"] = result.provenance.get("localisation")
                record["seconds"] = round(time.perf_counter() - t, 1)
            except BasalSegError as exc:
                pred = np.zeros(volume.shape, np.int16)
                record["error"] = str(exc)
            spacing = tuple(float(s) for s in volume.spacing)
            case_rows = evaluate_labelmaps(pred, ref, spacing, case=case.name)
            vv = volume.voxel_volume_mm3
            for r, s in zip(case_rows, STRUCTURES):
                r["variant"] = record["variant"]
                n_ref = int((ref == s.label).sum())
                r["signed_volume_error"] = (int((pred == s.label).sum()) / n_ref - 1.0) if n_ref else float("nan")
                r["seconds"] = record.get("seconds")
            record["rows"] = case_rows
            path.write_text(json.dumps(record, indent=1, default=float))
            print(f"{case.name} {v}: mean Dice {np.nanmean([r['dice'] for r in case_rows]):.3f} "
                  f"({record.get('seconds', 'error')} s) {record.get('error', '')}", flush=True)
            rows += _scored_rows(record)
    write_tables(rows, args.out, [s.name for s in STRUCTURES])
    return 0


def _scored_rows(record: dict) -> list[dict]:
    """A stored (case, variant) record's rows, each marked ``failed`` when the pipeline refused the case
    (its empty prediction counts in the means, not in the volume slopes) and given the case's
    ``affine_scale``: ``|det|`` of the localisation's template-to-input matrix, 1 when the case was
    not localised (its volumes are read on its own grid)."""
    loc = record.get("localisation") or {}
    matrix = loc.get("template_to_input") if loc.get("applied") else None
    scale = abs(float(np.linalg.det(np.asarray(matrix, dtype=np.float64)[:3, :3]))) if matrix is not None else 1.0
    return [dict(r, failed="error" in record, affine_scale=scale) for r in record["rows"]]


def write_tables(rows: list[dict], out: Path, structures: list[str]) -> None:
    from basalseg.evaluation import volume_agreement

    metrics = ["dice", "volume_accuracy", "hd95_mm", "signed_volume_error"]
    keys = ["case", "variant", "structure"] + metrics + ["volume_pred_ml", "volume_ref_ml", "seconds"]
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    (out / "metrics.csv").write_text("\n".join(lines) + "\n")
    variants = list(dict.fromkeys(r["variant"] for r in rows))

    def mean(sel, m):
        vals = [r[m] for r in sel if r.get(m) is not None and np.isfinite(r[m])]
        return float(np.mean(vals)) if vals else float("nan")

    # the slope over the cases that ran (a failed case's empty prediction counts in the means, not here)
    slopes = {v: volume_agreement([r for r in rows if r["variant"] == v and not r.get("failed")]) for v in variants}
    md = ["| variant | cases | Dice | vol. acc. | HD95 mm | signed vol. err. | vol. slope | local slope | s per case |",
          "|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        sel = [r for r in rows if r["variant"] == v]
        n = len({r["case"] for r in sel})
        secs = [r["seconds"] for r in sel if r.get("seconds")]
        slope = [e["slope"] for e in slopes[v].values() if np.isfinite(e["slope"])]
        local = [e["local_slope"] for e in slopes[v].values() if np.isfinite(e["local_slope"])]
        md.append(f"| {v} | {n} | {mean(sel, 'dice'):.3f} | {mean(sel, 'volume_accuracy'):.3f} | {mean(sel, 'hd95_mm'):.2f} "
                  f"| {100 * mean(sel, 'signed_volume_error'):+.1f} % | {np.mean(slope) if slope else float('nan'):.2f} "
                  f"| {np.mean(local) if local else float('nan'):.2f} | {np.mean(secs) if secs else float('nan'):.0f} |")
    md += ["", "| structure | " + " | ".join(f"{v}: Dice | vol. acc. | HD95 | vol. slope | local slope" for v in variants) + " |",
           "|---|" + "---|---|---|---|---|" * len(variants)]
    for s in structures:
        cells = []
        for v in variants:
            sel = [r for r in rows if r["variant"] == v and r["structure"] == s]
            cells.append(f"{mean(sel, 'dice'):.3f} | {mean(sel, 'volume_accuracy'):.3f} | {mean(sel, 'hd95_mm'):.2f} "
                         f"| {slopes[v].get(s, {}).get('slope', float('nan')):.2f} "
                         f"| {slopes[v].get(s, {}).get('local_slope', float('nan')):.2f}")
        md.append(f"| {s} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
