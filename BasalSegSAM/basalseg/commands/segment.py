"""``basalseg segment T1 --out DIR``: the whole pipeline on one T1 volume."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Protocol

from .options import add_run_options, check_band, pipeline_config, progress_mode

__all__ = ["register", "run", "check_out", "qc_flags", "SliceCacheStore"]


class SliceCacheStore(Protocol):
    """Where a caller keeps the foundation model's slice masks between runs (the Slicer worker's
    ``--cache FILE``): :meth:`open` gives the :class:`~basalseg.foundation.runner.SliceMaskCache` to
    run with, :meth:`close` is called after the result is written and before the ``done`` event."""

    def open(self, volume, config):
        ...

    def close(self, result, mode: str) -> None:
        ...


def register(sub) -> None:
    p = sub.add_parser("segment", help="segment a T1 volume (NIfTI or NRRD)")
    p.add_argument("image", type=Path, help="T1 volume (.nii, .nii.gz, .nrrd)")
    add_run_options(p)
    p.set_defaults(handler=run)


def inputs(args: argparse.Namespace) -> list:
    """The run's input files, which an output folder may hold but never replace."""
    return [p for p in (getattr(args, "image", None), getattr(args, "prompts", None)) if p]


def check_out(args: argparse.Namespace) -> None:
    """Refuse an occupied output folder (or one whose result files are not ours) before any work."""
    from ..outputs import StagedOutputDir
    from ..results import RESULT_FILES

    StagedOutputDir(args.out, overwrite=args.overwrite, owned=RESULT_FILES, protect=inputs(args)).check_writable()


def run(args: argparse.Namespace, slice_cache: SliceCacheStore | None = None) -> int:
    """Segment ``args.image`` into ``args.out``; with ``slice_cache``, reuse and keep its slice masks."""
    from ..imageio import load_volume
    from ..progress import emit_json, make_reporter
    from ..prompts import load_prompts
    from ..results import write_result

    check_out(args)
    check_band(args)
    volume = load_volume(args.image)
    prompts = load_prompts(args.prompts) if args.prompts else None
    # the networks' libraries (torch, MONAI: seconds to import) only once the input has been read,
    # so that a wrong path, an occupied output folder or an unreadable image is reported at once
    from ..pipeline import Pipeline

    mode = progress_mode(args.progress)
    config = pipeline_config(args)
    extra = {"cache": slice_cache.open(volume, config)} if slice_cache is not None else {}
    reporter, close = make_reporter(mode)
    try:
        pipeline = Pipeline(config)
        result = pipeline.segment(volume, prompts=prompts, progress=reporter, **extra)
        write_result(result, args.out, overwrite=args.overwrite, qc=not args.no_qc, protect=inputs(args))
    finally:
        close()
    if slice_cache is not None:
        slice_cache.close(result, mode)
    if mode == "json":
        emit_json(event="done", out=str(args.out), qc_flags=qc_flags(args.out))
    else:
        _print_summary(result, args.out)
    return 0


def qc_flags(out: Path) -> list[dict]:
    """The ``qc_flags`` recorded in ``out/provenance.json`` (``[]`` when none or unreadable)."""
    try:
        flags = json.loads((Path(out) / "provenance.json").read_text(encoding="utf-8")).get("qc_flags") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in flags if isinstance(f, dict)]


def _print_summary(result, out: Path) -> None:
    from ..outputs import volume_rows

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
