"""The held-out evaluation and its ablations: ``basalseg evaluate-cohort``.

For labelled cohorts the training never saw, every variant is scored against the reference on
the canonical 1 mm grid (the grid the networks work on), with the metrics of
:mod:`basalseg.evaluation`:

* ``prompter alone``: the prompt generator's coarse labelmap;
* ``foundation alone``: the stacked foundation masks, each structure scored on its own (masks
  of different structures may overlap; nothing resolves them);
* one row per student checkpoint given (the method: T1 + SDM; ablations: T1 only, T1 + raw
  masks, other SDM bands), all on the **same** cached foundation masks.

The foundation model runs once per case from the prompter's prompts without jitter, and the
student's crop is the one inference uses (:func:`basalseg.student.student_roi` of the masks and
the prompter's regions), so a student row equals what ``basalseg segment`` gives on that scan
(on its canonical grid).

Outputs in ``--out``: ``metrics.csv`` (case, variant, structure, metrics), ``summary.json`` and
``report.md`` (mean per variant, per-structure table of the first student).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..evaluation import evaluate_labelmaps, markdown_table, metrics_csv, structure_metrics, summarise
from ..structures import STRUCTURES

__all__ = ["register", "evaluate_variants"]


def _full(crop: np.ndarray, start: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, dtype=crop.dtype)
    out[tuple(slice(s, s + n) for s, n in zip(start, crop.shape[-3:]))] = crop
    return out


def evaluate_variants(cache_paths: list[Path], prepared_dir: Path, students: dict[str, str], device: str = "cpu",
                      progress=None) -> list[dict]:
    """Metric rows for every case x variant (see module docstring)."""
    from ..networks import load_checkpoint
    from ..student import build_student_input, predict_student
    from .foundation_cache import load_cached_case
    from .prepare import load_prepared

    nets = {name: load_checkpoint(path, "student", device) for name, path in students.items()}
    rows: list[dict] = []
    for n, path in enumerate(cache_paths):
        case = load_cached_case(path)
        ref = load_prepared(prepared_dir / f"{case.name}.npz").classes
        coarse = _full(case.coarse, case.roi_start, case.full_shape)
        rows += [dict(r, variant="prompter alone") for r in evaluate_labelmaps(coarse, ref, case=case.name, values="class")]
        for s in STRUCTURES:
            mask = _full(case.masks[s.class_index - 1], case.roi_start, case.full_shape)
            rows.append({"case": case.name, "variant": "foundation alone", "structure": s.name,
                         **structure_metrics(mask, ref == s.class_index)})
        for name, (net, meta) in nets.items():
            inputs = build_student_input(case.image01, case.masks, meta.get("input_mode", "sdm"), float(meta.get("band", 10.0)))
            pred = _full(predict_student(net, inputs, device), case.roi_start, case.full_shape)
            rows += [dict(r, variant=name) for r in evaluate_labelmaps(pred, ref, case=case.name, values="class")]
        if progress:
            progress(n + 1, len(cache_paths))
    return rows


def _per_structure_table(rows: list[dict], variant: str) -> str:
    sel = [r for r in rows if r["variant"] == variant]
    summary = summarise(sel)
    lines = ["| structure | Dice | volume accuracy | HD95 (mm) |", "|---|---|---|---|"]
    for name, m in summary["per_structure"].items():
        lines.append(f"| {name} | {m['dice']:.3f} | {m['volume_accuracy']:.3f} | {m['hd95_mm']:.2f} |")
    m = summary["mean"]
    lines.append(f"| **mean** | **{m['dice']:.3f}** | **{m['volume_accuracy']:.3f}** | **{m['hd95_mm']:.2f}** |")
    return "\n".join(lines) + "\n"


def register(sub) -> None:
    p = sub.add_parser("evaluate-cohort", help="held-out evaluation of the method and its ablations on labelled cohorts")
    p.add_argument("--cohort", action="append", required=True, type=Path, help="held-out cohort (nnU-Net layout); repeatable")
    p.add_argument("--label-mapping", default=None)
    p.add_argument("--work", required=True, type=Path, help="working folder (prepared cases, foundation cache)")
    p.add_argument("--prompter", required=True, type=Path, help="prompter checkpoint")
    p.add_argument("--student", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="a student to score, as name=path; repeatable (the first is the method)")
    p.add_argument("--foundation", default="litemedsam", choices=["litemedsam", "sam2"])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(handler=cmd_evaluate_cohort)


def cmd_evaluate_cohort(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..data.cohort import read_cohort
    from ..errors import BasalSegError
    from ..foundation import make_backend, pick_device
    from ..networks import load_checkpoint
    from ..outputs import atomic_write_text
    from .foundation_cache import build_foundation_cache
    from .prepare import prepare_cases

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(None if args.device in (None, "auto") else args.device)
    students = {}
    for item in args.student:
        if "=" not in item:
            raise BasalSegError(f"--student expects name=checkpoint, got {item!r}")
        name, path = item.split("=", 1)
        students[name] = path
    report_sections = []
    all_rows = []
    for folder in args.cohort:
        cases = read_cohort(folder, args.label_mapping)
        work = args.work / folder.name
        prepared = prepare_cases(cases, work)
        prompter, _ = load_checkpoint(args.prompter, "prompter", device)
        backend = make_backend(args.foundation, args.checkpoint, str(device))
        bar = tqdm(total=len(prepared), desc=f"{folder.name}: foundation", unit="case")
        cache = build_foundation_cache(prepared, prompter, backend, work / "foundation" / args.foundation, jitter=0,
                                       device=device, reference_in_roi=False,
                                       progress=lambda d, t: bar.update(d - bar.n))
        bar.close()
        bar = tqdm(total=len(cache), desc=f"{folder.name}: variants", unit="case")
        rows = evaluate_variants(cache, work / "cases", students, str(device), progress=lambda d, t: bar.update(d - bar.n))
        bar.close()
        for r in rows:
            r["cohort"] = folder.name
        all_rows += rows
        variants = ["prompter alone", "foundation alone"] + list(students)
        summaries = {v: summarise([r for r in rows if r["variant"] == v]) for v in variants}
        section = f"## {folder.name} ({len(cases)} cases)\n\n" + markdown_table(summaries)
        if students:
            first = next(iter(students))
            section += f"\nPer structure, {first}:\n\n" + _per_structure_table(rows, first)
        report_sections.append(section)
        print(section)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "metrics.csv", metrics_csv(all_rows, extra_columns=("cohort", "variant")))
    summary = {c.name: {v: summarise([r for r in all_rows if r["cohort"] == c.name and r["variant"] == v])
                        for v in {r["variant"] for r in all_rows}} for c in args.cohort}
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(args.out / "report.md", "# Held-out evaluation\n\n" + "\n".join(report_sections))
    return 0
