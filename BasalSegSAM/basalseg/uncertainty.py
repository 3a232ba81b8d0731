"""Per-structure volume uncertainty of one result, and the repeatability table ``compare`` uses.

Definitions and the measurements behind the defaults: docs/UNCERTAINTY.md.

**Per-scan raw measures** (:func:`softmax_measures`, from the student's calibrated softmax
``p_c(v)`` on its crop of the canonical 1 mm grid, the same pass that gives the labelmap, so
they cost no network run):

``expected_ml``
    ``sum_v p_c(v)``: the expected volume if each voxel were labelled ``c`` with probability ``p_c``.
``pb_sd_ml``
    ``sqrt(sum_v p_c(v) (1 - p_c(v)))``: the standard deviation of that volume if voxels were
    independent (a Poisson-binomial). Voxels are not independent, so this is far too small on
    its own; it is kept as a diagnostic.
``band_ml``
    ``(V(+1) - V(-1)) / 2``: half the change of the structure's argmax volume when its logit is
    moved by -1 and +1 (others fixed): the volume of the "unsure" rim, proportional to the
    surface where the student hesitates.

**The interval** written into ``volumes.csv`` and ``provenance.json``: ``volume_ml ± z * k_s *
band_ml`` (clipped at 0), with ``z = 1.96`` (nominal 95 %) and one inflation factor ``k_s`` per
structure fitted on validation subjects (synthetic rescans of seeds never trained on and never
reported; :data:`TABLE_NAME`) so that 95 % of their intervals cover the reference volume. The
factors and the repeatability (within-subject SD, smallest detectable change) measured on other,
held-out subjects are shipped as package data next to the weights (``weights/repeatability.json``,
with the commands, cohorts and student sha256 that made them).

``flip`` TTA (``uncertainty="flip"``): one more student pass on the left-right mirrored input
(SDM channels swapped left/right), mapped back; its volume and the half-difference to the
plain pass are recorded as well (diagnostic; not the default: see docs/UNCERTAINTY.md).
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from .structures import NUM_CLASSES, STRUCTURES

__all__ = ["softmax_measures", "flip_probabilities", "volume_intervals", "load_table", "UNCERTAINTY_COLUMNS",
           "UNCERTAINTY_MODES", "TABLE_NAME", "Z95", "sdc_ml", "change_test", "add_interval_columns"]

#: columns appended to ``volumes.csv`` (after the 5 original ones).
UNCERTAINTY_COLUMNS = ["volume_ml_low", "volume_ml_high", "expected_ml", "band_ml"]
#: ``PipelineConfig.uncertainty``: ``"softmax"`` (default, no extra network pass), ``"flip"``
#: (softmax + one mirrored student pass), ``"none"`` (``--no-uncertainty``).
UNCERTAINTY_MODES = ("softmax", "flip", "none")
TABLE_NAME = "repeatability.json"
Z95 = 1.959963984540054


def softmax_measures(probs: np.ndarray, classes: np.ndarray, missing: list[int] | tuple = (),
                     voxel_ml: float = 0.001, delta: float = 1.0) -> dict[int, dict]:
    """Raw per-structure uncertainty measures (module docstring) from a softmax crop.

    Args:
        probs: ``(9, X, Y, Z)`` float softmax of the (calibrated) logits.
        classes: ``(X, Y, Z)`` the labels actually given (argmax, with structures that were not
            found already set to 0).
        missing: class indices left empty (all their measures are 0).
        voxel_ml: volume of one voxel of this grid (1 mm grid: 0.001 mL).
        delta: logit shift for ``band_ml``.

    Returns:
        ``{class_index: {"voxels", "expected_ml", "pb_sd_ml", "band_ml"}}`` for classes 1..8.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape[0] != NUM_CLASSES or probs.shape[1:] != np.shape(classes):
        raise ValueError(f"probabilities {probs.shape} do not match the labels {np.shape(classes)}")
    raw = probs.argmax(0)
    # Per class c: voxels that stay/become c when its log-probability moves by -delta/+delta.
    top = np.sort(probs, axis=0)[-2:]
    out: dict[int, dict] = {}
    for s in STRUCTURES:
        c = s.class_index
        if c in missing:
            out[c] = {"voxels": 0, "expected_ml": 0.0, "pb_sd_ml": 0.0, "band_ml": 0.0}
            continue
        p = probs[c]
        other = np.where(raw == c, top[0], top[1])
        low = int(np.count_nonzero(p * math.exp(-delta) > other))
        high = int(np.count_nonzero(p * math.exp(delta) > other))
        out[c] = {"voxels": int(np.count_nonzero(classes == c)), "expected_ml": float(p.sum(dtype=np.float64)) * voxel_ml,
                  "pb_sd_ml": math.sqrt(float((p * (1.0 - p)).sum(dtype=np.float64))) * voxel_ml,
                  "band_ml": 0.5 * (high - low) * voxel_ml}
    return out


def flip_probabilities(net, inputs: np.ndarray, device, logit_offsets=None) -> np.ndarray:
    """The student's softmax ``(9, X, Y, Z)`` for the left-right mirrored input, mapped back.

    The canonical grid is RAS+, so axis 0 is left-right: the crop is mirrored along it, the SDM
    (or mask) channels of each left structure swapped with its right twin, the student run, and
    its output mirrored back with the class channels swapped back."""
    import torch

    from .student import mirror_input, predict_student, unmirror_classes

    _, probs = predict_student(net, mirror_input(inputs), device, return_probabilities=True,
                               logit_offsets=logit_offsets)
    return np.ascontiguousarray(unmirror_classes(torch.from_numpy(probs)).numpy())


# ---------------------------------------------------------------------------------------------
# the shipped table and intervals
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _read_table(path: str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_table(path: str | Path | None = None) -> dict | None:
    """The repeatability/calibration table (``weights/repeatability.json``), or None when absent."""
    if path is None:
        path = Path(__file__).resolve().parent / "weights" / TABLE_NAME
    path = Path(path)
    if not path.is_file():
        return None
    return _read_table(str(path))


def volume_intervals(volumes_ml: dict[str, float], measures: dict[str, dict], table: dict | None,
                     z: float = Z95) -> dict[str, dict]:
    """Per structure name: ``{"low", "high", "k"}`` in mL, ``volume ± z k band_ml`` clipped at 0.

    Args:
        volumes_ml: the labelmap's volume per structure name (``volumes.csv``'s ``volume_ml``).
        measures: raw measures per structure name (``band_ml`` used), from :func:`softmax_measures`.
        table: :func:`load_table`; its ``interval.k`` per structure (1 when there is no table:
            an uncalibrated interval, which provenance says).
    """
    ks = ((table or {}).get("interval") or {}).get("k") or {}
    out = {}
    for name, v in volumes_ml.items():
        m = measures.get(name) or {}
        k = float(ks.get(name, 1.0))
        half = z * k * float(m.get("band_ml", 0.0))
        if v <= 0:
            half = 0.0
        out[name] = {"low": max(v - half, 0.0), "high": v + half, "k": k}
    return out


def sdc_ml(table: dict | None, structure: str, volume_a: float, volume_b: float) -> float | None:
    """The smallest detectable change (mL) of a structure between two scans of one person: the
    shipped within-subject coefficient of variation ``cv`` times ``1.96 sqrt(2)`` times the mean
    volume of the two scans. None without a table entry."""
    entry = ((table or {}).get("repeatability") or {}).get(structure)
    if not entry or entry.get("cv_within") is None:
        return None
    return Z95 * math.sqrt(2.0) * float(entry["cv_within"]) * 0.5 * (float(volume_a) + float(volume_b))


def change_test(change_ml: float | None, sdc: float | None) -> tuple[bool | None, float | None]:
    """``(exceeds, ratio)``: whether ``|change| > sdc`` and ``|change| / sdc`` (None when unknown)."""
    if change_ml is None or sdc is None or sdc <= 0:
        return None, None
    return abs(change_ml) > sdc, abs(change_ml) / sdc


def _table_record(table: dict | None) -> dict:
    if not table:
        return {"file": None, "calibrated": False}
    path = Path(__file__).resolve().parent / "weights" / TABLE_NAME
    return {"file": f"weights/{TABLE_NAME}", "date": table.get("date"), "calibrated": True,
            "fitted_on": (table.get("interval") or {}).get("fitted_on"), "student_sha256": table.get("student_sha256"),
            "sha256": _sha256(path) if path.is_file() else None}


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_interval_columns(rows: list[dict], uncertainty: dict | None, table: dict | None = None,
                         student_sha256: str | None = None) -> dict:
    """Fill the :data:`UNCERTAINTY_COLUMNS` of ``volumes.csv`` rows (in place; blank when
    ``uncertainty`` is None) and return the ``provenance.json`` record ``volume_uncertainty``.

    Args:
        rows: :func:`basalseg.outputs.volume_rows` of the labelmap (input grid).
        uncertainty: ``SegmentResult.uncertainty``.
        table: the shipped table (default: :func:`load_table`); its factors are used only when it
            was made for the student that ran (``student_sha256``), else the interval is
            uncalibrated (k = 1) and the record says so.
    """
    if uncertainty is None:
        for row in rows:
            row.update({c: "" for c in UNCERTAINTY_COLUMNS})
        return {"mode": "none"}
    table = load_table() if table is None else table
    note = None
    if table and student_sha256 and table.get("student_sha256") and table["student_sha256"] != student_sha256:
        note = "the shipped interval factors were fitted for another student (sha256 differs): k = 1, uncalibrated"
        table = None
    measures = uncertainty["measures"]
    intervals = volume_intervals({r["structure"]: r["volume_ml"] for r in rows}, measures, table)
    per = {}
    for row in rows:
        name = row["structure"]
        m, iv = measures[name], intervals[name]
        row.update({"volume_ml_low": round(iv["low"], 6), "volume_ml_high": round(iv["high"], 6),
                    "expected_ml": round(m["expected_ml"], 6), "band_ml": round(m["band_ml"], 6)})
        per[name] = {"low_ml": row["volume_ml_low"], "high_ml": row["volume_ml_high"], "k": round(iv["k"], 4),
                     **{key: round(float(v), 6) for key, v in m.items() if key != "voxels"}}
    record = {"mode": uncertainty["mode"], "level": 0.95, "z": round(Z95, 4),
              "interval": "volume_ml +- z * k * band_ml (clipped at 0); band_ml = half the volume change when the "
                          "structure's logit moves by -1/+1; k per structure from the table (docs/UNCERTAINTY.md)",
              "table": _table_record(table), "per_structure": per}  # its time: timings_s["uncertainty"]
    if note:
        record["note"] = note
    return record
