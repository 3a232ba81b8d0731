"""The result folder: its files, writing them, and reading them back (the one owner of the format).

A ``segment`` result folder holds the :data:`RESULT_FILES` (formats in :mod:`basalseg.outputs`);
a ``prompts`` run writes ``prompts.json``, ``qc.png`` and ``provenance.json``. These names are the
only files BasalSegSAM ever replaces in an existing folder. Everything is assembled in a staging
folder and appears at once (:class:`~basalseg.staging.StagedOutputDir`), so a failed or cancelled
run leaves nothing behind and existing results are only replaced with ``overwrite=True``.
``provenance.json`` records the sha256 of every other file (``files``), so a reader can tell a
finished, unchanged result from a damaged one (:func:`result_state`: ``complete``, ``absent``,
``incomplete``).

A folder of result folders (``basalseg batch --out``) also holds :data:`FAILURES_NAME`
(``failures.csv``, :data:`FAILURE_COLUMNS`), the cohort report :data:`REPORT_NAME` and its
pictures in :data:`MONTAGE_DIR` (:mod:`basalseg.report`); :func:`find_results` reads the results
under it.

Writing: :func:`write_result`, :func:`write_prompts_only`, :func:`write_failures`. Reading:
:func:`result_state`, :func:`read_result` (a :class:`ResultRecord`), :func:`find_results`,
:func:`read_failures`. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .download import sha256_file
from .errors import BasalSegError
from .inputcheck import coverage_flags
from .outputs import (StagedOutputDir, affine_is_orthogonal, atomic_write_text, json_text, nifti_bytes, seg_nrrd_bytes,
                      volume_rows, volumes_csv_text)
from .prompts import PromptSet
from .qc import overlay_png
from .structures import STRUCTURES
from .uncertainty import UNCERTAINTY_COLUMNS, add_interval_columns

__all__ = ["RESULT_FILES", "FAILURES_NAME", "FAILURE_COLUMNS", "REPORT_NAME", "MONTAGE_DIR", "ResultRecord",
           "write_result", "write_prompts_only", "write_failures", "result_state", "read_result", "find_results",
           "read_failures"]

#: every file of a result folder; the only names ever replaced in an existing folder
RESULT_FILES = ("segmentation.nii.gz", "segmentation.seg.nrrd", "volumes.csv", "prompts.json", "qc.png", "provenance.json")
#: the table of scans without a result, at the top of a folder of results
FAILURES_NAME = "failures.csv"
FAILURE_COLUMNS = ["scan", "input", "kind", "message", "time"]
#: the cohort report and the folder of its pictures, at the top of a folder of results
REPORT_NAME = "report.html"
MONTAGE_DIR = "report"
_BY_KEY = {s.key: s for s in STRUCTURES}


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def _input_record(volume) -> dict:
    # absolute: the report and compare find the input from any working folder
    path = str(Path(volume.path).absolute()) if volume.path else volume.path
    record = {"path": path, "shape": list(volume.shape), "spacing_mm": [round(float(s), 6) for s in volume.spacing],
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


def write_failures(out_dir: str | os.PathLike, failures: list[dict]) -> Path:
    """Write ``OUT_DIR/failures.csv`` atomically (:data:`FAILURE_COLUMNS`; other keys are left out)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FAILURE_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(failures)
    path = Path(out_dir) / FAILURES_NAME
    atomic_write_text(path, buffer.getvalue())
    return path


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def result_state(folder: str | os.PathLike, verify: bool = True) -> tuple[str, str]:
    """Whether ``folder`` holds a finished result.

    Returns:
        ``("complete", "")``: every result file is there, ``provenance.json`` is a valid BasalSegSAM
        record and (``verify``) each file still has the sha256 it records; ``("absent", why)``: no
        folder or an empty one; ``("incomplete", why)``: anything else (the reason says what).
    """
    folder = Path(folder)
    if not folder.exists():
        return "absent", "no result folder"
    if not folder.is_dir():
        return "incomplete", f"{folder} is a file, not a result folder"
    if not any(folder.iterdir()):
        return "absent", "empty folder"
    prov_path = folder / "provenance.json"
    if not prov_path.is_file():
        return "incomplete", "no provenance.json"
    try:
        prov = json.loads(prov_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return "incomplete", f"provenance.json is not valid JSON ({type(exc).__name__})"
    if not isinstance(prov, dict) or "basalseg" not in prov or not isinstance(prov.get("files"), dict):
        return "incomplete", "provenance.json is not the record of a BasalSegSAM segmentation"
    for name in RESULT_FILES:
        if name in ("qc.png", "provenance.json"):  # qc.png is optional (--no-qc)
            continue
        if not (folder / name).is_file():
            return "incomplete", f"{name} is missing"
    for name, digest in prov["files"].items():
        path = folder / name
        if not path.is_file():
            return "incomplete", f"{name} is missing"
        if verify and digest and sha256_file(path) != digest:
            return "incomplete", f"{name} was changed after it was written (sha256 differs from provenance.json)"
    return "complete", ""


@dataclass
class ResultRecord:
    """One complete result folder, as read back from disk.

    Attributes:
        folder: the folder; ``name`` is its name (the scan id in cohort tables).
        provenance: ``provenance.json``.
        volumes: ``volumes.csv`` rows (``structure, label, voxels, volume_mm3, volume_ml``, numbers parsed,
            and the interval columns ``volume_ml_low, volume_ml_high, expected_ml, band_ml``: None when
            absent or blank).
    """

    folder: Path
    provenance: dict
    volumes: list[dict]

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def scan_info(self) -> dict:
        return self.provenance.get("scan_info") or {}

    @property
    def subject(self) -> str:
        return self.scan_info.get("subject") or self.name

    @property
    def session(self) -> str:
        return self.scan_info.get("session") or ""

    @property
    def session_date(self) -> str:
        return self.scan_info.get("session_date") or ""

    @property
    def brain(self) -> dict:
        return self.provenance.get("brain_volume") or {}

    @property
    def dice(self) -> dict:
        return self.provenance.get("foundation_student_dice") or {}

    @property
    def missing(self) -> list[str]:
        return list(self.provenance.get("structures_not_found") or [])

    @property
    def input(self) -> dict:
        return self.provenance.get("input") or {}

    @property
    def spacing(self) -> tuple[float, ...] | None:
        spacing = self.input.get("spacing_mm")
        return tuple(float(s) for s in spacing) if spacing else None

    def _row(self, structure: str) -> dict:
        name = _BY_KEY[structure].name if structure in _BY_KEY else structure
        for row in self.volumes:
            if row["structure"] == name:
                return row
        raise KeyError(structure)

    def volume_ml(self, structure: str) -> float:
        """Volume of a structure (key or FreeSurfer name) in mL."""
        return self._row(structure)["volume_ml"]

    def interval(self, structure: str) -> tuple[float, float] | None:
        """The 95 % volume interval ``(low, high)`` in mL (``volumes.csv``), None when the result has none."""
        row = self._row(structure)
        low, high = row.get("volume_ml_low"), row.get("volume_ml_high")
        return None if low is None or high is None else (low, high)

    def band_ml(self, structure: str) -> float | None:
        """The ``band_ml`` uncertainty measure of a structure (:mod:`basalseg.uncertainty`), or None."""
        return self._row(structure).get("band_ml")


def _read_volumes(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for row in rows:
        try:
            parsed = {"structure": row["structure"], "label": int(row["label"]), "voxels": int(row["voxels"]),
                      "volume_mm3": float(row["volume_mm3"]), "volume_ml": float(row["volume_ml"])}
            for column in UNCERTAINTY_COLUMNS:  # optional (results before 2026-12-02, --no-uncertainty: absent/blank)
                value = (row.get(column) or "").strip()
                parsed[column] = float(value) if value else None
            out.append(parsed)
        except (KeyError, TypeError, ValueError) as exc:
            raise BasalSegError(f"{path}: not a BasalSegSAM volumes table ({type(exc).__name__}: {exc})") from exc
    if sorted(r["structure"] for r in out) != sorted(s.name for s in STRUCTURES):
        raise BasalSegError(f"{path}: expected one row for each of the 8 structures")
    return out


def read_result(folder: str | os.PathLike, verify: bool = True) -> ResultRecord:
    """Read a complete result folder.

    Raises:
        BasalSegError: the folder is not a complete BasalSegSAM result (the message says why).
    """
    folder = Path(folder)
    state, reason = result_state(folder, verify=verify)
    if state != "complete":
        hint = ""
        if not (folder / "provenance.json").exists() and folder.is_dir() and any(
                (sub / "provenance.json").is_file() for sub in folder.iterdir() if sub.is_dir()):
            hint = " (it holds result folders: give one of them, e.g. a scan's folder of a batch)"
        raise BasalSegError(f"{folder} is not a complete BasalSegSAM result folder: {reason}{hint}")
    provenance = json.loads((folder / "provenance.json").read_text(encoding="utf-8"))
    return ResultRecord(folder=folder, provenance=provenance, volumes=_read_volumes(folder / "volumes.csv"))


def find_results(out_dir: str | os.PathLike, verify: bool = True) -> tuple[list[ResultRecord], list[tuple[Path, str]]]:
    """Complete result folders directly under ``out_dir`` (sorted by name), and ``(folder, reason)``
    for sub-folders that look like unfinished or damaged results (they hold a ``provenance.json``
    or a ``segmentation.nii.gz`` but are not complete). Hidden folders and ``report/`` are skipped."""
    out_dir = Path(out_dir)
    records, broken = [], []
    if not out_dir.is_dir():
        return records, broken
    for folder in sorted(p for p in out_dir.iterdir() if p.is_dir()):
        if folder.name.startswith(".") or folder.name == MONTAGE_DIR:
            continue
        state, reason = result_state(folder, verify=verify)
        if state == "complete":
            try:
                records.append(read_result(folder, verify=False))
            except BasalSegError as exc:
                broken.append((folder, str(exc)))
        elif state == "incomplete" and ((folder / "provenance.json").exists() or (folder / "segmentation.nii.gz").exists()):
            broken.append((folder, reason))
    return records, broken


def read_failures(out_dir: str | os.PathLike) -> list[dict]:
    """Rows of ``OUT_DIR/failures.csv`` (empty when there is none)."""
    path = Path(out_dir) / FAILURES_NAME
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: row.get(k) or "" for k in FAILURE_COLUMNS} for row in csv.DictReader(handle)]
