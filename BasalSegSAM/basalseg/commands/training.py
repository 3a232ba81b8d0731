"""``basalseg train`` and ``basalseg synth``: a synthetic cohort, the training stages (:mod:`basalseg.training.run`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..options import LOCALISE_TRANSFORMS
from .options import add_device_option, add_foundation_options, add_threads_option, device

__all__ = ["register", "run_train", "run_synth"]


def _probability(text: str) -> float:
    """An argparse type: a probability in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a probability such as 0.5; got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expects a probability in [0, 1]; got {text!r}")
    return value


def register(sub) -> None:
    p = sub.add_parser("train", help="train the prompt generator and the student on labelled cohorts")
    p.add_argument("--cohort", action="append", required=True, type=Path,
                   help="cohort folder in nnU-Net layout (imagesTr/NAME_0000.nii.gz, labelsTr/NAME.nii.gz); repeatable")
    p.add_argument("--label-mapping", default=None, help="JSON file: cohort label value -> FreeSurfer value")
    p.add_argument("--work", required=True, type=Path, help="working folder for caches, runs and logs")
    p.add_argument("--stage", default="all", choices=["all", "prepare", "prompter", "cache", "student"])
    p.add_argument("--val", type=int, default=4, help="cases held out of training to pick the best epoch")
    add_foundation_options(p, checkpoint_help="foundation checkpoint (file or SAM-2 catalogue name)")
    add_device_option(p, help=None)
    add_threads_option(p)
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
    p.add_argument("--prompter-init", type=Path, default=None, metavar="CHECKPOINT",
                   help="prompter stage: start from this prompter checkpoint's weights (fine-tuning)")
    p.add_argument("--shard", default="0/1", help="K/N: the cache stage does every N-th case from the K-th "
                   "(run N processes with K=0..N-1 to use N cores)")
    p.add_argument("--split", type=Path, default=None, metavar="SPLIT_JSON",
                   help="validate on the validation cases of this earlier run's split.json (instead of --val); "
                        "for fine-tuning on a larger cohort")
    p.add_argument("--mirror", type=_probability, default=0.0, metavar="P",
                   help="student: probability of a left-right mirror augmentation (left/right labels and prior "
                        "channels swapped; default 0: none)")
    p.add_argument("--elastic", type=_probability, default=0.0, metavar="P",
                   help="student: probability of an elastic deformation of the training patch (image, foundation "
                        "masks and labels together; about 7 %% volume change per structure; default 0: none)")
    p.add_argument("--boundary-weight", type=float, default=0.5, help="final weight of the boundary loss")
    p.add_argument("--patch", type=int, default=96, help="student training patch side (voxels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue interrupted trainings from their last epoch")
    p.add_argument("--export", type=Path, default=None, help="write trained weights and manifest.json into this folder")
    p.set_defaults(handler=run_train)

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
    p.add_argument("--skull-stripped", action="store_true",
                   help="with --head: everything outside the brain set to 0 (skull-stripped brains in the heads' "
                        "poses, grids and contrasts)")
    p.add_argument("--localised", action="store_true",
                   help="with --head: write the heads to OUT/source and, into OUT, each one put through the "
                        "inference's brain localisation with its labels (basalseg.data.localised; failed "
                        "registrations dropped)")
    p.add_argument("--localise-transform", default=LOCALISE_TRANSFORMS[0], choices=list(LOCALISE_TRANSFORMS),
                   help="with --localised: the localisation's transform (default affine, inference's default since "
                        "2026-12-07; the localised cohorts of the shipped weights were made rigid)")
    p.add_argument("--artefacts", type=_probability, default=0.0, metavar="P",
                   help="with --head: probability of k-space artefacts per subject (Gibbs ringing and motion-like "
                        "ghosts; default 0: none)")
    p.add_argument("--structure-volume-range", type=float, default=None, metavar="R",
                   help="each structure's own volume change is drawn from U(1 +- R) (default 0.12; wider ranges "
                        "make subjects whose structures differ more from the template's)")
    p.add_argument("--prefix", default="synth", help="case names are PREFIX_0000, PREFIX_0001, ...")
    p.add_argument("--image-dtype", default="int16", choices=["int16", "float32"],
                   help="int16 stores intensity x 1000 (3x smaller files)")
    p.add_argument("--rescans", type=int, default=0,
                   help="also write K synthetic rescans of each subject, cases PREFIX_0000_r0 (the subject itself) "
                        "... PREFIX_0000_rK (docs/UNCERTAINTY.md): same anatomy and true volumes, a new pose and new "
                        "intensities; skull-stripped subjects also get new slice-thickness draws, while --head "
                        "rescans keep the subject's protocol (axis code, voxel size, slices, matrix; the head moved "
                        "by up to 6 deg / 5 mm, recorded per case in params.head.rescan)")
    p.set_defaults(handler=run_synth)


def run_train(args: argparse.Namespace) -> int:
    from ..training.run import train

    train(args.cohort, args.work, label_mapping=args.label_mapping, stage=args.stage, val=args.val,
          foundation=args.foundation, checkpoint=args.checkpoint, device=device(args), threads=args.threads,
          prompter_steps=args.prompter_steps, student_steps=args.student_steps, steps_per_epoch=args.steps_per_epoch,
          lr=args.lr, max_minutes=args.max_minutes, mode=args.mode, band=args.band, jitter=args.jitter,
          shard=args.shard, boundary_weight=args.boundary_weight, patch=args.patch, seed=args.seed,
          resume=args.resume, export=args.export, context=args.context, init=args.init,
          mirror=args.mirror, split=args.split, prompter_init=args.prompter_init,
          elastic=args.elastic)
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data.head import HeadConfig
    from ..data.generate import generate_cohort
    from ..data.synth import SynthConfig
    from ..errors import BasalSegError

    if args.rescans < 0:
        raise BasalSegError(f"--rescans must be >= 0, got {args.rescans}")
    if args.localised and not args.head:
        raise BasalSegError("--localised needs --head")
    if args.localised and args.rescans:
        raise BasalSegError("--localised makes training cohorts; rescans are for the repeatability study, which "
                            "segments the heads as a user would (give --head --rescans K without --localised)")
    if args.skull_stripped and not args.head:
        raise BasalSegError("--skull-stripped needs --head (the other subjects are skull-stripped already)")
    if args.artefacts and not args.head:
        raise BasalSegError("--artefacts needs --head")
    brain = SynthConfig(contrast=args.contrast)
    if args.structure_volume_range is not None:
        try:
            brain = SynthConfig(contrast=args.contrast, structure_volume_range=args.structure_volume_range)
        except ValueError as exc:
            raise BasalSegError(f"--structure-volume-range: {exc}") from None
    out = args.out / "source" if args.localised else args.out
    paths = []
    if not (args.localised and (out / "dataset.json").is_file()):  # a localised cohort's heads are made once
        bar = tqdm(total=args.n * (args.rescans + 1), desc=f"synth {args.out.name}", unit="scan")
        paths = generate_cohort(out, n=args.n, seed=args.seed, templates=args.template or ["mni152"],
                                config=brain, prefix=args.prefix,
                                image_dtype=args.image_dtype, progress=lambda done, total: bar.update(done - bar.n),
                                rescans=args.rescans, head=HeadConfig(skull_stripped=args.skull_stripped, artefact_prob=args.artefacts)
                                if args.head else None)
        bar.close()
    if args.localised:
        from ..data.localised import localise_cohort

        bar = tqdm(total=args.n, desc=f"localise {args.out.name}", unit="scan")
        paths = localise_cohort(out, args.out, progress=lambda done, total: bar.update(done - bar.n),
                                transform=args.localise_transform)
        bar.close()
    print(f"wrote {len(paths)} synthetic subjects to {args.out}")
    return 0
