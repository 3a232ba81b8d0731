"""The options several subcommands share, each declared once, and what they turn into.

Each ``add_*`` function adds one option (or one group) to a subcommand's parser with its name,
type, choices and default; a subcommand may word the help in its own terms (``help=``), never
the option itself. :func:`pipeline_config` turns a ``segment``/``batch`` namespace into a
:class:`~basalseg.pipeline.PipelineConfig`, passing only what the command line has an option for,
so the pipeline's defaults live in the dataclass alone.

Importing this module imports neither torch nor a POSIX-only module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..options import DEVICES, ENCODERS, FOUNDATIONS, LOCALISE_MODES, LOCALISE_TRANSFORMS, PLANES, PROGRESS_MODES

__all__ = ["out_folder", "parse_planes", "add_out_option", "add_overwrite_option", "add_device_option",
           "add_threads_option", "add_progress_option", "add_weights_option", "add_foundation_options",
           "add_encoder_option", "add_stride_option", "add_context_option", "add_planes_option", "add_run_options",
           "device", "progress_mode", "check_band", "pipeline_config", "LOCALISE_DEFAULT"]

_DEVICE_HELP = "default: cuda when available, else cpu"

#: brain localisation on the command line: ``auto`` for every command (``--localise`` where it has
#: one), while :class:`~basalseg.pipeline.PipelineConfig` itself defaults to ``off`` for library use.
LOCALISE_DEFAULT = "auto"


def out_folder(text: str) -> Path:
    """``--out``: a folder name; an empty one is refused (``Path("")`` would silently mean ``.``)."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("empty output folder name; name a folder, e.g. --out results")
    return Path(text)


def parse_planes(text: str) -> tuple[str, ...]:
    """``--planes``: comma-separated plane names -> a tuple in the fixed order axial, coronal, sagittal."""
    names = [p.strip().lower() for p in str(text).split(",") if p.strip()]
    unknown = [p for p in names if p not in PLANES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{unknown[0] if unknown else text!r} is not a plane list; give comma-separated names from "
            f"{', '.join(PLANES)} (e.g. axial,coronal,sagittal)")
    return tuple(p for p in PLANES if p in names)


# ---------------------------------------------------------------------------------------------
# one option each
# ---------------------------------------------------------------------------------------------


def add_out_option(p, *, default: Path | None = None, help: str | None = None) -> None:
    """``--out FOLDER`` (required unless a default is given)."""
    if default is None:
        p.add_argument("--out", required=True, type=out_folder, help=help)
    else:
        p.add_argument("--out", type=out_folder, default=default, help=help)


def add_overwrite_option(p, *, help: str | None = None) -> None:
    p.add_argument("--overwrite", action="store_true", help=help)


def add_device_option(p, *, help: str | None = _DEVICE_HELP) -> None:
    """``--device cpu|cuda|auto``; read it with :func:`device`."""
    p.add_argument("--device", default=None, choices=list(DEVICES), help=help)


def add_threads_option(p, *, help: str | None = None) -> None:
    p.add_argument("--threads", type=int, default=None, help=help)


def add_progress_option(p, *, help: str | None = None) -> None:
    """``--progress auto|bar|json|none``; read it with :func:`progress_mode`."""
    p.add_argument("--progress", default="auto", choices=list(PROGRESS_MODES), help=help)


def add_weights_option(p, *, help: str) -> None:
    p.add_argument("--weights", default=None, help=help)


def add_foundation_options(p, *, help: str | None = None, checkpoint_help: str | None = None) -> None:
    """``--foundation litemedsam|sam2`` and ``--checkpoint``."""
    p.add_argument("--foundation", default="litemedsam", choices=list(FOUNDATIONS), help=help)
    p.add_argument("--checkpoint", default=None, help=checkpoint_help)


def add_encoder_option(p, *, help: str) -> None:
    p.add_argument("--encoder", default="fused", choices=list(ENCODERS), help=help)


def add_stride_option(p, *, help: str) -> None:
    p.add_argument("--stride", type=int, default=1, help=help)


def add_context_option(p, *, help: str) -> None:
    p.add_argument("--context", action=argparse.BooleanOptionalAction, default=True, help=help)


def add_planes_option(p, *, help: str) -> None:
    p.add_argument("--planes", type=parse_planes, default=("axial",), metavar="PLANE[,PLANE...]", help=help)


# ---------------------------------------------------------------------------------------------
# the options of a pipeline run (segment, prompts, batch)
# ---------------------------------------------------------------------------------------------


def add_run_options(p, with_student: bool = True) -> None:
    """The options of ``segment`` (``prompts``: without the foundation/student ones)."""
    add_out_option(p, help="output folder: new, or one without results in it unless --overwrite (other files in it "
                           "are never touched)")
    add_overwrite_option(p, help="replace BasalSegSAM's own result files already in --out (only those; never other "
                                 "files)")
    add_device_option(p)
    add_weights_option(p, help="folder with prompter/student weights and manifest.json (default: shipped)")
    p.add_argument("--prompter", default=None, help="prompt-generator checkpoint file (overrides --weights)")
    add_threads_option(p, help="CPU threads for torch")
    add_progress_option(p, help="progress display: a bar on a terminal, JSON lines for a parent process")
    p.add_argument("--localise", default=LOCALISE_DEFAULT, choices=list(LOCALISE_MODES),
                   help="brain localisation for whole heads and skull-stripped brains in any pose: registration "
                        "to the MNI152 brain (see --localise-transform), skull-stripped resampling onto its grid, "
                        "results mapped back (auto: every input holding a whole brain; not a crop smaller than a "
                        "brain, nor with --prompts made on the input's own grid; basalseg.localise)")
    p.add_argument("--localise-transform", default=LOCALISE_TRANSFORMS[0], choices=list(LOCALISE_TRANSFORMS),
                   help="how a localised input is aligned to the brain template: affine (default: the rigid "
                        "registration refined to 12 parameters, so the networks see the brain at the template's "
                        "size and shape; volumes are still measured on the input grid) or rigid (before "
                        "2026-12-07)")
    if not with_student:
        return
    add_foundation_options(p, help="frozen 2D foundation model (litemedsam works offline)",
                           checkpoint_help="foundation weights: a file, or for sam2 a catalogue name such as "
                                           "sam2.1_hiera_tiny")
    p.add_argument("--student", default=None, help="student checkpoint file (overrides --weights)")
    p.add_argument("--prompts", default=None, type=Path, help="use these (edited) prompts instead of the prompt generator")
    p.add_argument("--band", type=float, default=None,
                   help="SDM band half-width in voxels (default: the band the student was trained with; 5 for the shipped one)")
    p.add_argument("--no-crop", action="store_true", help="encode whole slices instead of the region of interest")
    add_stride_option(p, help="encode every k-th prompted slice and interpolate the others (faster; changes the "
                              "foundation masks, see benchmarks/README.md; default 1 = every slice)")
    add_encoder_option(p, help="LiteMedSAM encoder implementation: fused (default), onnx (ONNX Runtime, needs "
                               "onnxruntime and onnx), compile (torch.compile, for long cohort runs), torch (plain)")
    add_context_option(p, help="3-slice context: give the foundation model slices k-1, k, k+1 as its colour channels "
                               "instead of slice k repeated (default; --no-context: slice k repeated; "
                               "docs/CONTEXT_AND_PLANES.md)")
    add_planes_option(p, help="foundation planes: axial (default) or e.g. axial,coronal,sagittal to also run the "
                              "foundation model on coronal and sagittal slices and fuse the planes' SDM channels "
                              "(coronal/sagittal prompts come from the prompt generator; docs/CONTEXT_AND_PLANES.md)")
    p.add_argument("--no-calibration", action="store_true",
                   help="ignore the student's volume calibration (per-structure logit offsets fitted on "
                        "validation cases; README 'Results')")
    p.add_argument("--mirror-tta", action=argparse.BooleanOptionalAction, default=True,
                   help="left-right test-time augmentation: the student also reads the mirrored crop and the two "
                        "are averaged (default; one more student pass; --no-mirror-tta: one pass, README 'Results')")
    p.add_argument("--no-uncertainty", action="store_true",
                   help="skip the per-structure 95 %% volume intervals (volumes.csv's volume_ml_low/high columns "
                        "stay blank; docs/UNCERTAINTY.md)")
    p.add_argument("--no-qc", action="store_true", help="skip the QC picture")


# ---------------------------------------------------------------------------------------------
# what the options mean
# ---------------------------------------------------------------------------------------------


def device(args: argparse.Namespace) -> str | None:
    """``--device``: ``"cpu"``, ``"cuda"``, or None for ``auto`` / not given (CUDA when available)."""
    value = getattr(args, "device", None)
    return None if value in (None, "auto") else value


def progress_mode(mode: str) -> str:
    """``--progress auto`` resolved: a bar on a terminal, nothing otherwise."""
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "none"
    return mode


def check_band(args: argparse.Namespace) -> None:
    """``--band`` must be positive (None: the student's own)."""
    from ..errors import BasalSegError

    if getattr(args, "band", None) is not None and args.band <= 0:
        raise BasalSegError(f"--band must be > 0, got {args.band}")


#: PipelineConfig field -> how to read it from the namespace (only for options the command has).
_CONFIG_FIELDS = {
    "foundation": lambda a: a.foundation,
    "checkpoint": lambda a: a.checkpoint,
    "weights_dir": lambda a: a.weights,
    "prompter_checkpoint": lambda a: a.prompter,
    "student_checkpoint": lambda a: a.student,
    "band": lambda a: a.band,
    "crop": lambda a: not a.no_crop,
    "stride": lambda a: a.stride,
    "threads": lambda a: a.threads,
    "context": lambda a: bool(a.context),
    "planes": lambda a: tuple(a.planes),
    "calibrate": lambda a: not a.no_calibration,
    "mirror_tta": lambda a: bool(a.mirror_tta),
    "localise": lambda a: a.localise or LOCALISE_DEFAULT,
    "localise_transform": lambda a: a.localise_transform,
}


def pipeline_config(args: argparse.Namespace):
    """The :class:`~basalseg.pipeline.PipelineConfig` of a command's options.

    Only the fields the command has an option for are passed (``prompts`` has no ``--foundation``,
    for instance); every other field keeps the dataclass's default, except ``localise``, which is
    :data:`LOCALISE_DEFAULT` on the command line. ``--device auto`` is None,
    ``--encoder`` only applies to LiteMedSAM and ``--no-uncertainty`` is ``uncertainty="none"``.
    """
    from ..pipeline import PipelineConfig

    options = vars(args)
    given = {}
    for name, read in _CONFIG_FIELDS.items():
        try:
            given[name] = read(args)
        except AttributeError:  # the command has no such option
            continue
    given["device"] = device(args)
    given.setdefault("localise", LOCALISE_DEFAULT)
    if options.get("encoder") and given.get("foundation", "litemedsam") == "litemedsam":
        given["backend_options"] = {"encoder": args.encoder}
    if options.get("no_uncertainty"):
        given["uncertainty"] = "none"
    return PipelineConfig(**given)
