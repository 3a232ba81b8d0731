"""``basalseg train`` and ``basalseg synth``: build a cohort, train, export weights.

``basalseg synth --out COHORT --n 60 --seed 0``
    a SynthSeg-style synthetic cohort from the bundled templates (:mod:`basalseg.data.synth`).

``basalseg train --cohort COHORT [--cohort ...] --work WORK [--stage all|prepare|prompter|cache|student]``
    1. prepare: every case to canonical space (``WORK/cases``);
    2. prompter: train the prompt generator (``WORK/prompter/prompter.pt``);
    3. cache: run the frozen foundation model once per case from the prompter's jittered prompts
       (``WORK/foundation/<backend>/``);
    4. student: train the student (``WORK/student-<mode>[-band<b>]-<backend>/student.pt``).
    ``--export DIR`` copies the trained networks into a weights folder with its manifest, which
    ``--weights DIR`` (or ``$BASALSEG_WEIGHTS``) then uses. Every stage skips work already done;
    ``--resume`` continues an interrupted network training from its last epoch.

Validation cases (``--val N``, default 4) are taken out of the training cases by a seeded
shuffle and used only to pick the best epoch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shutil
from pathlib import Path

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("train", help="train the prompt generator and the student on labelled cohorts")
    p.add_argument("--cohort", action="append", required=True, type=Path,
                   help="cohort folder in nnU-Net layout (imagesTr/NAME_0000.nii.gz, labelsTr/NAME.nii.gz); repeatable")
    p.add_argument("--label-mapping", default=None, help="JSON file: cohort label value -> FreeSurfer value")
    p.add_argument("--work", required=True, type=Path, help="working folder for caches, runs and logs")
    p.add_argument("--stage", default="all", choices=["all", "prepare", "prompter", "cache", "student"])
    p.add_argument("--val", type=int, default=4, help="cases held out of training to pick the best epoch")
    p.add_argument("--foundation", default="litemedsam", choices=["litemedsam", "sam2"])
    p.add_argument("--checkpoint", default=None, help="foundation checkpoint (file or SAM-2 catalogue name)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prompter-steps", type=int, default=1500)
    p.add_argument("--student-steps", type=int, default=1500)
    p.add_argument("--steps-per-epoch", type=int, default=50)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-minutes", type=float, default=None, help="stop each network's training after this long")
    p.add_argument("--mode", default="sdm", choices=["sdm", "mask", "t1"], help="student input (ablations: mask, t1)")
    p.add_argument("--band", type=float, default=10.0, help="SDM band half-width in voxels")
    p.add_argument("--jitter", type=int, default=2, help="box jitter (pixels) for the foundation cache")
    p.add_argument("--context", action="store_true", help="foundation cache with the 3-slice context (the pipeline's "
                   "default at inference; own cache folder WORK/foundation/<backend>-ctx3)")
    p.add_argument("--init", type=Path, default=None, metavar="CHECKPOINT",
                   help="student stage: start from this student checkpoint's weights (fine-tuning; same input mode)")
    p.add_argument("--shard", default="0/1", help="K/N: the cache stage does every N-th case from the K-th "
                   "(run N processes with K=0..N-1 to use N cores)")
    p.add_argument("--boundary-weight", type=float, default=0.5, help="final weight of the boundary loss")
    p.add_argument("--patch", type=int, default=96, help="student training patch side (voxels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue interrupted trainings from their last epoch")
    p.add_argument("--export", type=Path, default=None, help="write trained weights and manifest.json into this folder")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("synth", help="generate a synthetic labelled cohort from the bundled templates")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n", type=int, default=60, help="number of subjects")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", action="append", default=None, help="mni152 and/or icbm2009c (default: mni152)")
    p.add_argument("--contrast", default="template", choices=["template", "t1_gmm", "random_gmm"],
                   help="template intensities, or intensities drawn per label (see basalseg.data.synth)")
    p.add_argument("--head", action="store_true",
                   help="head-like subjects: skull, fat, muscle, neck around the brain, any pose, any axis code, "
                        "0.8-1.5 mm voxels, thick slices (basalseg.data.head)")
    p.add_argument("--localised", action="store_true",
                   help="with --head: write the heads to OUT/source and, into OUT, each one put through the "
                        "inference's brain localisation with its labels (basalseg.data.localised; failed "
                        "registrations dropped)")
    p.add_argument("--prefix", default="synth", help="case names are PREFIX_0000, PREFIX_0001, ...")
    p.add_argument("--image-dtype", default="int16", choices=["int16", "float32"],
                   help="int16 stores intensity x 1000 (3x smaller files)")
    p.add_argument("--rescans", type=int, default=0,
                   help="also write K synthetic rescans of each subject (same anatomy and true volumes, new pose, "
                        "bias, noise, blur, slice thickness and gamma draws); cases PREFIX_0000_r0 (the subject "
                        "itself) ... PREFIX_0000_rK (docs/UNCERTAINTY.md)")
    p.set_defaults(handler=cmd_synth)


def _split(names: list[str], n_val: int, seed: int) -> tuple[list[str], list[str]]:
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n_val = min(max(n_val, 0), max(len(order) - 1, 0))
    return sorted(order[n_val:]), sorted(order[:n_val])


def _run_name(mode: str, band: float, foundation: str) -> str:
    return f"student-{mode}" + (f"-band{band:g}" if mode == "sdm" else "") + f"-{foundation}"


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from ..data.cohort import read_cohort
    from ..errors import BasalSegError
    from ..foundation import make_backend, pick_device
    from ..networks import load_checkpoint
    from .foundation_cache import build_foundation_cache
    from .prepare import prepare_cases
    from .train_prompter import train_prompter
    from .train_student import train_student
    from .trainer import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(None if args.device in (None, "auto") else args.device)
    cases = [c for folder in args.cohort for c in read_cohort(folder, args.label_mapping)]
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise BasalSegError("case names repeat across cohorts; rename them so each is unique")
    work: Path = args.work
    stages = ["prepare", "prompter", "cache", "student"] if args.stage == "all" else [args.stage]
    train_names, val_names = _split(names, args.val, args.seed)
    (work).mkdir(parents=True, exist_ok=True)
    (work / "split.json").write_text(json.dumps({"train": train_names, "val": val_names}, indent=1))
    print(f"{len(cases)} cases: {len(train_names)} training, {len(val_names)} validation")

    prepared = {p.stem: p for p in prepare_cases(cases, work)}  # every stage needs them; cached
    prompter_dir = work / "prompter"
    if "prompter" in stages and not (prompter_dir / "prompter.pt").is_file():
        cfg = TrainConfig(args.prompter_steps, args.steps_per_epoch, args.lr, max_minutes=args.max_minutes, seed=args.seed)
        print("training the prompt generator:", train_prompter([prepared[n] for n in train_names],
                                                                [prepared[n] for n in val_names],
                                                                prompter_dir, cfg, args.resume, str(device)))
    from .foundation_cache import variant_name

    cache_dir = work / "foundation" / variant_name(args.foundation, args.context)
    if "cache" in stages:
        prompter, _ = load_checkpoint(prompter_dir / "prompter.pt", "prompter", device)
        backend = make_backend(args.foundation, args.checkpoint, str(device))
        from tqdm import tqdm

        k, n_shards = (int(v) for v in args.shard.split("/"))
        if not 0 <= k < n_shards:
            raise BasalSegError(f"--shard {args.shard}: need 0 <= K < N")
        mine = sorted(names)[k::n_shards]
        bar = tqdm(total=len(mine), desc=f"foundation cache ({args.foundation}, shard {args.shard})", unit="case")
        build_foundation_cache([prepared[n] for n in mine], prompter, backend, cache_dir, jitter=args.jitter,
                               seed=args.seed, device=device, context=args.context,
                               progress=lambda done, total: bar.update(done - bar.n))
        bar.close()
    run_dir = work / _run_name(args.mode, args.band, args.foundation)
    if "student" in stages and not (run_dir / "student.pt").is_file():
        cfg = TrainConfig(args.student_steps, args.steps_per_epoch, args.lr, max_minutes=args.max_minutes, seed=args.seed)
        print("training the student:", train_student([cache_dir / f"{n}.npz" for n in train_names],
                                                     [cache_dir / f"{n}.npz" for n in val_names], run_dir, cfg,
                                                     args.mode, args.band, args.resume, str(device),
                                                     a_max=args.boundary_weight, patch=args.patch, init=args.init))
    if args.export:
        export_weights(prompter_dir / "prompter.pt", run_dir / "student.pt", args.export, args.foundation,
                       cohorts=[str(c) for c in args.cohort])
        print(f"exported weights to {args.export}")
    return 0


def describe_cohort(folder: str | Path) -> dict:
    """What a training cohort was, for a weights manifest: its name, size and, for a synthetic cohort
    (``basalseg synth``), the seed, templates, atlas and contrast it was generated with (not the
    local path, which means nothing on another machine)."""
    folder = Path(folder)
    out: dict = {"name": folder.name}
    try:
        data = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return out
    out["cases"] = data.get("numTraining")
    synth = data.get("basalseg_synth")
    if isinstance(synth, dict):
        cases = synth.get("cases", [])
        out.update({"synthetic": True, "generator_version": synth.get("generator_version"),
                    "cohort_seed": synth.get("cohort_seed"),
                    "templates": sorted({c.get("template") for c in cases if c.get("template")}),
                    "atlas": sorted({c.get("atlas") for c in cases if c.get("atlas")}),
                    "contrast": synth.get("config", {}).get("contrast")})
    return out


def export_weights(prompter: Path, student: Path, folder: Path, foundation: str, cohorts: list[str]) -> None:
    """Copy trained networks into a weights folder and record them in its manifest."""
    from ..networks import load_checkpoint
    from ..weights import write_manifest_entry

    folder.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    for kind, src, name, file in (("prompter", prompter, "prompter", "prompter.pt"),
                                  ("student", student, f"student-{foundation}", f"student_{foundation}.pt")):
        if not src.is_file():
            continue
        _, meta = load_checkpoint(src, kind)
        shutil.copyfile(src, folder / f".{file}.tmp")
        (folder / f".{file}.tmp").replace(folder / file)
        entry = {"name": name, "kind": kind, "file": file, "trained": bool(meta.get("trained")), "date": date,
                 "training": {"cohorts": [describe_cohort(c) for c in cohorts], **{k: v for k, v in meta.get("training", {}).items() if k != "cases"},
                              "n_cases": len(meta.get("training", {}).get("cases", []))}}
        if kind == "student":
            entry.update({"foundation": foundation, "input_mode": meta.get("input_mode"), "band": meta.get("band")})
        write_manifest_entry(folder, entry)


def cmd_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data.head import HeadConfig
    from ..data.synth import SynthConfig, generate_cohort
    from ..errors import BasalSegError

    if args.rescans < 0:
        raise BasalSegError(f"--rescans must be >= 0, got {args.rescans}")
    if args.localised and not args.head:
        raise BasalSegError("--localised needs --head")
    out = args.out / "source" if args.localised else args.out
    bar = tqdm(total=args.n * (args.rescans + 1), desc=f"synth {args.out.name}", unit="scan")
    paths = [] if args.localised and (out / "dataset.json").is_file() else generate_cohort(out, n=args.n, seed=args.seed, templates=args.template or ["mni152"],
                            config=SynthConfig(contrast=args.contrast), prefix=args.prefix, image_dtype=args.image_dtype,
                            progress=lambda done, total: bar.update(done - bar.n), rescans=args.rescans,
                            head=HeadConfig() if args.head else None)
    bar.close()
    if args.localised:
        from ..data.localised import localise_cohort

        bar = tqdm(total=args.n, desc=f"localise {args.out.name}", unit="scan")
        paths = localise_cohort(out, args.out, progress=lambda done, total: bar.update(done - bar.n))
        bar.close()
    print(f"wrote {len(paths)} synthetic subjects to {args.out}")
    return 0
