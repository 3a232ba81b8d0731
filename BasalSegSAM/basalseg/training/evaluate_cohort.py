"""The held-out evaluation and its ablations: ``basalseg evaluate-cohort``.

For labelled cohorts the training never saw, every variant is scored against the reference on
the canonical 1 mm grid (the grid the networks work on), with the metrics of
:mod:`basalseg.evaluation`:

* ``prompter alone``: the prompt generator's coarse labelmap;
* ``foundation alone``: the stacked foundation masks, each structure scored on its own (masks
  of different structures may overlap; nothing resolves them); with several planes
  (``--planes``), each structure's **majority vote** mask (voxels that at least 2 of the 3
  planes mark, :func:`basalseg.sdm.majority_vote`);
* one row per student checkpoint given (the method: T1 + SDM; ablations: T1 only, T1 + raw
  masks, other SDM bands), all on the **same** cached foundation masks; a student whose
  checkpoint carries a volume calibration (:mod:`basalseg.calibration`) is scored with it, as the
  pipeline runs it, and the first student also without it (``<name> (uncalibrated)``);
* with ``--stride K`` (or several, ``--stride 2,3``): ``foundation alone (stride K)`` and
  ``<first student> (stride K)`` for each K, what a ``basalseg segment --stride K`` run gives,
  derived exactly from the cached all-slices masks (:func:`basalseg.foundation.stride.stride_masks`):
  the speed lever's quality check;
* students run with left-right test-time augmentation (mean logits of the crop and its mirror
  image, calibration added to them), as ``segment`` does by default; the first also without it,
  ``<first student> (no TTA)`` (``--no-mirror-tta``: single passes only, the figures before
  2026-12-04 evening).
* ``<first student> (expected volume)``: volume accuracy only (Dice and HD95 n/a), of the volume
  read from the first student's softmax (the sum of each structure's probability, ``expected_ml``
  in ``volumes.csv``) instead of its voxel count (:func:`expected_volume_rows`).

The foundation model runs once per case from the prompter's prompts without jitter, and the
student's crop is the one inference uses (:func:`basalseg.student.student_roi` of the masks and
the prompter's regions), so a student row equals what ``basalseg segment`` gives on that scan
(on its canonical grid).

**Foundation variants** (``docs/CONTEXT_AND_PLANES.md``): ``--context`` (3-slice context) and
``--planes axial,coronal,sagittal`` (multi-plane fusion; students read the mean of the planes'
SDMs) select how the foundation model runs. Each variant has its own cache folder
``<work>/<cohort>/foundation/<variant>`` (:func:`~basalseg.training.foundation_cache.variant_name`:
``litemedsam``, ``litemedsam-ctx3``, ``litemedsam-3planes``, ...), so runs of different variants
never overwrite each other and the default reuses the existing cache. Run the command once per
variant with its own ``--out`` and compare the reports.

Outputs in ``--out``: ``metrics.csv`` (case, variant, structure, metrics), ``summary.json`` and
``report.md`` (mean per variant; per-structure table of the first student with the signed volume
error and the volume slope and r across cases, :func:`basalseg.evaluation.volume_agreement`), ``foundation.json``
(the variant and the cost of its foundation stage per cohort: seconds per case, mean, median,
total, slices per case) and ``foundation_timing.csv`` (seconds and slices per case and plane,
as recorded in the cache when the case was computed; cases cached before timings were recorded
have none and are counted as ``untimed``).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np

from ..evaluation import (evaluate_labelmaps, markdown_table, metrics_csv, structure_metrics, summarise,
                          volume_accuracy, volume_agreement)
from ..structures import STRUCTURES

__all__ = ["evaluate_cohorts", "evaluate_variants", "foundation_cost"]


def _full(crop: np.ndarray, start: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """A crop put back into zeros of the full canonical ``shape`` (leading axes, if any, kept)."""
    out = np.zeros(crop.shape[:-3] + tuple(shape), dtype=crop.dtype)
    out[(Ellipsis,) + tuple(slice(s, s + n) for s, n in zip(start, crop.shape[-3:]))] = crop
    return out


def _strided(case, stride: int) -> np.ndarray:
    """The case's cached (all-slices) masks as a ``stride`` run would have given them, on the case's
    crop (:func:`basalseg.foundation.stride.stride_masks` works on the full canonical grid, where the
    prompts' slice numbers live)."""
    from ..foundation.stride import stride_masks

    full = _full(case.masks, case.roi_start, case.full_shape)
    out = stride_masks(full, case.prompts, stride)
    return out[(slice(None),) + tuple(slice(s, s + n) for s, n in zip(case.roi_start, case.masks.shape[-3:]))]


def evaluate_variants(cache_paths: list[Path], prepared_dir: Path, students: dict[str, str], device: str = "cpu",
                      progress=None, stride: int | tuple[int, ...] = 1, mirror: bool = True) -> list[dict]:
    """Metric rows for every case x variant (see module docstring).

    ``mirror``: every student runs with left-right test-time augmentation, as ``segment`` does by
    default (:func:`basalseg.student.predict_student` ``mirror=True``; calibration offsets added to
    the mean logits), and the first one also without it, ``<first student> (no TTA)``. False:
    single passes only (``--no-mirror-tta``).

    For each ``stride`` K > 1 (an int or a tuple of them; single-plane caches only), two more
    variants: ``foundation alone (stride K)`` and ``<first student> (stride K)``: the masks a
    ``--stride K`` run gives (every K-th prompted slice plus each structure's ends run, the rest
    interpolated), derived exactly from the cached all-slices masks.
    """
    from ..calibration import apply_offsets, offsets_from_meta
    from ..networks import load_checkpoint
    from ..student import build_student_input, predict_student
    from .foundation_cache import load_cached_case
    from .prepare import load_prepared

    strides = [k for k in ((stride,) if isinstance(stride, int) else tuple(stride)) if k > 1]

    nets = {name: load_checkpoint(path, "student", device) for name, path in students.items()}
    offsets = {name: offsets_from_meta(meta) for name, (_, meta) in nets.items()}
    first = next(iter(nets), None)
    rows: list[dict] = []
    for n, path in enumerate(cache_paths):
        case = load_cached_case(path)
        ref = load_prepared(prepared_dir / f"{case.name}.npz").classes
        coarse = _full(case.coarse, case.roi_start, case.full_shape)
        rows += [dict(r, variant="prompter alone") for r in evaluate_labelmaps(coarse, ref, case=case.name, values="class")]
        fmasks = case.foundation_masks  # the masks; majority vote of the planes for multi-plane caches
        for s in STRUCTURES:
            mask = _full(fmasks[s.class_index - 1], case.roi_start, case.full_shape)
            rows.append({"case": case.name, "variant": "foundation alone", "structure": s.name,
                         **structure_metrics(mask, ref == s.class_index)})
        for name, (net, meta) in nets.items():
            # (P, 8, ...) masks of a multi-plane cache are fused into 8 SDM channels, as in the pipeline
            inputs = build_student_input(case.image01, case.masks, meta.get("input_mode", "sdm"), float(meta.get("band", 10.0)))
            logits = predict_student(net, inputs, device, return_logits=True, mirror=mirror)
            pred = _full(apply_offsets(logits, offsets[name]), case.roi_start, case.full_shape)
            rows += [dict(r, variant=name) for r in evaluate_labelmaps(pred, ref, case=case.name, values="class")]
            if name == first:  # the volume read from the softmax (volumes.csv's expected_ml), not the voxel count
                rows += [dict(r, variant=f"{name} (expected volume)")
                         for r in expected_volume_rows(logits, offsets[name], ref, case.name)]
            if name == first and offsets[name] is not None:  # the same logits without the calibration
                pred = _full(apply_offsets(logits, None), case.roi_start, case.full_shape)
                rows += [dict(r, variant=f"{name} (uncalibrated)")
                         for r in evaluate_labelmaps(pred, ref, case=case.name, values="class")]
            if name == first and mirror:  # one pass, as --no-mirror-tta runs it
                logits = predict_student(net, inputs, device, return_logits=True)
                pred = _full(apply_offsets(logits, offsets[name]), case.roi_start, case.full_shape)
                rows += [dict(r, variant=f"{name} (no TTA)")
                         for r in evaluate_labelmaps(pred, ref, case=case.name, values="class")]
        for stride in strides if nets else ():
            if case.masks.ndim != 4:
                raise ValueError("--stride is evaluated on single-plane caches only")
            masks = _strided(case, stride)
            for s in STRUCTURES:
                mask = _full(masks[s.class_index - 1], case.roi_start, case.full_shape)
                rows.append({"case": case.name, "variant": f"foundation alone (stride {stride})", "structure": s.name,
                             **structure_metrics(mask, ref == s.class_index)})
            name, (net, meta) = next(iter(nets.items()))
            inputs = build_student_input(case.image01, masks, meta.get("input_mode", "sdm"), float(meta.get("band", 10.0)))
            pred = _full(predict_student(net, inputs, device, logit_offsets=offsets[name], mirror=mirror),
                         case.roi_start, case.full_shape)
            rows += [dict(r, variant=f"{name} (stride {stride})")
                     for r in evaluate_labelmaps(pred, ref, case=case.name, values="class")]
        if progress:
            progress(n + 1, len(cache_paths))
    return rows


def expected_volume_rows(logits: np.ndarray, offsets: np.ndarray | None, ref: np.ndarray, case: str) -> list[dict]:
    """Per structure, the volume accuracy of the **expected volume**: the sum of the structure's
    softmax probability (of ``logits`` ``(9, X, Y, Z)`` of the crop plus ``offsets``, as
    :func:`basalseg.uncertainty.softmax_measures` gives ``expected_ml``) against the voxel count of
    ``ref`` (class indices, canonical 1 mm grid: one voxel = 1 mm^3). Dice and HD95 are NaN: a
    soft volume has no surface. Rows as :func:`basalseg.evaluation.structure_metrics`."""
    import torch

    z = torch.as_tensor(np.asarray(logits, np.float32))
    if offsets is not None:
        z = z + torch.as_tensor(np.asarray(offsets, np.float32)).view(-1, *([1] * (z.ndim - 1)))
    soft = torch.softmax(z, dim=0).flatten(1).sum(1, dtype=torch.float64).numpy()
    rows = []
    for s in STRUCTURES:
        vp, vr = float(soft[s.class_index]), float(np.count_nonzero(ref == s.class_index))
        rows.append({"case": case, "structure": s.name, "dice": float("nan"), "hd95_mm": float("nan"),
                     "volume_accuracy": volume_accuracy(vp, vr),
                     "volume_pred_ml": vp / 1000.0, "volume_ref_ml": vr / 1000.0})
    return rows


def heldout_cache(cases: list, work: Path, prompter, backend, foundation: str, device, context: bool = False,
                  planes=("axial",), progress=None) -> list[Path]:
    """Prepare a labelled cohort's cases under ``work`` and run the foundation model on each from
    the prompter's prompts as inference does (no jitter; the inference crop). Returns the cache
    files ``work/foundation/<variant>/NAME.npz`` (:func:`~basalseg.training.foundation_cache.variant_name`
    of ``foundation``, ``context``, ``planes``), reusing those already there."""
    from .foundation_cache import build_foundation_cache, variant_name
    from .prepare import prepare_cases

    prepared = prepare_cases(cases, work)
    return build_foundation_cache(prepared, prompter, backend, work / "foundation" / variant_name(foundation, context, planes),
                                  jitter=0, device=device, reference_in_roi=False, progress=progress, context=context,
                                  planes=planes)


def foundation_cost(cache_paths: list[Path]) -> tuple[dict, list[dict]]:
    """The foundation stage's cost over cached cases: ``(summary, per-case rows)``.

    ``summary``: ``cases``, ``timed`` (cases with a recorded timing), ``untimed``, ``mean_s``,
    ``median_s``, ``total_s`` (seconds per case of the foundation stage, all planes),
    ``mean_slices`` (slices encoded per case, all planes) and ``per_plane`` (mean seconds and
    slices per plane). Rows: ``case``, ``plane``, ``seconds``, ``slices``.
    """
    from .foundation_cache import read_timing

    rows, totals, slices = [], [], []
    per_plane: dict[str, list[tuple[float, int]]] = {}
    for path in cache_paths:
        timing = read_timing(path)
        if not timing:
            continue
        totals.append(float(timing["foundation_s"]))
        slices.append(sum(int(v["slices"]) for v in timing.get("planes", {}).values()))
        for plane, v in timing.get("planes", {}).items():
            rows.append({"case": Path(path).stem, "plane": plane, "seconds": round(float(v["seconds"]), 4),
                         "slices": int(v["slices"])})
            per_plane.setdefault(plane, []).append((float(v["seconds"]), int(v["slices"])))
    summary = {
        "cases": len(cache_paths), "timed": len(totals), "untimed": len(cache_paths) - len(totals),
        "mean_s": round(statistics.fmean(totals), 3) if totals else None,
        "median_s": round(statistics.median(totals), 3) if totals else None,
        "total_s": round(sum(totals), 3) if totals else None,
        "mean_slices": round(statistics.fmean(slices), 1) if slices else None,
        "per_plane": {p: {"mean_s": round(statistics.fmean(t for t, _ in v), 3),
                          "mean_slices": round(statistics.fmean(n for _, n in v), 1)} for p, v in per_plane.items()},
    }
    return summary, rows


def _cost_line(cost: dict) -> str:
    if not cost["timed"]:
        return (f"Foundation stage cost: not recorded ({cost['untimed']} cases cached before timings existed; "
                "use a fresh --work folder to time them).\n")
    line = (f"Foundation stage cost: {cost['mean_s']:.1f} s per case on average (median {cost['median_s']:.1f} s, "
            f"{cost['mean_slices']:.0f} slices per case; {cost['timed']} cases timed")
    if cost["untimed"]:
        line += f", {cost['untimed']} cached before timings existed"
    return line + ").\n"


def _per_structure_table(rows: list[dict], variant: str) -> str:
    sel = [r for r in rows if r["variant"] == variant]
    summary = summarise(sel)
    agreement = volume_agreement(sel)
    lines = ["| structure | Dice | volume accuracy | HD95 (mm) | signed volume error % (mean +- SD) | volume slope | r |",
             "|---|---|---|---|---|---|---|"]
    for name, m in summary["per_structure"].items():
        a = agreement[name]
        lines.append(f"| {name} | {m['dice']:.3f} | {m['volume_accuracy']:.3f} | {m['hd95_mm']:.2f} | "
                     f"{a['signed_error_pct']:+.1f} +- {a['signed_error_sd_pct']:.1f} | {a['slope']:.2f} | {a['r']:.2f} |")
    m = summary["mean"]
    slopes = [a["slope"] for a in agreement.values() if not math.isnan(a["slope"])]
    mean_slope = f"{np.mean(slopes):.2f}" if slopes else "nan"
    lines.append(f"| **mean** | **{m['dice']:.3f}** | **{m['volume_accuracy']:.3f}** | **{m['hd95_mm']:.2f}** | | "
                 f"**{mean_slope}** | |")
    return ("\n".join(lines) + "\n\nVolume slope and r: predicted on reference volumes over the cases "
            "(1 = differences between subjects measured at full size; basalseg.evaluation).\n")


def evaluate_cohorts(cohorts: list[Path], work: Path, prompter: Path, students: dict[str, str], out: Path, *,
                     label_mapping: str | None = None, foundation: str = "litemedsam", checkpoint: str | None = None,
                     device: str | None = None, threads: int | None = None, context: bool = True,
                     planes: tuple[str, ...] = ("axial",), strides: tuple[int, ...] = (),
                     mirror: bool = True) -> None:
    """Score every variant (module docstring) on each held-out cohort and write the outputs into ``out``.

    Args:
        cohorts: held-out cohort folders (nnU-Net layout).
        work: working folder (prepared cases, foundation cache under ``work/<cohort>``).
        prompter: the prompter checkpoint.
        students: name -> student checkpoint, in order (the first is the method).
        label_mapping: JSON file, cohort label value -> FreeSurfer value.
        foundation, checkpoint, device, threads: the foundation backend, its weights, the device
            (None: CUDA when available) and torch's CPU threads.
        context, planes: the foundation variant.
        strides: also score ``--stride K`` runs for each K > 1 given (one plane only).
        mirror: students with left-right test-time augmentation, as ``segment`` runs them (the
            first also without: ``<first> (no TTA)``); False: single passes (``--no-mirror-tta``).

    Raises:
        BasalSegError: strides with several planes.
    """
    import torch
    from tqdm import tqdm

    from ..data.cohort import read_cohort
    from ..errors import BasalSegError
    from ..foundation import make_backend, pick_device
    from ..networks import load_checkpoint
    from ..outputs import atomic_write_text
    from .foundation_cache import variant_name

    if threads:
        torch.set_num_threads(threads)
    device = pick_device(device)
    planes = tuple(planes)
    variant = variant_name(foundation, context, planes)
    multi = len(planes) > 1
    strides = tuple(k for k in strides if k > 1)
    if strides and multi:
        raise BasalSegError("--stride is evaluated with one plane only")
    report_sections = []
    all_rows = []
    costs: dict[str, dict] = {}
    timing_rows: list[dict] = []
    for folder in cohorts:
        cases = read_cohort(folder, label_mapping)
        cohort_work = Path(work) / folder.name
        prompter_net, _ = load_checkpoint(prompter, "prompter", device)
        backend = make_backend(foundation, checkpoint, str(device))
        bar = tqdm(total=len(cases), desc=f"{folder.name}: foundation", unit="case")
        cache = heldout_cache(cases, cohort_work, prompter_net, backend, foundation, device, context, planes,
                              progress=lambda d, t: bar.update(d - bar.n))
        bar.close()
        cost, per_case = foundation_cost(cache)
        costs[folder.name] = cost
        timing_rows += [dict(r, cohort=folder.name) for r in per_case]
        bar = tqdm(total=len(cache), desc=f"{folder.name}: variants", unit="case")
        rows = evaluate_variants(cache, cohort_work / "cases", students, str(device), progress=lambda d, t: bar.update(d - bar.n),
                                 stride=strides, mirror=mirror)
        bar.close()
        for r in rows:
            r["cohort"] = folder.name
        all_rows += rows
        variants = ["prompter alone", "foundation alone"] + list(students)
        present = {r["variant"] for r in rows}
        for extra in ("uncalibrated", "no TTA", "expected volume"):  # the first student's extra rows, after it
            if students and f"{next(iter(students))} ({extra})" in present:
                variants.insert(3, f"{next(iter(students))} ({extra})")
        for stride in strides if students else ():
            variants += [f"foundation alone (stride {stride})", f"{next(iter(students))} (stride {stride})"]
        summaries = {v: summarise([r for r in rows if r["variant"] == v]) for v in variants}
        section = (f"## {folder.name} ({len(cases)} cases)\n\n"
                   f"Foundation variant `{variant}` (context {'on' if context else 'off'}, planes {', '.join(planes)})"
                   + ("; 'foundation alone' = each structure's majority vote of the planes (at least "
                      f"{len(planes) // 2 + 1} of {len(planes)}); students read the mean of the planes' SDMs" if multi else "")
                   + ".\n" + _cost_line(cost) + "\n" + markdown_table(summaries))
        if students:
            first = next(iter(students))
            section += f"\nPer structure, {first}:\n\n" + _per_structure_table(rows, first)
        report_sections.append(section)
        print(section)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.csv", metrics_csv(all_rows, extra_columns=("cohort", "variant")))
    summary = {c.name: {v: summarise([r for r in all_rows if r["cohort"] == c.name and r["variant"] == v])
                        for v in {r["variant"] for r in all_rows}} for c in cohorts}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "report.md", "# Held-out evaluation\n\n" + "\n".join(report_sections))
    atomic_write_text(out / "foundation.json", json.dumps(
        {"variant": variant, "foundation": foundation, "context": context, "planes": list(planes),
         "device": str(device), "foundation_alone": "majority vote of the planes" if multi else "the stacked masks",
         "cost": costs}, indent=1))
    lines = ["cohort,case,plane,seconds,slices"] + [f"{r['cohort']},{r['case']},{r['plane']},{r['seconds']},{r['slices']}"
                                                    for r in timing_rows]
    atomic_write_text(out / "foundation_timing.csv", "\n".join(lines) + "\n")
