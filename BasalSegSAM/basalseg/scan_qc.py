"""QC flags of a single scan, recorded in ``provenance.json`` (``qc_flags``) and printed by the CLI.

The same flags as the cohort report (:mod:`basalseg.cohortqc`, same thresholds,
:class:`~basalseg.cohortqc.Thresholds`), for one scan on its own, plus a plausibility range:

* ``missing``: a structure not found by the prompt generator, or found but empty;
* ``asymmetry``: ``|L - R| / ((L + R) / 2)`` of a left/right pair above 20 %;
* ``disagreement``: foundation vs student Dice on the prompted slices below 0.70 (pallidi 0.55);
* ``implausible``: a structure's volume outside :data:`PLAUSIBLE_ML` (wide adult and child
  ranges, a factor ~2 beyond published normal values either way), or the 8 together outside
  12-70 mL: a wrong image, a wrong voxel size in the header, or a segmentation gone wrong.

(The cohort-relative ``outlier`` flag needs a cohort: ``basalseg batch``/``report``.)
"""

from __future__ import annotations

import numpy as np

from .structures import STRUCTURES

__all__ = ["scan_flags", "PLAUSIBLE_ML", "PLAUSIBLE_TOTAL_ML"]

#: per structure part: (low, high) mL
PLAUSIBLE_ML = {"thalamus": (3.0, 14.0), "caudate": (1.5, 9.0), "putamen": (2.0, 11.0), "pallidum": (0.5, 4.0)}
PLAUSIBLE_TOTAL_ML = (12.0, 70.0)


def scan_flags(labels: np.ndarray, voxel_volume_mm3: float, missing: list[str], dice: dict | None = None) -> list[dict]:
    """Flags ``[{"kind", "message", "structure"}]`` for one result (module docstring)."""
    from .cohortqc import PAIRS, Thresholds

    t = Thresholds()
    vol = {s.key: float(np.count_nonzero(labels == s.label)) * voxel_volume_mm3 / 1000.0 for s in STRUCTURES}
    out: list[dict] = []

    def flag(kind: str, message: str, structure: str | None = None) -> None:
        out.append({"kind": kind, "message": message, "structure": structure})

    for s in STRUCTURES:
        part = s.key.split("_", 1)[1]
        if s.key in missing:
            flag("missing", f"{s.name} not found by the prompt generator (left empty)", s.key)
        elif vol[s.key] <= 0:
            flag("missing", f"{s.name} found but its segmentation is empty", s.key)
        else:
            lo, hi = PLAUSIBLE_ML[part]
            if not lo <= vol[s.key] <= hi:
                flag("implausible", f"{s.name} {vol[s.key]:.2f} mL outside the plausible {lo:g}-{hi:g} mL", s.key)
    total = sum(vol.values())
    if not PLAUSIBLE_TOTAL_ML[0] <= total <= PLAUSIBLE_TOTAL_ML[1]:
        flag("implausible", f"the 8 structures total {total:.1f} mL, outside the plausible "
                            f"{PLAUSIBLE_TOTAL_ML[0]:g}-{PLAUSIBLE_TOTAL_ML[1]:g} mL")
    for part, left, right in PAIRS:
        lv, rv = vol[left.key], vol[right.key]
        if lv > 0 and rv > 0:
            ai = abs(lv - rv) / ((lv + rv) / 2.0)
            if ai > t.asymmetry:
                flag("asymmetry", f"{part} asymmetry {100 * ai:.0f}% (> {100 * t.asymmetry:.0f}%)", part)
    by_key = {s.key: s for s in STRUCTURES}
    for key, d in (dice or {}).items():
        if d is not None and key in by_key and d < t.dice_for(key):
            flag("disagreement", f"{by_key[key].name}: foundation vs student Dice {d:.3f} (< {t.dice_for(key):.2f})", key)
    return out
