"""``basalseg calibrate``: fit a student's volume calibration on validation cases.

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

import argparse
import json
from pathlib import Path

import numpy as np

__all__ = ["register", "student_log_probs"]


def student_log_probs(net, case, meta: dict, device: str = "cpu") -> np.ndarray:
    """``(9, X, Y, Z)`` log-softmax of the student on a cached case's crop (no calibration)."""
    import torch

    from ..student import build_student_input, predict_student

    inputs = build_student_input(case.image01, case.masks, meta.get("input_mode", "sdm"), float(meta.get("band", 10.0)))
    logits = predict_student(net, inputs, device, return_logits=True)
    return torch.log_softmax(torch.from_numpy(logits), dim=0).numpy()


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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--tie-sides", action="store_true", help="one offset per left/right pair")
    p.add_argument("--context", action=argparse.BooleanOptionalAction, default=True,
                   help="foundation masks with 3-slice context, as the pipeline's default (--no-context: without)")
    p.add_argument("--manifest", type=Path, default=None,
                   help="weights folder whose manifest.json should record the calibrated student (--out must be in it)")
    p.add_argument("--foundation", default="litemedsam", choices=["litemedsam", "sam2"])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(handler=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
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

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out.exists() and not args.overwrite:
        raise BasalSegError(f"{args.out} exists; pass --overwrite to replace it")
    if args.manifest is not None and args.out.resolve().parent != args.manifest.resolve():
        raise BasalSegError(f"--out must be inside the --manifest folder {args.manifest}")
    entry = _manifest_entry(args.manifest, args.out) if args.manifest is not None else None  # checked before any work
    device = pick_device(None if args.device in (None, "auto") else args.device)
    net, meta = load_checkpoint(args.student, "student", device)
    trained_on = set(meta.get("training", {}).get("cases", []))
    prompter, _ = load_checkpoint(args.prompter, "prompter", device)
    backend = make_backend(args.foundation, args.checkpoint, str(device))
    keep = None
    if args.validation_split is not None:
        try:
            keep = set(json.loads(args.validation_split.read_text(encoding="utf-8"))["val"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BasalSegError(f"{args.validation_split}: not a split file with a 'val' list ({exc})") from exc
    log_probs, refs, outside, names = [], [], [], []
    for folder in args.cohort:
        cases = read_cohort(folder, args.label_mapping)
        if keep is not None:
            cases = [c for c in cases if c.name in keep]
            if not cases:
                continue
        leaked = sorted(c.name for c in cases if c.name in trained_on)
        if leaked:
            raise BasalSegError(f"{folder}: the student was trained on {', '.join(leaked)}; calibrate on other cases")
        work = args.work / folder.name
        for path in heldout_cache(cases, work, prompter, backend, args.foundation, device, context=args.context):
            case = load_cached_case(path)
            ref = load_prepared(work / "cases" / f"{case.name}.npz").classes
            roi = tuple(slice(s, s + n) for s, n in zip(case.roi_start, case.masks.shape[-3:]))
            out_of_crop = ref.copy()
            out_of_crop[roi] = 0
            log_probs.append(student_log_probs(net, case, meta, str(device)))
            refs.append(ref[roi])
            outside.append(np.bincount(out_of_crop.ravel(), minlength=9)[:9])
            names.append(case.name)
            print(f"{case.name}: student run", flush=True)
    if not names:
        raise BasalSegError("no calibration cases: none of the cohorts' cases is in the validation split")
    try:
        offsets, report = fit_volume_offsets(log_probs, refs, outside, tie_sides=args.tie_sides)
    except ValueError as exc:
        raise BasalSegError(f"calibration failed: {exc}") from exc
    meta = dict(meta)
    meta["calibration"] = calibration_meta(offsets, names, report, args.tie_sides, context=args.context)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    arch = torch.load(args.student, map_location="cpu", weights_only=True)["architecture"]
    save_checkpoint(args.out, "student", arch, net, meta)
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
                                for k in ("method", "logit_offsets", "tie_sides", "context", "cases", "date")}
        write_manifest_entry(args.manifest, entry)  # recomputes the file's sha256
    print(f"wrote {args.out}")
    return 0


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
