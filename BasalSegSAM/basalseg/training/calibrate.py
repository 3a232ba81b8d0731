"""Fit a student's volume calibration on validation cases (``basalseg calibrate``, :func:`calibrate_student`).

::

    basalseg calibrate --cohort VAL_COHORT --work WORK --prompter PROMPTER.pt \\
        --student STUDENT.pt --out CALIBRATED.pt [--tie-sides] [--manifest WEIGHTS_DIR]
    basalseg calibrate --cohort TRAIN_COHORT ... --validation-split WORK/split.json ...

The validation cohort (nnU-Net layout) must be cases the student was **not trained on** and that
no reported evaluation uses (for the shipped student: the 4 validation cases of its training
split, listed in its checkpoint's ``meta["training"]["validation"]``). Each case runs as in
``basalseg evaluate-cohort`` (prepared case, prompter, foundation masks cached under
``WORK/<cohort>/foundation/<variant>``, the student on the inference crop); the student's
log-probabilities are kept and :func:`basalseg.calibration.fit_volume_offsets` fits one logit
offset per structure. The output is the same network with ``meta["calibration"]`` added
(offsets, cases, the mean log volume ratio per structure before and after); an existing output
file is refused unless ``--overwrite``. With ``--manifest DIR`` the output (which must be in
``DIR``) is recorded in that weights folder's ``manifest.json`` (sha256 updated, calibration
noted).

Cases that name training cases of the student are refused: fitting there would be fitting on
training data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["calibrate_student", "student_log_probs"]


def student_log_probs(net, case, meta: dict, device: str = "cpu", mirror: bool = False) -> np.ndarray:
    """``(9, X, Y, Z)`` log-softmax of the student on a cached case's crop (no calibration; with
    ``mirror``, of the left-right test-time augmentation's mean logits)."""
    import torch

    from ..student import build_student_input, predict_student

    inputs = build_student_input(case.image01, case.masks, meta.get("input_mode", "sdm"), float(meta.get("band", 10.0)))
    logits = predict_student(net, inputs, device, return_logits=True, mirror=mirror)
    return torch.log_softmax(torch.from_numpy(logits), dim=0).numpy()


def calibrate_student(cohorts: list[Path], work: Path, prompter: Path, student: Path, out: Path, *,
                      label_mapping: str | None = None, validation_split: Path | None = None,
                      overwrite: bool = False, tie_sides: bool = False, context: bool = True,
                      manifest: Path | None = None, foundation: str = "litemedsam", checkpoint: str | None = None,
                      device: str | None = None, threads: int | None = None, mirror: bool = True) -> None:
    """Fit ``student``'s volume calibration on the validation cases and write the calibrated checkpoint ``out``.

    Args:
        cohorts: validation cohort folders (nnU-Net layout), cases the student was not trained on.
        work: working folder (prepared cases and foundation cache under ``work/<cohort>``).
        prompter, student: checkpoints; out: the calibrated student checkpoint to write.
        label_mapping: JSON file, cohort label value -> FreeSurfer value.
        validation_split: only the cases listed under ``val`` in this split file (``basalseg train``'s
            ``WORK/split.json``).
        overwrite: replace an existing ``out``; tie_sides: one offset per left/right pair.
        context: foundation masks with 3-slice context (the pipeline's default).
        manifest: weights folder (holding ``out``) whose ``manifest.json`` records the calibration.
        foundation, checkpoint, device, threads: the foundation backend, its weights, the device
            (None: CUDA when available) and torch's CPU threads.
        mirror: fit the offsets on the left-right test-time augmentation's logits, as the pipeline
            runs the student by default (False: on single passes); recorded as ``mirror_tta``.

    Raises:
        BasalSegError: ``out`` exists, ``out`` outside ``manifest``, cases the student was trained on,
            no calibration case, a failed fit.
    """
    import torch

    from ..calibration import calibration_meta, fit_volume_offsets
    from ..data.cohort import read_cohort
    from ..errors import BasalSegError
    from ..foundation import make_backend, pick_device
    from ..networks import load_checkpoint, save_checkpoint
    from ..weights import write_manifest_entry
    from .evaluate_cohort import heldout_cache
    from .foundation_cache import load_cached_case
    from .prepare import load_prepared

    if threads:
        torch.set_num_threads(threads)
    if out.exists() and not overwrite:
        raise BasalSegError(f"{out} exists; pass --overwrite to replace it")
    if manifest is not None and out.resolve().parent != manifest.resolve():
        raise BasalSegError(f"--out must be inside the --manifest folder {manifest}")
    entry = _manifest_entry(manifest, out) if manifest is not None else None  # checked before any work
    device = pick_device(device)
    net, meta = load_checkpoint(student, "student", device)
    trained_on = set(meta.get("training", {}).get("cases", []))
    prompter_net, _ = load_checkpoint(prompter, "prompter", device)
    backend = make_backend(foundation, checkpoint, str(device))
    keep = None
    if validation_split is not None:
        try:
            keep = set(json.loads(validation_split.read_text(encoding="utf-8"))["val"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BasalSegError(f"{validation_split}: not a split file with a 'val' list ({exc})") from exc
    log_probs, refs, outside, names = [], [], [], []
    for folder in cohorts:
        cases = read_cohort(folder, label_mapping)
        if keep is not None:
            cases = [c for c in cases if c.name in keep]
            if not cases:
                continue
        leaked = sorted(c.name for c in cases if c.name in trained_on)
        if leaked:
            raise BasalSegError(f"{folder}: the student was trained on {', '.join(leaked)}; calibrate on other cases")
        cohort_work = Path(work) / folder.name
        for path in heldout_cache(cases, cohort_work, prompter_net, backend, foundation, device, context=context):
            case = load_cached_case(path)
            ref = load_prepared(cohort_work / "cases" / f"{case.name}.npz").classes
            roi = tuple(slice(s, s + n) for s, n in zip(case.roi_start, case.masks.shape[-3:]))
            out_of_crop = ref.copy()
            out_of_crop[roi] = 0
            log_probs.append(student_log_probs(net, case, meta, str(device), mirror=mirror))
            refs.append(ref[roi])
            outside.append(np.bincount(out_of_crop.ravel(), minlength=9)[:9])
            names.append(case.name)
            print(f"{case.name}: student run", flush=True)
    if not names:
        raise BasalSegError("no calibration cases: none of the cohorts' cases is in the validation split")
    try:
        offsets, report = fit_volume_offsets(log_probs, refs, outside, tie_sides=tie_sides)
    except ValueError as exc:
        raise BasalSegError(f"calibration failed: {exc}") from exc
    meta = dict(meta)
    meta["calibration"] = calibration_meta(offsets, names, report, tie_sides, context=context, mirror_tta=mirror)
    out.parent.mkdir(parents=True, exist_ok=True)
    arch = torch.load(student, map_location="cpu", weights_only=True)["architecture"]
    save_checkpoint(out, "student", arch, net, meta)
    print("logit offsets (background, then " + ", ".join(s for s in report["log_volume_ratio_before"]) + "):")
    print("  " + " ".join(f"{v:+.2f}" for v in offsets))
    print("mean log volume ratio per structure, before -> after:")
    for name, before in report["log_volume_ratio_before"].items():
        if before is None:
            print(f"  {name:16s} not in any calibration case: offset left at 0")
        else:
            print(f"  {name:16s} {before:+.3f} -> {report['log_volume_ratio_after'][name]:+.3f}")
    if entry is not None:
        entry["calibration"] = {k: meta["calibration"][k]
                                for k in ("method", "logit_offsets", "tie_sides", "context", "mirror_tta", "cases", "date")}
        write_manifest_entry(manifest, entry)  # recomputes the file's sha256
    print(f"wrote {out}")


def _manifest_entry(folder: Path, path: Path) -> dict:
    """A copy of the manifest entry of ``path`` (same file name) in ``folder``'s manifest."""
    from ..errors import BasalSegError
    from ..weights import MANIFEST_NAME

    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        entries = [m for m in manifest.get("models", []) if m.get("file") == path.name]
    except (OSError, ValueError, AttributeError) as exc:
        raise BasalSegError(f"{folder / MANIFEST_NAME}: cannot read the weights manifest ({exc})") from exc
    if not entries:
        raise BasalSegError(f"{folder / MANIFEST_NAME} lists no model file {path.name}")
    return dict(entries[0])
