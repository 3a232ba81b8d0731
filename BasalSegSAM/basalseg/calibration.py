"""Volume calibration of the student: one additive logit offset per class.

The student's label of a voxel is ``argmax_c (logit_c + b_c)``. With all ``b_c = 0`` this is the
plain network. A student that systematically over- or under-segments a structure (the volume
bias in README "Results") is corrected by lowering or raising that structure's offset, which
moves its boundary by a fraction of a voxel to a few voxels where the network is unsure, and
changes nothing where it is sure. Offsets are fitted on **validation** cases (cases held out of
training, never the held-out evaluation cases) by *volume matching*: for each structure, the
offset whose predicted volumes have a mean log ratio to the reference volumes closest to 0
(:func:`fit_volume_offsets`). The offsets are stored in the student checkpoint's
``meta["calibration"]`` (``basalseg calibrate``, :mod:`basalseg.training.calibrate`) and used by
the pipeline unless switched off (``--no-calibration``; ``PipelineConfig.calibrate``).

Arrays: log-probabilities or logits ``(C, X, Y, Z)`` with ``C = 9`` (class 0 background, then
the structures in :data:`basalseg.structures.STRUCTURES` order), offsets ``(C,)`` float32 with
``b_0 = 0`` (adding one constant to every class changes nothing).
"""

from __future__ import annotations

import numpy as np

from .structures import NUM_CLASSES, STRUCTURES

__all__ = ["offsets_from_meta", "apply_offsets", "fit_volume_offsets", "calibration_meta", "OFFSET_BOUNDS"]

#: range searched for each offset (log-odds units).
OFFSET_BOUNDS = (-6.0, 3.0)

#: voxels whose best structure log-probability is below this can never leave the background for
#: any offset in :data:`OFFSET_BOUNDS` (they are skipped while fitting; only a speed-up).
_NEGLIGIBLE_LOGP = -12.0


def offsets_from_meta(meta: dict | None) -> np.ndarray | None:
    """The ``(9,)`` offsets recorded in a student's checkpoint meta, or None when it has none.

    Raises:
        ValueError: a calibration entry of the wrong length or with non-finite values.
    """
    entry = (meta or {}).get("calibration")
    if not entry:
        return None
    offsets = np.asarray(entry.get("logit_offsets"), dtype=np.float32)
    if offsets.shape != (NUM_CLASSES,) or not np.all(np.isfinite(offsets)):
        raise ValueError(f"student calibration must hold {NUM_CLASSES} finite logit offsets, got {entry.get('logit_offsets')!r}")
    return offsets


def apply_offsets(logits: np.ndarray, offsets: np.ndarray | None) -> np.ndarray:
    """Class indices ``(X, Y, Z)`` uint8 of ``logits`` ``(C, X, Y, Z)`` shifted by ``offsets``."""
    logits = np.asarray(logits, dtype=np.float32)
    if offsets is not None:
        logits = logits + np.asarray(offsets, np.float32).reshape((-1,) + (1,) * (logits.ndim - 1))
    return logits.argmax(0).astype(np.uint8)


def _candidates(logp: np.ndarray) -> np.ndarray:
    """``(C, N)`` log-probabilities of the voxels an offset within the bounds could relabel."""
    logp = np.asarray(logp, dtype=np.float32).reshape(logp.shape[0], -1)
    keep = logp[1:].max(axis=0) > _NEGLIGIBLE_LOGP
    return logp[:, keep]


def fit_volume_offsets(log_probs: list[np.ndarray], references: list[np.ndarray],
                       extra_reference_voxels: list[np.ndarray] | None = None, tie_sides: bool = False,
                       bounds: tuple[float, float] = OFFSET_BOUNDS, tol: float = 0.01,
                       sweeps: int = 3) -> tuple[np.ndarray, dict]:
    """Per-class offsets that make the predicted volumes match the reference volumes.

    Coordinate search: for each structure in turn (``sweeps`` passes over the 8), the other
    offsets held fixed, the offset where ``mean over cases of log(V_pred / V_ref)`` crosses 0,
    found by bisection within ``bounds`` to ``tol`` (a structure's volume only grows with its own
    offset, so the crossing is unique; without one in ``bounds``, the nearer bound).

    A structure is fitted on the cases whose reference has it; one that no case has keeps
    offset 0 and is listed in ``report["not_fitted"]``.

    Args:
        log_probs: per case, the student's ``(9, X, Y, Z)`` log-softmax (or logits) on its crop.
        references: per case, the ``(X, Y, Z)`` reference class indices on the same crop.
        extra_reference_voxels: per case, ``(9,)`` reference voxel counts outside the crop (the
            student cannot label them, but they belong to the reference volume); None = none.
        tie_sides: one offset for each left/right pair (4 free values instead of 8; the pair's
            mean log ratio is brought to 0).
        bounds, tol: search range and precision of each offset.

    Returns:
        ``(offsets (9,) float32, report)``; ``report`` has ``log_volume_ratio_before`` and
        ``_after`` per structure (mean over the cases that have it; None for a structure no
        case has) and ``not_fitted``.

    Raises:
        ValueError: no cases, or mismatched shapes.
    """
    if not log_probs or len(log_probs) != len(references):
        raise ValueError("calibration needs the same number (>= 1) of student outputs and references")
    cands, ref_counts = [], []
    for n, (lp, ref) in enumerate(zip(log_probs, references)):
        if lp.shape[0] != NUM_CLASSES or lp.shape[1:] != ref.shape:
            raise ValueError(f"case {n}: student output {lp.shape} does not match reference {ref.shape}")
        counts = np.bincount(np.asarray(ref, np.int64).ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES].astype(np.float64)
        if extra_reference_voxels is not None:
            counts = counts + np.asarray(extra_reference_voxels[n], np.float64)[:NUM_CLASSES]
        cands.append(_candidates(lp))
        ref_counts.append(counts)
    ref_counts = np.stack(ref_counts)
    present = ref_counts[:, 1:] > 0  # (cases, 8)
    not_fitted = [s.name for s in STRUCTURES if not present[:, s.class_index - 1].any()]

    def log_ratio(offsets: np.ndarray) -> np.ndarray:
        vols = np.stack([np.bincount((c + offsets[:, None]).argmax(0), minlength=NUM_CLASSES) for c in cands])
        ratios = np.log(np.maximum(vols[:, 1:], 0.5) / np.maximum(ref_counts[:, 1:], 1.0))
        return np.where(present, ratios, 0.0).sum(axis=0) / np.maximum(present.sum(axis=0), 1)

    offsets = np.zeros(NUM_CLASSES, np.float32)
    before = log_ratio(offsets)
    groups = [[k for k in g if present[:, k - 1].any()] for g in _groups(tie_sides)]
    groups = [g for g in groups if g]

    def group_ratio(group: list[int], value: float) -> float:
        trial = offsets.copy()
        trial[group] = value
        return float(log_ratio(trial)[[g - 1 for g in group]].mean())

    lo_bound, hi_bound = float(bounds[0]), float(bounds[1])
    for _ in range(max(int(sweeps), 1)):
        for group in groups:
            lo, hi = lo_bound, hi_bound
            if group_ratio(group, lo) >= 0:  # too big even at the lowest offset
                offsets[group] = lo
                continue
            if group_ratio(group, hi) <= 0:  # too small even at the highest
                offsets[group] = hi
                continue
            while hi - lo > tol:
                mid = 0.5 * (lo + hi)
                if group_ratio(group, mid) > 0:
                    hi = mid
                else:
                    lo = mid
            # the end with the smaller |ratio| (volumes move in whole voxels)
            offsets[group] = lo if abs(group_ratio(group, lo)) <= abs(group_ratio(group, hi)) else hi
    offsets = np.round(offsets, 4).astype(np.float32)
    after = log_ratio(offsets)

    def table(values: np.ndarray) -> dict:
        return {s.name: (None if s.name in not_fitted else round(float(values[s.class_index - 1]), 4))
                for s in STRUCTURES}

    report = {"log_volume_ratio_before": table(before), "log_volume_ratio_after": table(after),
              "not_fitted": not_fitted}
    return offsets, report


def _groups(tie_sides: bool) -> list[list[int]]:
    """Class indices fitted together: each structure alone, or each left/right pair."""
    if not tie_sides:
        return [[s.class_index] for s in STRUCTURES]
    pairs: dict[str, list[int]] = {}
    for s in STRUCTURES:
        pairs.setdefault(s.name.split("-", 1)[-1], []).append(s.class_index)
    return list(pairs.values())


def calibration_meta(offsets: np.ndarray, cases: list[str], report: dict, tie_sides: bool, context: bool,
                     mirror_tta: bool = False) -> dict:
    """The ``meta["calibration"]`` entry written into a student checkpoint (``context``: whether the
    foundation masks of the fit had 3-slice context; ``mirror_tta``: whether the fit used the
    student's left-right test-time augmentation)."""
    import datetime

    return {"method": "volume matching: per-class logit offsets, mean log volume ratio to 0 on validation cases",
            "logit_offsets": [round(float(v), 4) for v in offsets], "tie_sides": bool(tie_sides), "context": bool(context),
            "mirror_tta": bool(mirror_tta), "cases": list(cases), "date": datetime.date.today().isoformat(), **report}
