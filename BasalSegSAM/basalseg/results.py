"""Write a :class:`~basalseg.pipeline.SegmentResult` (or a prompts-only run) to an output folder.

The folder's files are listed in :mod:`basalseg.outputs`. Everything is assembled in a staging
folder and appears at once, so a failed or cancelled run leaves nothing behind and existing
results are only replaced with ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .inputcheck import coverage_flags
from .outputs import (RESULT_FILES, StagedOutputDir, affine_is_orthogonal, json_text, nifti_bytes, seg_nrrd_bytes,
                      volume_rows, volumes_csv_text)
from .prompts import PromptSet
from .qc import overlay_png
from .uncertainty import UNCERTAINTY_COLUMNS, add_interval_columns
from .weights import sha256_file

__all__ = ["write_result", "write_prompts_only", "RESULT_FILES"]



def _input_record(volume) -> dict:
    record = {"path": volume.path, "shape": list(volume.shape), "spacing_mm": [round(float(s), 6) for s in volume.spacing],
              "affine": volume.affine.round(6).tolist()}
    if volume.path and Path(volume.path).is_file():
        record["sha256"] = sha256_file(volume.path)
    if volume.meta.get("notes"):
        record["notes"] = list(volume.meta["notes"])
    if not affine_is_orthogonal(volume.affine):
        record.setdefault("notes", []).append("sheared voxel axes: the labelmap's sform is exact, its qform unset")
    return record


def _record_files(folder: Path, provenance: dict) -> None:
    """``provenance["files"]``: the sha256 of every result file written (how a later run knows that
    a file is BasalSegSAM's own and unchanged; see :mod:`basalseg.staging`)."""
    provenance["files"] = {name: sha256_file(folder / name) for name in RESULT_FILES
                           if name != "provenance.json" and (folder / name).is_file()}


def write_result(result, out_dir: str | os.PathLike, overwrite: bool = False, qc: bool = True,
                 replace: str = "verified", protect=()) -> Path:
    """Write every output of a segmentation run; return the folder.

    Only the :data:`RESULT_FILES` are written or replaced; other files in ``out_dir`` stay as they
    are (see :class:`~basalseg.staging.StagedOutputDir` for ``replace`` and ``protect``).

    Raises:
        OutputExistsError: ``out_dir`` holds results and ``overwrite`` is False, or a file in the
            way is not BasalSegSAM's own.
        OutputWriteError: the folder cannot be written (nothing is left behind).
    """
    stage = StagedOutputDir(out_dir, overwrite=overwrite, owned=RESULT_FILES, replace=replace,
                            protect=[result.volume.path, *protect])
    with stage:
        folder = stage.path
        rows = volume_rows(result.labels, result.volume.voxel_volume_mm3)
        student_sha = ((result.provenance.get("weights") or {}).get("student") or {}).get("sha256")
        uncertainty = add_interval_columns(rows, getattr(result, "uncertainty", None), student_sha256=student_sha)
        (folder / "segmentation.nii.gz").write_bytes(nifti_bytes(result.labels, result.volume.affine))
        (folder / "segmentation.seg.nrrd").write_bytes(seg_nrrd_bytes(result.labels, result.volume.affine))
        (folder / "volumes.csv").write_text(volumes_csv_text(rows, trailing_columns=UNCERTAINTY_COLUMNS), encoding="utf-8")
        (folder / "prompts.json").write_text(json.dumps(result.prompts.to_dict(), indent=1), encoding="utf-8")
        if qc:
            title = f"BasalSegSAM {Path(result.volume.path).name if result.volume.path else ''}"
            (folder / "qc.png").write_bytes(overlay_png(result.image01, result.classes, result.prompts, title=title))
        provenance = dict(result.provenance)
        provenance.update({
            "input": _input_record(result.volume),
            "canonical_grid": result.grid.to_dict(),
            "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
            "structures_not_found": result.missing,
            "voxel_volume_mm3": result.volume.voxel_volume_mm3,
            "volume_uncertainty": uncertainty,
        })
        provenance["qc_flags"] = list(provenance.get("qc_flags") or []) + coverage_flags(result.labels)
        _record_files(folder, provenance)
        (folder / "provenance.json").write_text(json_text(provenance), encoding="utf-8")
    return Path(out_dir)


def write_prompts_only(prompts: PromptSet, image01, coarse, volume, out_dir: str | os.PathLike,
                       overwrite: bool = False, provenance: dict | None = None) -> Path:
    """Write ``prompts.json``, a QC picture of the prompter's regions with the boxes, and provenance
    (only these files are written or replaced; other files in ``out_dir`` stay as they are)."""
    with StagedOutputDir(out_dir, overwrite=overwrite, owned=RESULT_FILES, protect=[volume.path]) as stage:
        folder = stage.path
        (folder / "prompts.json").write_text(json.dumps(prompts.to_dict(), indent=1), encoding="utf-8")
        (folder / "qc.png").write_bytes(overlay_png(image01, coarse, prompts, title="BasalSegSAM prompts"))
        record = dict(provenance or {})
        record["input"] = _input_record(volume)
        record["canonical_grid"] = prompts.grid.to_dict()
        _record_files(folder, record)
        (folder / "provenance.json").write_text(json_text(record), encoding="utf-8")
    return Path(out_dir)
