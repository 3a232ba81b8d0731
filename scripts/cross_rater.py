"""Cross-rater check: one segmentation scored against several atlases' labels of the same brain.

For each template (default: ICBM 2009c, which no training subject was made from), the shipped
pipeline segments the template's T1 (``basalseg segment``), and the result is scored against
three independent label sets of that brain: Desikan-Killiany ``aseg`` (the training convention),
Harvard-Oxford (max probability >= 50 %) and Neuromorphometrics, each registered to the template
by :func:`basalseg.data.atlas.load_reference_labels`. The atlases are also scored against each
other (DK as the "prediction"): the agreement between two raters is the ceiling any method can
reach against the second one.

Usage: ``.venv/bin/python scripts/cross_rater.py OUT_DIR [--template icbm2009c] [--threads 2]``.
Writes ``OUT_DIR/cross_rater.csv`` and ``OUT_DIR/cross_rater.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from basalseg.commands import main as basalseg_main
from basalseg.data.atlas import load_reference_labels, template_path
from basalseg.evaluation import evaluate_labelmaps, metrics_csv, summarise
from basalseg.outputs import atomic_write_text

ATLASES = {"dk": "Desikan-Killiany aseg", "harvard_oxford": "Harvard-Oxford (>= 50 %)",
           "neuromorphometrics": "Neuromorphometrics"}


def run(out: Path, templates: list[str], threads: int) -> str:
    out.mkdir(parents=True, exist_ok=True)
    rows, lines = [], []
    for template in templates:
        seg_dir = out / f"seg_{template}"
        if not (seg_dir / "segmentation.nii.gz").is_file():
            code = basalseg_main(["segment", str(template_path(template)), "--out", str(seg_dir),
                                  "--threads", str(threads), "--progress", "none", "--no-qc"])
            if code != 0:
                raise SystemExit(f"segment failed on {template}")
        img = nib.load(str(seg_dir / "segmentation.nii.gz"))
        pred = np.asarray(img.dataobj).astype(np.int16)
        spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
        refs = {a: load_reference_labels(template, a, threads=threads) for a in ATLASES}
        pairs = [("BasalSegSAM", a, pred) for a in ATLASES] + [("DK atlas", a, refs["dk"]) for a in ATLASES if a != "dk"]
        lines += [f"### {template}", "", "| rater A | rater B (reference) | mean Dice | mean volume accuracy | mean HD95 (mm) |",
                  "|---|---|---|---|---|"]
        for who, atlas, labels in pairs:
            r = evaluate_labelmaps(labels, refs[atlas], spacing, case=template)
            for row in r:
                row.update(template=template, rater=who, reference=atlas)
            rows += r
            m = summarise(r)["mean"]
            lines.append(f"| {who} | {ATLASES[atlas]} | {m['dice']:.3f} | {m['volume_accuracy']:.3f} | {m['hd95_mm']:.2f} |")
        lines.append("")
    atomic_write_text(out / "cross_rater.csv", metrics_csv(rows, extra_columns=("template", "rater", "reference")))
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "cross_rater.md", text)
    atomic_write_text(out / "cross_rater.json", json.dumps(rows, indent=1))
    return text


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--template", action="append", default=None, choices=["icbm2009c", "mni152"])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    print(run(a.out, a.template or ["icbm2009c"], a.threads))
