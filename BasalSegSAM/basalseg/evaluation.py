"""Segmentation metrics, per structure, and their reports.

Definitions (``P`` predicted voxels of a structure, ``R`` reference voxels, volumes in mm^3 from
voxel counts times the voxel volume):

* **Dice** = 2 |P n R| / (|P| + |R|); 1 is perfect overlap. Both empty counts as 1.
* **Volume accuracy** = 1 - |V_P - V_R| / V_R; 1 is the exact volume, 0.96 means the volumes
  differ by 4% of the reference. It ignores position: a shifted structure of the right size
  scores 1, which is why Dice and HD95 are reported beside it. Undefined (NaN) when V_R = 0.
* **HD95** = 95th percentile of the symmetric surface distances between P and R, in mm (MONAI's
  ``compute_hausdorff_distance`` with ``percentile=95`` and the voxel spacing); NaN when either
  is empty.

* **Signed volume error** = 100 (V_P - V_R) / V_R, in %; its mean over cases is the bias (what a
  volume calibration can remove), its SD the case-to-case error.
* **Volume slope** and **r** (:func:`volume_agreement`, over the cases of a cohort, per
  structure): the least-squares slope of V_P on V_R and their Pearson correlation. A slope of 1
  means differences between subjects are measured at their size; a slope of 0.6 means a true
  difference of 10 % reads as about 6 % (predictions shrunk toward the training anatomy), which
  matters for following volume change over time.
* **Local slope** (:func:`volume_agreement`, when each row carries its case's ``affine_scale``
  ``s = |det A|``, A the linear part of the brain localisation's template-to-input affine): the
  least-squares slope of ``log(V_P / s)`` on ``log(V_R / s)``. The localisation's affine scale
  carries each subject's overall head size to the output exactly; what it does not explain is
  each structure's own size relative to the brain, which the student has to read from the
  image. A local slope of 0.6 means a structure 10 % larger than its brain's size predicts reads
  about 6 % larger (shrunk toward the templates' shapes).

Means over structures skip NaNs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .metrics import dice
from .structures import STRUCTURES

__all__ = ["volume_accuracy", "structure_metrics", "evaluate_labelmaps", "evaluate_files", "summarise", "volume_agreement", "metrics_csv",
           "markdown_table", "METRIC_COLUMNS"]

METRIC_COLUMNS = ["case", "structure", "dice", "volume_accuracy", "hd95_mm", "volume_pred_ml", "volume_ref_ml"]


def _hd95(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float]) -> float:
    import torch
    from monai.metrics import compute_hausdorff_distance

    if not pred.any() or not ref.any():
        return float("nan")
    # crop to both masks' box (+1) so the distance transforms stay small
    both = pred | ref
    idx = np.nonzero(both)
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in idx)
    p = torch.from_numpy(pred[box][None, None].astype(np.float32))
    r = torch.from_numpy(ref[box][None, None].astype(np.float32))
    value = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=list(spacing))
    return float(value.reshape(-1)[0])


def volume_accuracy(v_pred: float, v_ref: float) -> float:
    """1 - |V_P - V_R| / V_R (module docstring); NaN when ``v_ref`` is 0."""
    return float("nan") if v_ref == 0 else 1.0 - abs(v_pred - v_ref) / v_ref


def structure_metrics(pred: np.ndarray, ref: np.ndarray, spacing=(1.0, 1.0, 1.0), voxel_volume_mm3: float | None = None) -> dict:
    """Dice, volume accuracy and HD95 for one binary structure (see module docstring)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference {ref.shape}")
    vv = float(voxel_volume_mm3 if voxel_volume_mm3 is not None else np.prod(spacing))
    n_p, n_r = int(pred.sum()), int(ref.sum())
    vp, vr = n_p * vv, n_r * vv
    return {"dice": dice(pred, ref), "volume_accuracy": volume_accuracy(vp, vr), "hd95_mm": _hd95(pred, ref, tuple(spacing)),
            "volume_pred_ml": vp / 1000.0, "volume_ref_ml": vr / 1000.0}


def evaluate_labelmaps(pred: np.ndarray, ref: np.ndarray, spacing=(1.0, 1.0, 1.0), case: str = "",
                       values: str = "label") -> list[dict]:
    """One row per structure for two labelmaps on the same grid.

    Args:
        pred, ref: labelmaps, FreeSurfer values (``values="label"``) or class indices (``"class"``).
        spacing: voxel size in mm.
        case: name put in each row.
    """
    rows = []
    for s in STRUCTURES:
        v = s.label if values == "label" else s.class_index
        m = structure_metrics(pred == v, ref == v, spacing)
        rows.append({"case": case, "structure": s.name, **m})
    return rows


def _grid_difference(p_shape, p_affine, r_shape, r_affine) -> str:
    """How two grids differ, in words: their shapes, else where their voxels sit."""
    if tuple(p_shape) != tuple(r_shape):
        return f"shapes {tuple(p_shape)} vs {tuple(r_shape)}"
    p_affine, r_affine = np.asarray(p_affine, float), np.asarray(r_affine, float)
    if np.allclose(p_affine[:3, :3], r_affine[:3, :3], atol=1e-3):
        shift = p_affine[:3, 3] - r_affine[:3, 3]
        return (f"the same shape {tuple(p_shape)}, but the affines' origins differ by "
                f"{np.linalg.norm(shift):.1f} mm ({', '.join(f'{v:+.1f}' for v in shift)})")
    return f"the same shape {tuple(p_shape)}, but different voxel sizes or axis directions in the affines"


def evaluate_files(pred_path: str | os.PathLike, ref_path: str | os.PathLike, ref_mapping: dict | None = None,
                   resample: bool = False) -> list[dict]:
    """Metrics for a predicted and a reference label file (NIfTI or NRRD).

    Args:
        ref_mapping: reference label value -> FreeSurfer value, for references in another numbering.
        resample: put the prediction on the reference grid (nearest neighbour) when the grids differ;
            otherwise differing grids are an error.

    Raises:
        InputImageError: unreadable file, or different grids without ``resample``.
    """
    from .errors import InputImageError
    from .imageio import load_volume
    from .spatial import Grid, resample_to_grid

    pred = load_volume(pred_path, check=False)
    ref = load_volume(ref_path, check=False)
    p = np.rint(np.asarray(pred.data)).astype(np.int32).reshape(pred.data.shape[:3])
    r = np.rint(np.asarray(ref.data)).astype(np.int32).reshape(ref.data.shape[:3])
    if p.shape != r.shape or not np.allclose(pred.affine, ref.affine, atol=1e-3):
        if not resample:
            raise InputImageError(f"{pred_path} and {ref_path} are on different grids ({_grid_difference(p.shape, pred.affine, r.shape, ref.affine)}); "
                                  "pass --resample to compare on the reference grid")
        p = resample_to_grid(p, pred.affine, Grid(r.shape, ref.affine), order=0)
    if ref_mapping:
        mapped = np.zeros_like(r)
        for src, dst in ref_mapping.items():
            mapped[r == int(src)] = int(dst)
        r = mapped
    case = Path(pred_path).name
    return evaluate_labelmaps(p, r, tuple(float(s) for s in ref.spacing), case=case)


def summarise(rows: list[dict]) -> dict:
    """Mean of each metric per structure and over all structures (NaNs skipped)."""
    out: dict = {"per_structure": {}, "mean": {}}
    metrics = ["dice", "volume_accuracy", "hd95_mm"]
    for s in STRUCTURES:
        sel = [r for r in rows if r["structure"] == s.name]
        out["per_structure"][s.name] = {m: _nanmean([r[m] for r in sel]) for m in metrics}
    for m in metrics:
        out["mean"][m] = _nanmean([r[m] for r in rows])
    return out


def volume_agreement(rows: list[dict]) -> dict:
    """Per structure, over the cases in ``rows`` (one variant; rows of :func:`structure_metrics`
    with ``volume_pred_ml``/``volume_ref_ml``): ``n`` (cases with a reference volume),
    ``signed_error_pct`` mean and ``signed_error_sd_pct``, ``slope`` (least squares of V_P on
    V_R), ``r`` (Pearson; NaN with fewer than 3 cases or no spread in either volume) and
    ``local_slope`` (NaN unless every such row has an ``affine_scale``, with fewer than 3 cases or
    when a prediction is empty). Module docstring for the definitions."""
    out: dict = {}
    for s in STRUCTURES:
        sel = [r for r in rows if r["structure"] == s.name and float(r["volume_ref_ml"]) > 0]
        pairs = np.array([(float(r["volume_ref_ml"]), float(r["volume_pred_ml"])) for r in sel], dtype=np.float64)
        entry = {"n": int(len(pairs)), "signed_error_pct": float("nan"), "signed_error_sd_pct": float("nan"),
                 "slope": float("nan"), "r": float("nan"), "local_slope": float("nan")}
        if len(pairs):
            err = 100.0 * (pairs[:, 1] / pairs[:, 0] - 1.0)
            entry["signed_error_pct"] = float(err.mean())
            entry["signed_error_sd_pct"] = float(err.std(ddof=1)) if len(err) > 1 else float("nan")
        if len(pairs) >= 3:
            entry["slope"] = _ls_slope(pairs[:, 0], pairs[:, 1])
            ref, pred = pairs[:, 0] - pairs[:, 0].mean(), pairs[:, 1] - pairs[:, 1].mean()
            if ref.std() > 0 and pred.std() > 0:
                entry["r"] = float((ref * pred).sum() / math.sqrt((ref * ref).sum() * (pred * pred).sum()))
            scales = [r.get("affine_scale") for r in sel]
            if all(x is not None and float(x) > 0 for x in scales) and (pairs[:, 1] > 0).all():
                log_s = np.log(np.asarray(scales, dtype=np.float64))
                entry["local_slope"] = _ls_slope(np.log(pairs[:, 0]) - log_s, np.log(pairs[:, 1]) - log_s)
        out[s.name] = entry
    return out


def _ls_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of ``y`` on ``x`` (NaN when ``x`` has no spread)."""
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum()) if (x * x).sum() > 0 else float("nan")


def _nanmean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def metrics_csv(rows: list[dict], extra_columns: tuple[str, ...] = ()) -> str:
    """CSV text of metric rows (:data:`METRIC_COLUMNS`, after any ``extra_columns``)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(extra_columns) + METRIC_COLUMNS, lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def markdown_table(summaries: dict[str, dict], metric_names=("dice", "volume_accuracy", "hd95_mm")) -> str:
    """A markdown table with one row per method/variant and mean metrics as columns."""
    head = "| variant | " + " | ".join({"dice": "Dice", "volume_accuracy": "volume accuracy", "hd95_mm": "HD95 (mm)"}[m]
                                       for m in metric_names) + " |"
    lines = [head, "|" + "---|" * (len(metric_names) + 1)]
    for name, summary in summaries.items():
        vals = " | ".join(f"{summary['mean'][m]:.3f}" if not math.isnan(summary["mean"][m]) else "n/a" for m in metric_names)
        lines.append(f"| {name} | {vals} |")
    return "\n".join(lines) + "\n"
