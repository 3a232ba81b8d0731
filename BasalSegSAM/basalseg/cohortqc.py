"""Cohort QC flags: which scans of a cohort of results to look at, and why.

Plain data in, plain data out: :class:`~basalseg.results.ResultRecord` objects (anything with
their ``name``, ``volume_ml``, ``missing``, ``dice``, ``provenance`` and ``spacing``) and a
:class:`Thresholds`; :func:`cohort_flags` gives ``{scan: [Flag]}`` and the cohort's per-structure
statistics, :func:`cohort_warnings` the differences that make the results less comparable. The
cohort report (:mod:`basalseg.report`) shows them; :mod:`basalseg.scan_qc` applies the same
thresholds to one scan.

**Flags** (defaults, :class:`Thresholds`; each is an option of ``basalseg report``):

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
    carried prompts for that structure (``foundation_student_dice`` in provenance) below 0.70
    (0.55 for the pallidi, :data:`PALLIDUM_DICE_MARGIN`).
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

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .structures import STRUCTURES

if TYPE_CHECKING:
    from .results import ResultRecord

__all__ = ["Thresholds", "Flag", "PAIRS", "PALLIDUM_DICE_MARGIN", "asymmetry_indices", "cohort_flags", "cohort_warnings"]

#: left/right pairs for the asymmetry index: (part, left structure, right structure)
PAIRS = tuple((s.key.split("_", 1)[1], s, r) for s in STRUCTURES if s.hemisphere == "left"
              for r in STRUCTURES if r.key == "right_" + s.key.split("_", 1)[1])
_BY_KEY = {s.key: s for s in STRUCTURES}
#: the pallidi's disagreement threshold sits this far below the others': on 26 results of
#: ordinary synthetic heads (2026-12-07) their foundation-vs-student Dice had a median of 0.68
#: (0.57-0.83), 85-92 % of them under 0.70, against medians of 0.79-0.88 for the other structures
PALLIDUM_DICE_MARGIN = 0.15


@dataclass
class Thresholds:
    """Flag thresholds (see the module docstring); asymmetry is a fraction (0.20 = 20 %).

    Raises:
        ValueError: a threshold out of range (naming it).
    """

    iqr_factor: float = 1.5
    min_cohort: int = 5
    asymmetry: float = 0.20
    dice: float = 0.70

    def dice_for(self, key: str) -> float:
        """The disagreement threshold of a structure: ``dice``, less :data:`PALLIDUM_DICE_MARGIN`
        for the pallidi (whose foundation masks agree less with the student on good results too)."""
        return max(0.0, self.dice - PALLIDUM_DICE_MARGIN) if key.endswith("pallidum") else self.dice

    def __post_init__(self):
        if not self.iqr_factor > 0:
            raise ValueError(f"iqr_factor must be > 0, got {self.iqr_factor}")
        if self.min_cohort < 1:
            raise ValueError(f"min_cohort must be >= 1, got {self.min_cohort}")
        if not self.asymmetry > 0:
            raise ValueError(f"asymmetry must be > 0 (a fraction, 0.2 = 20 %), got {self.asymmetry}")
        if not 0 <= self.dice <= 1:
            raise ValueError(f"dice must be in 0..1, got {self.dice}")


@dataclass
class Flag:
    """One QC flag of a scan."""

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


def _cohort_stats(records: list[ResultRecord], thresholds: Thresholds) -> dict[str, dict]:
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


#: flag kinds computed here from the volumes and provenance (with the given thresholds); the pipeline's ``qc_flags`` of other kinds (``partial_coverage``, ``implausible``,
#: ...) are shown as recorded
_COMPUTED_HERE = ("outlier", "asymmetry", "missing", "disagreement", "failed")


def cohort_flags(records: list[ResultRecord], thresholds: Thresholds | None = None
                 ) -> tuple[dict[str, list[Flag]], dict[str, dict]]:
    """``({scan name: [flags]}, per-structure stats)`` for complete results."""
    thresholds = thresholds or Thresholds()
    stats = _cohort_stats(records, thresholds)
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
            if d is not None and key in _BY_KEY and d < thresholds.dice_for(key):
                out.append(Flag("disagreement", f"{_BY_KEY[key].name}: foundation vs student Dice {d:.3f} "
                                                f"(< {thresholds.dice_for(key):.2f})", key))
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
