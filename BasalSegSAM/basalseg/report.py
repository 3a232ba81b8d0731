"""Reading result folders, QC montages, and the cohort HTML report.

``basalseg report OUT_DIR [--embed] [thresholds]`` writes ``OUT_DIR/report.html`` from every
complete result folder directly under ``OUT_DIR`` (the layout ``basalseg batch`` writes, but any
folder of ``basalseg segment`` results works), and lists the scans of ``OUT_DIR/failures.csv``
when a batch left one.
``basalseg batch`` calls it at the end of every run.

**The page** lists every scan with its QC montage, its eight volumes, the brain-mask and brain
volumes (:mod:`basalseg.icv`), the left/right asymmetry indices, the foundation-vs-student
agreement, and its flags; then the scans that failed. The montages are PNG files in
``OUT_DIR/report/`` linked by relative paths (keep that folder next to ``report.html``), or,
with ``--embed``, inlined as base64 so that ``report.html`` is a single file. No network access,
no external scripts or styles; a few lines of inline JavaScript only add a "flagged scans only"
filter (the page is complete without it).

**Montages** (:func:`montage_png`): ``n`` axial slices (top row, anterior up) and ``n`` coronal
slices (bottom row, superior up) spread over the structures' extent, radiological convention
(the patient's right on the picture's left, as in 3D Slicer, marked "R"), structures filled in
their FreeSurfer colours (40 % opacity) with an opaque outline, prompt boxes optional. The
report makes them from the input image (path and sha256 in ``provenance.json``) and
``segmentation.nii.gz``; when the input is gone or changed it shows the folder's ``qc.png``.

**Flags** (defaults; each threshold is an option of ``basalseg report``):

``outlier``
    a structure's volume outside Tukey's fences of the cohort, ``[Q1 - 1.5 IQR, Q3 + 1.5 IQR]``
    over the scans where that structure was segmented (non-zero), quartiles by linear
    interpolation; applied only when at least 5 scans have the structure (``--min-cohort``).
    Raw volumes, not normalised: in a cohort spanning ages, growth itself can push scans out.
``asymmetry``
    asymmetry index ``AI = |L - R| / ((L + R) / 2)`` of a left/right pair above 0.20 (20 %).
    Not computed when either side is missing (that is flagged as ``missing``).
``missing``
    structures the prompt generator did not find (``structures_not_found`` in provenance, left
    empty), or found but with an empty labelmap.
``disagreement``
    Dice between the stacked foundation-model masks and the student's labels on the slices that
    carried prompts for that structure (``foundation_student_dice`` in provenance) below 0.70.
``partial_coverage``, ``implausible`` (and any other ``qc_flags`` kind the pipeline recorded in
    ``provenance.json`` that the report does not compute itself)
    structures reaching the edge of the field of view (their volumes may be too small), volumes
    outside the plausible range, as the flag's message says.
``failed``
    the scan has no result: reading failed, the prompt generator found nothing
    (``NothingFoundError``), ...; message from ``failures.csv``.

Cohort-level warnings list differing weights, foundation backends, options or basalseg versions
among the results, and differing voxel sizes.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .download import sha256_file as _sha256
from .errors import BasalSegError
from .metrics import dice
from .structures import STRUCTURES

__all__ = [
    "ResultRecord", "Thresholds", "Flag", "result_state", "read_result", "find_results", "read_failures",
    "foundation_student_dice", "montage_png", "montage_from_result", "montage_from_folder", "asymmetry_indices",
    "cohort_flags", "build_report", "REPORT_NAME", "MONTAGE_DIR", "FAILURES_NAME", "PAIRS",
]

#: the files of a result folder, as :data:`basalseg.results.RESULT_FILES` (copied so that reading
#: results does not import torch; a test keeps the two equal).
_RESULT_FILES = ("segmentation.nii.gz", "segmentation.seg.nrrd", "volumes.csv", "prompts.json", "qc.png", "provenance.json")
#: the optional interval columns of ``volumes.csv`` (:data:`basalseg.uncertainty.UNCERTAINTY_COLUMNS`).
_INTERVAL_COLUMNS = ("volume_ml_low", "volume_ml_high", "expected_ml", "band_ml")
REPORT_NAME = "report.html"
MONTAGE_DIR = "report"
FAILURES_NAME = "failures.csv"
FAILURE_COLUMNS = ["scan", "input", "kind", "message", "time"]
#: left/right pairs for the asymmetry index: (part, left structure, right structure)
PAIRS = tuple((s.key.split("_", 1)[1], s, r) for s in STRUCTURES if s.hemisphere == "left"
              for r in STRUCTURES if r.key == "right_" + s.key.split("_", 1)[1])
_BY_KEY = {s.key: s for s in STRUCTURES}
_BY_NAME = {s.name: s for s in STRUCTURES}


# ---------------------------------------------------------------------------------------------
# result folders
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
    for name in _RESULT_FILES:
        if name in ("qc.png", "provenance.json"):  # qc.png is optional (--no-qc)
            continue
        if not (folder / name).is_file():
            return "incomplete", f"{name} is missing"
    for name, digest in prov["files"].items():
        path = folder / name
        if not path.is_file():
            return "incomplete", f"{name} is missing"
        if verify and digest and _sha256(path) != digest:
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
            for column in _INTERVAL_COLUMNS:  # optional (results before 2026-12-02, --no-uncertainty: absent/blank)
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
        raise BasalSegError(f"{folder} is not a complete BasalSegSAM result folder: {reason}")
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


# ---------------------------------------------------------------------------------------------
# foundation vs student
# ---------------------------------------------------------------------------------------------


def foundation_student_dice(masks: np.ndarray, classes: np.ndarray, prompts) -> dict[str, float | None]:
    """Per structure (key), Dice between the stacked foundation masks and the student's labels,
    over the axial slices that carried a prompt for that structure (the only slices where the
    foundation model produced anything). None when the structure had no prompts, or neither
    labelling has a voxel there.

    Args:
        masks: ``(8, X, Y, Z)`` boolean foundation masks (``SegmentResult.masks``).
        classes: ``(X, Y, Z)`` student class indices on the same canonical grid (``SegmentResult.classes``).
        prompts: the :class:`~basalseg.prompts.PromptSet` used.
    """
    out: dict[str, float | None] = {}
    for s in STRUCTURES:
        ks = sorted({p.slice for p in prompts.for_structure(s.key)})
        if not ks:
            out[s.key] = None
            continue
        value = dice(masks[s.class_index - 1][:, :, ks], np.asarray(classes[:, :, ks]) == s.class_index, empty=None)
        out[s.key] = None if value is None else round(value, 4)
    return out


# ---------------------------------------------------------------------------------------------
# montages
# ---------------------------------------------------------------------------------------------

_ALPHA = 0.4


def _label(draw, xy: tuple[int, int], text: str, fill=(255, 255, 255)) -> None:
    """Text on a black box, legible over bright anatomy."""
    x, y = xy
    draw.rectangle([x - 1, y - 1, x + 6 * len(text) + 1, y + 10], fill=(0, 0, 0))
    draw.text((x, y), text, fill=fill)


def _blend(gray: np.ndarray, classes: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    rgb = np.repeat(np.clip(gray, 0, 1)[..., None] * 255.0, 3, axis=2)
    for s in STRUCTURES:
        mask = classes == s.class_index
        if mask.any():
            rgb[mask] = (1 - _ALPHA) * rgb[mask] + _ALPHA * np.asarray(s.color, float)
            edge = mask & ~ndimage.binary_erosion(mask)
            rgb[edge] = s.color
    return rgb.round().astype(np.uint8)


def montage_png(image01: np.ndarray, classes: np.ndarray, prompts=None, title: str | None = None, grid=None,
                n: int = 5, zoom: int = 2, crop_margin: int = 20) -> bytes:
    """A PNG: ``n`` axial (top) and ``n`` coronal (bottom) slices with the structures filled.

    Args:
        image01: ``(X, Y, Z)`` canonical image in [0, 1] (RAS+, :mod:`basalseg.spatial`).
        classes: class indices on the same grid.
        prompts: draw these boxes on the axial slices that carry them.
        title: text at the top.
        grid: the canonical :class:`~basalseg.spatial.Grid`, to label slices in mm (else indices).
        n, zoom, crop_margin: slices per row, magnification, voxels kept around the structures.
    """
    from PIL import Image, ImageDraw

    from .qc import pick_slices
    from .spatial import bounding_box

    box = bounding_box(classes > 0, crop_margin) or tuple(slice(0, s) for s in classes.shape)
    img_c, cls_c = image01[box], classes[box]
    off = [b.start for b in box]
    nx, ny, nz = cls_c.shape

    def world(axis: int, index: int) -> str:
        if grid is None:
            return f"{'ijk'[axis]}={index + off[axis]}"
        value = float(grid.affine[axis, 3] + grid.affine[axis, axis] * (index + off[axis]))
        return f"{'xyz'[axis]}={value:+.0f}mm"

    tiles_ax, tiles_co = [], []
    for k in pick_slices(cls_c, 2, n):
        rgb = _blend(img_c[::-1, ::-1, k].T, cls_c[::-1, ::-1, k].T)  # rows anterior->posterior, cols R->L
        tile = Image.fromarray(rgb).resize((nx * zoom, ny * zoom), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        if prompts is not None:
            for p in prompts.on_slice(k + off[2]):
                x0, y0, x1, y1 = p.box[0] - off[0], p.box[1] - off[1], p.box[2] - off[0], p.box[3] - off[1]
                draw.rectangle([(nx - 1 - x1) * zoom, (ny - 1 - y1) * zoom, (nx - x0) * zoom - 1, (ny - y0) * zoom - 1],
                               outline=(255, 255, 0), width=1)
        _label(draw, (2, tile.height - 12), world(2, k))
        tiles_ax.append(tile)
    for j in pick_slices(cls_c, 1, n):
        rgb = _blend(img_c[::-1, j, ::-1].T, cls_c[::-1, j, ::-1].T)  # rows superior->inferior, cols R->L
        tile = Image.fromarray(rgb).resize((nx * zoom, nz * zoom), Image.NEAREST)
        _label(ImageDraw.Draw(tile), (2, tile.height - 12), world(1, j))
        tiles_co.append(tile)
    gap, head, legend = 4, (16 if title else 0), 16
    width = max(sum(t.width for t in tiles_ax) + gap * (len(tiles_ax) - 1), 360)
    height = head + tiles_ax[0].height + gap + tiles_co[0].height + legend
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(255, 255, 255))
    x = 0
    for t_ax, t_co in zip(tiles_ax, tiles_co):
        canvas.paste(t_ax, (x, head))
        canvas.paste(t_co, (x, head + t_ax.height + gap))
        _label(draw, (x + 2, head + 2), "R", fill=(255, 255, 0))
        _label(draw, (x + 2, head + t_ax.height + gap + 2), "R", fill=(255, 255, 0))
        x += t_ax.width + gap
    x, y = 4, height - legend + 2
    for s in STRUCTURES[:4]:  # left and right share FreeSurfer colours
        part = s.key.split("_", 1)[1]
        draw.rectangle([x, y + 2, x + 9, y + 11], fill=s.color)
        draw.text((x + 13, y), part, fill=(255, 255, 255))
        x += 20 + 7 * len(part)
    if prompts is not None:
        draw.rectangle([x, y + 2, x + 9, y + 11], outline=(255, 255, 0))
        draw.text((x + 13, y), "prompt box", fill=(255, 255, 255))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def montage_from_result(result, title: str | None = None, prompts: bool = True) -> bytes:
    """The montage of an in-memory :class:`~basalseg.pipeline.SegmentResult`."""
    return montage_png(result.image01, result.classes, result.prompts if prompts else None, title=title, grid=result.grid)


def montage_from_folder(record: ResultRecord, prompts: bool = True) -> tuple[bytes, str]:
    """The montage of a result folder: ``(png, note)``.

    Made from the input image when it is still at the path recorded in provenance with the same
    sha256; otherwise the folder's ``qc.png`` is returned (note says so), or a placeholder."""
    from .imageio import load_volume
    from .intensity import normalize01
    from .spatial import resample_to_grid, to_canonical
    from .structures import labels_to_classes

    path = record.input.get("path")
    why = "the input image is not recorded"
    if path and Path(path).is_file():
        digest = record.input.get("sha256")
        if digest and _sha256(Path(path)) != digest:
            why = f"the input image {path} changed since the run"
        else:
            try:
                import nibabel as nib

                volume = load_volume(path)
                data, grid = to_canonical(volume)
                seg = nib.load(str(record.folder / "segmentation.nii.gz"))
                labels = np.asarray(seg.dataobj).astype(np.int16)
                classes = labels_to_classes(resample_to_grid(labels, np.asarray(seg.affine, float), grid, order=0))
                prompt_set = None
                if prompts:
                    from .prompts import load_prompts

                    try:
                        prompt_set = load_prompts(record.folder / "prompts.json")
                        prompt_set.check_grid(grid)
                    except BasalSegError:
                        prompt_set = None
                return montage_png(normalize01(data), classes, prompt_set, title=record.name, grid=grid), ""
            except BasalSegError as exc:
                why = f"the input image cannot be read ({exc})"
    elif path:
        why = f"the input image {path} is not there any more"
    qc = record.folder / "qc.png"
    if qc.is_file():
        return qc.read_bytes(), f"{why}: showing the run's qc.png"
    return _placeholder_png(record.name), f"{why} and the result has no qc.png"


def _placeholder_png(text: str) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (360, 60), (40, 40, 40))
    ImageDraw.Draw(img).text((6, 22), f"{text}: no picture", fill=(255, 255, 255))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def write_montage(out_dir: str | os.PathLike, name: str, png: bytes, note: str = "") -> Path:
    """Write ``OUT_DIR/report/<name>.png`` atomically, and ``<name>.png.note`` when the picture is a
    stand-in (the note says why; an old note is removed otherwise)."""
    from .outputs import atomic_write_bytes, atomic_write_text

    path = Path(out_dir) / MONTAGE_DIR / f"{name}.png"
    atomic_write_bytes(path, png)
    note_path = path.with_name(path.name + ".note")
    if note:
        atomic_write_text(note_path, note + "\n")
    else:
        note_path.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------------------------


@dataclass
class Thresholds:
    """Flag thresholds (see the module docstring)."""

    iqr_factor: float = 1.5
    min_cohort: int = 5
    asymmetry: float = 0.20
    dice: float = 0.70


@dataclass
class Flag:
    kind: str  # outlier | asymmetry | missing | disagreement | failed | a pipeline qc flag (partial_coverage, ...)
    message: str
    structure: str | None = None  # structure key or pair part


def asymmetry_indices(record: ResultRecord) -> dict[str, float | None]:
    """``|L - R| / ((L + R) / 2)`` per pair (thalamus, caudate, putamen, pallidum); None when a
    side is missing or empty."""
    out: dict[str, float | None] = {}
    for part, left, right in PAIRS:
        lv, rv = record.volume_ml(left.key), record.volume_ml(right.key)
        if lv <= 0 or rv <= 0 or left.key in record.missing or right.key in record.missing:
            out[part] = None
        else:
            out[part] = abs(lv - rv) / ((lv + rv) / 2.0)
    return out


def cohort_stats(records: list[ResultRecord], thresholds: Thresholds) -> dict[str, dict]:
    """Per structure key: ``n, median, q1, q3, low, high`` (fences None when fewer than ``min_cohort``)."""
    stats = {}
    for s in STRUCTURES:
        values = np.array([r.volume_ml(s.key) for r in records if r.volume_ml(s.key) > 0 and s.key not in r.missing])
        entry: dict = {"n": int(values.size), "median": None, "q1": None, "q3": None, "low": None, "high": None}
        if values.size:
            q1, med, q3 = np.percentile(values, [25, 50, 75])
            entry.update({"median": float(med), "q1": float(q1), "q3": float(q3)})
            if values.size >= thresholds.min_cohort:
                iqr = q3 - q1
                entry.update({"low": float(q1 - thresholds.iqr_factor * iqr), "high": float(q3 + thresholds.iqr_factor * iqr)})
        stats[s.key] = entry
    return stats


#: flag kinds the report computes itself from the volumes and provenance (with this report's
#: thresholds); the pipeline's ``qc_flags`` of other kinds (``partial_coverage``, ``implausible``,
#: ...) are shown as recorded
_COMPUTED_HERE = ("outlier", "asymmetry", "missing", "disagreement", "failed")


def cohort_flags(records: list[ResultRecord], thresholds: Thresholds | None = None
                 ) -> tuple[dict[str, list[Flag]], dict[str, dict]]:
    """``({scan name: [flags]}, per-structure stats)`` for complete results."""
    thresholds = thresholds or Thresholds()
    stats = cohort_stats(records, thresholds)
    flags: dict[str, list[Flag]] = {}
    for r in records:
        out: list[Flag] = []
        for s in STRUCTURES:
            v = r.volume_ml(s.key)
            if s.key in r.missing:
                out.append(Flag("missing", f"{s.name} not found by the prompt generator (left empty)", s.key))
                continue
            if v <= 0:
                out.append(Flag("missing", f"{s.name} found but its segmentation is empty", s.key))
                continue
            st = stats[s.key]
            if st["low"] is not None and v < st["low"]:
                out.append(Flag("outlier", f"{s.name} {v:.3f} mL below the cohort range (< {st['low']:.3f} mL)", s.key))
            elif st["high"] is not None and v > st["high"]:
                out.append(Flag("outlier", f"{s.name} {v:.3f} mL above the cohort range (> {st['high']:.3f} mL)", s.key))
        for part, ai in asymmetry_indices(r).items():
            if ai is not None and ai > thresholds.asymmetry:
                out.append(Flag("asymmetry", f"{part} asymmetry {100 * ai:.0f}% (> {100 * thresholds.asymmetry:.0f}%)", part))
        for key, d in r.dice.items():
            if d is not None and d < thresholds.dice and key in _BY_KEY:
                out.append(Flag("disagreement", f"{_BY_KEY[key].name}: foundation vs student Dice {d:.2f} "
                                                f"(< {thresholds.dice:.2f})", key))
        for qc in r.provenance.get("qc_flags") or []:  # recorded by the pipeline (scan_qc, inputcheck)
            kind = qc.get("kind") if isinstance(qc, dict) else None
            if kind and kind not in _COMPUTED_HERE:
                out.append(Flag(str(kind), str(qc.get("message", kind)), qc.get("structure")))
        flags[r.name] = out
    return flags, stats


def cohort_warnings(records: list[ResultRecord]) -> list[str]:
    """Differences among the results that make their volumes less comparable."""
    def distinct(key_fn) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for r in records:
            groups.setdefault(json.dumps(key_fn(r.provenance), sort_keys=True, default=str), []).append(r.name)
        return groups

    def weights(p):
        return {k: (v or {}).get("sha256") for k, v in (p.get("weights") or {}).items()}

    def backend(p):
        f = p.get("foundation") or {}
        return {k: f.get(k) for k in ("backend", "model", "checkpoint_sha256")}

    checks = [("prompter/student weights", weights), ("foundation backend", backend),
              ("options (SDM band, student input, crop)", lambda p: p.get("options")),
              ("basalseg versions", lambda p: p.get("basalseg"))]
    out = []
    for what, fn in checks:
        groups = distinct(fn)
        if len(groups) > 1:
            sizes = ", ".join(f"{len(v)} ({v[0]}{', ...' if len(v) > 1 else ''})" for v in groups.values())
            out.append(f"the results differ in {what}: {len(groups)} groups of {sizes}")
    spacings = {tuple(round(x, 2) for x in r.spacing) for r in records if r.spacing}
    if len(spacings) > 1:
        shown = "; ".join("x".join(f"{x:g}" for x in s) for s in sorted(spacings)[:5])
        out.append(f"the inputs have {len(spacings)} different voxel sizes ({shown}{'; ...' if len(spacings) > 5 else ''} mm): "
                   "volume differences partly reflect resolution")
    return out


# ---------------------------------------------------------------------------------------------
# the HTML page
# ---------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.2em;color:#222;background:#fff}
h1{font-size:1.4em;margin:0 0 .3em} h2{font-size:1.1em;margin:1.4em 0 .4em}
p.meta{color:#555;margin:.2em 0 1em} .warn{background:#fff3cd;border:1px solid #e0c36a;padding:.4em .6em;margin:.3em 0}
table{border-collapse:collapse;font-size:.85em} th,td{border:1px solid #ccc;padding:3px 5px;vertical-align:top}
th{background:#f0f0f0;position:sticky;top:0} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.out{background:#ffd6d6;font-weight:bold} td.asym{background:#ffe8c0;font-weight:bold} td.na{color:#999;text-align:center}
tr.flagged td.scan{border-left:4px solid #c00} td.scan{min-width:9em;max-width:17em}
img.montage{width:420px;height:auto;background:#000;display:block}
ul.flags{margin:.3em 0 0;padding-left:0;list-style:none} ul.flags li{margin-bottom:.25em}
li.flag-outlier{color:#a00} li.flag-asymmetry{color:#a60}
li.flag-missing{color:#700070} li.flag-disagreement{color:#005fa3} li.flag-failed{color:#a00}
span.badge{display:inline-block;border-radius:3px;padding:0 4px;margin-right:3px;color:#fff;font-size:.8em}
.b-outlier{background:#c00}.b-asymmetry{background:#c70}.b-missing{background:#808}
.b-disagreement{background:#06c}.b-failed{background:#555}.b-partial_coverage{background:#960}
.b-implausible{background:#a0a}
li.flag-partial_coverage{color:#960} li.flag-implausible{color:#a0a}
small.note{color:#777;display:block;max-width:420px}
""".strip()

_SCRIPT = """
document.getElementById('only-flagged').addEventListener('change', function (e) {
  document.querySelectorAll('#scans tbody tr').forEach(function (tr) {
    tr.style.display = (e.target.checked && tr.dataset.flags === '0') ? 'none' : '';
  });
});
""".strip()


def _fmt(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def build_report(out_dir: str | os.PathLike, thresholds: Thresholds | None = None, embed: bool = False,
                 prompts: bool = True, verify: bool = True, records: list[ResultRecord] | None = None,
                 broken: list[tuple[Path, str]] | None = None) -> Path:
    """Write ``OUT_DIR/report.html`` (and any missing or stale montages in ``OUT_DIR/report/``).

    Args:
        out_dir: folder of result folders.
        thresholds: flag thresholds.
        embed: inline the montages as base64 (one self-contained file) instead of relative links.
        prompts: draw prompt boxes on montages made here.
        verify: check each result's files against the sha256 in its provenance.
        records, broken: already-read results and damaged folders (else :func:`find_results`).

    Returns:
        The page's path.
    """
    from . import __version__
    from .outputs import atomic_write_text

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise BasalSegError(f"{out_dir}: no such folder")
    thresholds = thresholds or Thresholds()
    if records is None:
        records, broken = find_results(out_dir, verify=verify)
    broken = list(broken or [])
    failures = read_failures(out_dir)
    flags, stats = cohort_flags(records, thresholds)
    warnings = cohort_warnings(records)

    notes: dict[str, str] = {}
    images: dict[str, str] = {}
    for r in records:
        path = out_dir / MONTAGE_DIR / f"{r.name}.png"
        if not path.is_file() or path.stat().st_mtime < (r.folder / "provenance.json").stat().st_mtime:
            try:
                png, note = montage_from_folder(r, prompts=prompts)
            except Exception as exc:  # noqa: BLE001 - one bad picture must not cost the page
                png, note = _placeholder_png(r.name), f"no picture: {type(exc).__name__}: {exc}"
            write_montage(out_dir, r.name, png, note)
        note_path = path.with_name(path.name + ".note")
        if note_path.is_file():
            notes[r.name] = note_path.read_text(encoding="utf-8").strip()
        if embed:
            images[r.name] = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        else:
            images[r.name] = f"{MONTAGE_DIR}/{_url_quote(r.name)}.png"

    e = html.escape
    n_flagged = sum(1 for r in records if flags[r.name])
    counts: dict[str, int] = {}
    for fl in flags.values():
        for kind in {f.kind for f in fl}:
            counts[kind] = counts.get(kind, 0) + 1
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>BasalSegSAM cohort report: {e(out_dir.name)}</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>BasalSegSAM cohort report</h1>",
        (f'<p class="meta">{e(str(out_dir.resolve()))} &middot; <b id="n-results">{len(records)}</b> results &middot; '
         f'<b id="n-flagged">{n_flagged}</b> flagged &middot; <b id="n-failed">{len(failures)}</b> failed &middot; '
         f"generated {e(datetime.datetime.now().isoformat(timespec='seconds'))} by basalseg {e(__version__)}</p>"),
    ]
    for w in warnings:
        parts.append(f'<div class="warn cohort-warning">{e(w)}</div>')
    for folder, reason in broken:
        parts.append(f'<div class="warn broken">{e(folder.name)}: not a complete result ({e(reason)}); not included</div>')
    if counts:
        parts.append("<p>Flags: " + " ".join(f'<span class="badge b-{k}">{e(k)}</span>{v} scan{"s" if v > 1 else ""}'
                                             for k, v in sorted(counts.items())) + "</p>")
    parts.append(
        "<details><summary>How scans are flagged</summary><ul>"
        f"<li><b>outlier</b>: volume outside [Q1 &minus; {thresholds.iqr_factor:g}&middot;IQR, "
        f"Q3 + {thresholds.iqr_factor:g}&middot;IQR] "
        f"of this cohort's non-empty volumes of that structure (only with &ge; {thresholds.min_cohort} scans); raw volumes.</li>"
        f"<li><b>asymmetry</b>: |L&minus;R| / ((L+R)/2) &gt; {100 * thresholds.asymmetry:g}%.</li>"
        "<li><b>missing</b>: structure not found by the prompt generator, or an empty segmentation.</li>"
        f"<li><b>disagreement</b>: Dice between the foundation model's stacked masks and the student's labels, on the "
        f"slices that carried prompts, below {thresholds.dice:.2f}.</li>"
        "<li><b>partial_coverage</b>: structures reach the edge of the image and may continue beyond the field of "
        "view, so their volumes may be too small.</li>"
        "<li><b>implausible</b> and other flags recorded by the pipeline (<code>qc_flags</code> in "
        "<code>provenance.json</code>): as their message says.</li>"
        "<li><b>failed</b>: no result (see the table at the end).</li>"
        "<li>Brain mask / brain volumes: see <code>basalseg.icv</code>; blank where the T1 is not skull-stripped.</li>"
        "<li>Under each volume: its 95 % interval (mL; docs/UNCERTAINTY.md), when the result has one.</li>"
        "</ul></details>")
    # cohort statistics
    parts.append('<h2>Cohort volumes (mL)</h2><table id="stats"><thead><tr><th>structure</th><th>n</th><th>median</th>'
                 "<th>Q1</th><th>Q3</th><th>low fence</th><th>high fence</th></tr></thead><tbody>")
    for s in STRUCTURES:
        st = stats[s.key]
        parts.append(f"<tr><td>{e(s.name)}</td><td class=num>{st['n']}</td>" +
                     "".join(f"<td class=num>{_fmt(st[k])}</td>" for k in ("median", "q1", "q3", "low", "high")) + "</tr>")
    parts.append("</tbody></table>")
    # scans
    parts.append('<h2>Scans</h2><p><label><input type="checkbox" id="only-flagged"> show flagged scans only</label></p>'
                 '<table id="scans"><thead><tr><th>scan, flags</th><th>QC montage</th>' +
                 "".join(f"<th>{e(s.name)}<br>mL</th>" for s in STRUCTURES) +
                 "<th>brain mask<br>mL</th><th>brain<br>mL</th>" +
                 "".join(f"<th>AI {e(part)}</th>" for part, _, _ in PAIRS) +
                 "<th>min Dice<br>F vs S</th></tr></thead><tbody>")
    for r in records:
        fl = flags[r.name]
        flagged_structures = {(f.kind, f.structure) for f in fl}
        who = " ".join(x for x in (r.subject if r.subject != r.name else "", r.session, r.session_date) if x)
        parts.append(f'<tr class="scan{" flagged" if fl else ""}" id="scan-{e(r.name)}" data-scan="{e(r.name)}" '
                     f'data-flags="{len(fl)}">')
        parts.append(f'<td class="scan"><b>{e(r.name)}</b>' + (f"<br><small>{e(who)}</small>" if who else "") +
                     '<ul class="flags">' + "".join(
                         f'<li class="flag flag-{e(f.kind)}"><span class="badge b-{e(f.kind)}">{e(f.kind)}</span>'
                         f"{e(f.message)}</li>" for f in fl) + "</ul></td>")
        note = f'<small class="note">{e(notes[r.name])}</small>' if r.name in notes else ""
        parts.append(f'<td><a href="{e(images[r.name])}"><img class="montage" '
                     f'src="{e(images[r.name])}" alt="QC montage of {e(r.name)}"></a>{note}</td>')
        for s in STRUCTURES:
            v = r.volume_ml(s.key)
            cls = "out" if ("outlier", s.key) in flagged_structures or ("missing", s.key) in flagged_structures else "num"
            iv = r.interval(s.key)
            ci = f'<br><small class="ci" title="95 % interval, mL">{iv[0]:.2f}&ndash;{iv[1]:.2f}</small>' if iv else ""
            parts.append(f'<td class="num{" out" if cls == "out" else ""}" data-structure="{s.key}">{v:.3f}{ci}</td>')
        brain = r.brain
        if brain.get("brain_mask_ml") is not None:
            title = e(brain.get("reason") or brain.get("method", ""))
            parts.append(f'<td class="num" title="{title}">{brain["brain_mask_ml"]:.1f}'
                         f'{"*" if brain.get("status") == "truncated" else ""}</td>'
                         f'<td class="num" title="{title}">{brain["brain_volume_ml"]:.1f}</td>')
        else:
            title = e(brain.get("reason") or "not estimated (result not made by basalseg batch)")
            parts.append(f'<td class="na" title="{title}">&ndash;</td><td class="na" title="{title}">&ndash;</td>')
        for part, ai in asymmetry_indices(r).items():
            if ai is None:
                parts.append('<td class="na">&ndash;</td>')
            else:
                hot = ("asymmetry", part) in flagged_structures
                parts.append(f'<td class="num{" asym" if hot else ""}">{100 * ai:.0f}%</td>')
        dice = [d for d in r.dice.values() if d is not None]
        parts.append((f'<td class="num">{min(dice):.2f}</td>' if dice else '<td class="na">&ndash;</td>') + "</tr>")
    parts.append("</tbody></table>")
    parts.extend(_longitudinal_section(records))
    # failures
    parts.append(f'<h2>Failed scans ({len(failures)})</h2>')
    if failures:
        parts.append('<table id="failed"><thead><tr><th>scan</th><th>input</th><th>flags</th><th>error</th><th>when</th>'
                     "</tr></thead><tbody>")
        for f in failures:
            kind = "nothing found" if f["kind"] == "NothingFoundError" else f["kind"]
            parts.append(f'<tr class="failed" data-scan="{e(f["scan"])}"><td>{e(f["scan"])}</td><td>{e(f["input"])}</td>'
                         f'<td><span class="badge b-failed">failed</span>{e(kind)}</td><td>{e(f["message"])}</td>'
                         f'<td>{e(f["time"])}</td></tr>')
        parts.append("</tbody></table>")
    else:
        parts.append("<p>None.</p>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    path = out_dir / REPORT_NAME
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path


def longitudinal_groups(records: list[ResultRecord]) -> dict[str, list[ResultRecord]]:
    """Subjects with at least two results, each list in session order (date, then session name,
    then folder name; undated sessions last)."""
    groups: dict[str, list[ResultRecord]] = {}
    for r in records:
        if r.subject and r.subject != r.name:  # batch recorded a subject (outside BIDS it is the file name)
            groups.setdefault(r.subject, []).append(r)
    return {k: sorted(v, key=lambda r: (r.session_date == "", r.session_date, r.session, r.name))
            for k, v in sorted(groups.items()) if len(v) >= 2}


def _longitudinal_section(records: list[ResultRecord]) -> list[str]:
    """The longitudinal view: per subject with several sessions, the change between consecutive
    sessions as ``basalseg compare`` gives it (:func:`basalseg.longitudinal.compare_records`)."""
    from .longitudinal import compare_records

    groups = longitudinal_groups(records)
    if not groups:
        return []
    e = html.escape
    parts = [f'<h2>Longitudinal ({len(groups)} subject{"s" if len(groups) > 1 else ""} with several sessions)</h2>',
             "<p>Change between consecutive sessions, as <code>basalseg compare</code> gives it. "
             "<b>real?</b>: yes when |change| exceeds the smallest detectable change (SDC: 95 % of scan-rescan "
             "differences of the repeatability study are smaller; docs/UNCERTAINTY.md).</p>"]
    for subject, recs in groups.items():
        for a, b in zip(recs, recs[1:]):
            try:
                c = compare_records(a, b)
            except BasalSegError as exc:
                parts.append(f'<div class="warn">{e(subject)}: {e(a.name)} &rarr; {e(b.name)}: {e(str(exc))}</div>')
                continue
            span = f", {c.interval_days} days" if c.interval_days is not None else ""
            parts.append(f'<h3 class="pair">{e(subject)}: {e(a.name)} &rarr; {e(b.name)}{e(span)}</h3>')
            for w in c.warnings:
                parts.append(f'<div class="warn">{e(w)}</div>')
            if c.sdc_note:
                parts.append(f'<p class="meta">{e(c.sdc_note)}</p>')
            parts.append(f'<table class="longitudinal" data-subject="{e(subject)}" data-a="{e(a.name)}" data-b="{e(b.name)}">'
                         "<thead><tr><th>structure</th><th>A mL (95 %)</th><th>B mL (95 %)</th><th>change mL</th>"
                         "<th>change %</th><th>%/year</th><th>SDC mL</th><th>real?</th></tr></thead><tbody>")
            for row in c.rows:
                def cell(v, lo=None, hi=None, d=3):
                    if v is None:
                        return '<td class="na">&ndash;</td>'
                    ci = f" <small>({lo:.2f}&ndash;{hi:.2f})</small>" if lo is not None and hi is not None else ""
                    return f"<td class=num>{v:.{d}f}{ci}</td>"
                verdict = row.get("exceeds_sdc")
                real = ('<td class="na">&ndash;</td>' if verdict is None else
                        f'<td class="num{" out" if verdict else ""}" data-real="{"yes" if verdict else "no"}">'
                        f'{"yes" if verdict else "no"} ({row["change_over_sdc"]:.1f}&times;)</td>')
                parts.append(f'<tr data-structure="{e(row["structure"])}"><td>{e(row["structure"])}</td>'
                             + cell(row["volume_ml_a"], row.get("volume_ml_low_a"), row.get("volume_ml_high_a"))
                             + cell(row["volume_ml_b"], row.get("volume_ml_low_b"), row.get("volume_ml_high_b"))
                             + cell(row["change_ml"]) + cell(row["percent_change"], d=1)
                             + cell(row["annualised_percent_change"], d=2) + cell(row.get("sdc_ml")) + real + "</tr>")
            parts.append("</tbody></table>")
    return parts


def _url_quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name)
