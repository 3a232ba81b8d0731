"""The result files themselves (formats); how they are written safely is :mod:`basalseg.staging`.

Files of a ``segment`` result (:data:`basalseg.results.RESULT_FILES`; the folder, its states and
reading it back are :mod:`basalseg.results`):

``segmentation.nii.gz``
    int16 labelmap on the input grid and affine, FreeSurfer values (10-13, 49-52).
``segmentation.seg.nrrd``
    the same as a 3D Slicer segmentation: 8 named, coloured segments (label value = FreeSurfer value).
``volumes.csv``
    ``structure,label,voxels,volume_mm3,volume_ml``: voxel counts of the labelmap times the
    input voxel volume (|det| of the affine), so the table always matches the labelmap exactly;
    then ``volume_ml_low,volume_ml_high,expected_ml,band_ml``: the 95 % volume interval and its
    ingredients (:mod:`basalseg.uncertainty`; blank with ``--no-uncertainty``).
``prompts.json``
    the prompts used (see :mod:`basalseg.prompts`).
``qc.png``
    overlay of the result on the image for a quick visual check.
``provenance.json``
    versions, backend, weights sha256, options, timings.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from .staging import StagedOutputDir, atomic_write_bytes, atomic_write_text
from .structures import STRUCTURES

log = logging.getLogger("basalseg")

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "StagedOutputDir",
    "volume_rows",
    "volumes_csv_text",
    "nifti_bytes",
    "seg_nrrd_bytes",
    "VOLUME_COLUMNS",
    "json_text",
]

VOLUME_COLUMNS = ["structure", "label", "voxels", "volume_mm3", "volume_ml"]


def volume_rows(labels: np.ndarray, voxel_volume_mm3: float) -> list[dict]:
    """One row per structure: voxel count of its FreeSurfer label and the volume it makes.

    Args:
        labels: labelmap with FreeSurfer values (any shape).
        voxel_volume_mm3: volume of one voxel.
    """
    labels = np.asarray(labels)
    rows = []
    for s in STRUCTURES:  # one comparison per structure: no sorted or int64 copy of a large labelmap
        n = int(np.count_nonzero(labels == s.label))
        mm3 = n * float(voxel_volume_mm3)
        rows.append({"structure": s.name, "label": s.label, "voxels": n,
                     "volume_mm3": round(mm3, 3), "volume_ml": round(mm3 / 1000.0, 6)})
    return rows


def volumes_csv_text(rows: list[dict], extra_columns: list[str] | None = None,
                     trailing_columns: list[str] | None = None) -> str:
    """CSV of volume rows: ``extra_columns`` first, then :data:`VOLUME_COLUMNS`, then
    ``trailing_columns`` (the interval columns of :mod:`basalseg.uncertainty`)."""
    columns = (extra_columns or []) + VOLUME_COLUMNS + (trailing_columns or [])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def affine_is_orthogonal(affine: np.ndarray, tol: float = 1e-4) -> bool:
    """Whether the voxel axes of ``affine`` are perpendicular (no shear), i.e. whether a NIfTI
    qform (rotation, voxel sizes, offset) can hold it exactly."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms == 0):
        return False
    r = m / norms
    return bool(np.abs(r.T @ r - np.eye(3)).max() < tol)


def nifti_bytes(labels: np.ndarray, affine: np.ndarray, header=None) -> bytes:
    """A gzipped NIfTI-1 file (int16 labelmap) as bytes.

    The sform holds ``affine`` exactly (code 1). The qform is set to the same geometry when it can
    hold it; for a sheared (non-orthogonal) affine, which a qform cannot represent, the qform is
    left unset (code 0) so that no viewer reads a squared-up approximation, and a warning says so.
    """
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(labels, dtype=np.int16), affine)
    if affine_is_orthogonal(affine):
        img.set_qform(affine, code=1)
    else:
        img.set_qform(None, code=0)
        log.warning("the input's voxel axes are sheared (not perpendicular): the labelmap's sform holds the exact "
                    "geometry, its qform is left unset (a qform cannot hold a shear)")
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.nii.gz"
        nib.save(img, str(path))
        return path.read_bytes()


def seg_nrrd_bytes(labels: np.ndarray, affine_ras: np.ndarray) -> bytes:
    """A 3D Slicer ``.seg.nrrd`` as bytes: one layer, 8 segments named and coloured as FreeSurfer.

    Written with ``slicerio``; segments keep their FreeSurfer label values, so the file also
    reads as a plain labelmap.
    """
    import slicerio

    from .imageio import LPS_TO_RAS

    labels = np.asarray(labels)
    segmentation = {
        "voxels": np.asarray(labels, dtype=np.int16),
        "ijkToLPS": LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64),
        "segments": [],
    }
    for s in STRUCTURES:
        segment = {"id": s.name, "name": s.name, "color": list(s.color_float), "labelValue": s.label, "layer": 0}
        idx = np.nonzero(labels == s.label)  # per structure: no sorted copy of a large labelmap
        if len(idx[0]):
            segment["extent"] = [int(v) for pair in zip([i.min() for i in idx], [i.max() for i in idx]) for v in pair]
        segmentation["segments"].append(segment)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.seg.nrrd"
        slicerio.write_segmentation(str(path), segmentation)
        raw = path.read_bytes()
    # pynrrd stamps the header with the time of writing; drop it so identical results are identical files
    header, sep, body = raw.partition(b"\n\n")
    header = b"\n".join(line for line in header.split(b"\n") if not line.startswith(b"# on "))
    return header + sep + body


def json_text(data: dict) -> str:
    return json.dumps(data, indent=1, default=_json_default)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
