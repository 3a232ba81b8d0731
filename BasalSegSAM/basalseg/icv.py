"""Brain-mask (intracranial proxy) and brain-tissue volume from the T1 itself, for normalising.

Structure volumes are usually divided by (or regressed on) a head-size measure. BasalSegSAM does
not run a skull-stripping network, so it estimates that measure only where it can do so honestly:
from **skull-stripped** T1s, whose background is an exact constant (0 in practice).

Method (:func:`estimate_brain_volumes`, on the input's own grid, volumes = voxel count x
``|det(affine)|``):

1. ``lo`` = the image minimum; ``hi`` = the 99th percentile of the voxels above ``lo``.
   Foreground = voxels above ``lo + 0.02 (hi - lo)`` (2 % of the robust range; T1 CSF sits well
   above that, interpolation fringes below it).
2. Keep the largest 6-connected component (drops specks), then fill its enclosed holes in 3D
   (ventricles or dark lesions that a stripping tool zeroed are counted).
   ``brain_mask_ml`` = the volume of this mask: everything the skull stripping kept, i.e. brain
   plus the CSF inside the mask. With a mask that includes the extracerebral CSF (BET, SynthStrip,
   FreeSurfer ``brainmask``) it approximates the intracranial volume; with a tight brain-only mask
   it is smaller than ICV.
3. The mask's intensities are split into 3 classes by 1D k-means (initialised at the 5th, 50th and
   95th percentiles); with T1 contrast the darkest class is CSF. ``brain_volume_ml`` = mask minus
   CSF-class voxels (grey + white matter). Crude: no bias-field correction, partial-volume voxels
   go to the nearest class mean.

**When it gives no number** (``status = "not_estimated"``, blank in the tables, with the reason):

* ``skull_stripped="auto"`` (default) decides the image is *not* skull-stripped unless at least
  10 % of its voxels equal the minimum exactly **and** the mask is 150-2600 mL (neonatal brain to
  large adult ICV). A raw head image has a noisy, non-constant background, or gives a
  head-sized mask; its "brain mask" would be the head, so no volume is reported. Limits: a
  non-stripped image with a zero-filled background and a small head (a young child) can pass the
  test; pass ``no`` then (``--skull-stripped no``). ``yes`` skips the test.
* The mask touches the image border on more than 25 % of its surface voxels: the field of view
  does not contain the brain (a crop). Between 2 % and 25 % (e.g. brainstem cut at the bottom of
  the field of view) the numbers are given with ``status = "truncated"``: a lower bound.

For a proper ICV, use a dedicated tool (FreeSurfer eTIV, SynthStrip + this module, SPM TIV) and join
its table to BasalSegSAM's ``volumes.csv`` on the ``scan`` column.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["estimate_brain_volumes", "METHOD", "SKULL_STRIPPED_CHOICES"]

#: One line recorded with every estimate.
METHOD = ("foreground > 2% of robust range, largest component, 3D hole filling (brain_mask_ml); "
          "minus the darkest of 3 k-means intensity classes (CSF) (brain_volume_ml); skull-stripped T1 only")

SKULL_STRIPPED_CHOICES = ("auto", "yes", "no")

_THRESHOLD_FRACTION = 0.02
_MIN_BACKGROUND_FRACTION = 0.10
_PLAUSIBLE_ML = (150.0, 2600.0)
_EDGE_NOT_ESTIMATED = 0.25
_EDGE_TRUNCATED = 0.02


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _kmeans_1d(values: np.ndarray, k: int = 3, iterations: int = 30) -> np.ndarray:
    """Sorted class centres of a 1D k-means (deterministic initialisation at percentiles)."""
    centres = np.percentile(values, np.linspace(5, 95, k)).astype(np.float64)
    for _ in range(iterations):
        edges = (centres[1:] + centres[:-1]) / 2
        assign = np.searchsorted(edges, values)
        new = np.array([values[assign == c].mean() if np.any(assign == c) else centres[c] for c in range(k)])
        if np.allclose(new, centres, rtol=0, atol=1e-6 * (abs(centres).max() + 1)):
            break
        centres = np.sort(new)
    return centres


def _edge_fraction(mask: np.ndarray) -> float:
    """Share of the mask's surface voxels that lie on the image border."""
    surface = mask & ~ndimage.binary_erosion(mask, border_value=0)  # border voxels are surface
    n_surface = int(surface.sum())
    if n_surface == 0:
        return 0.0
    border = np.zeros(mask.shape, dtype=bool)
    for axis in range(3):
        index = [slice(None)] * 3
        index[axis] = 0
        border[tuple(index)] = True
        index[axis] = -1
        border[tuple(index)] = True
    return float((mask & border).sum() / n_surface)


def estimate_brain_volumes(data: np.ndarray, voxel_volume_mm3: float, skull_stripped: str = "auto") -> dict:
    """Brain-mask and brain-tissue volumes of a T1 (see the module docstring for the method and limits).

    Args:
        data: the 3D image on its own grid.
        voxel_volume_mm3: volume of one voxel.
        skull_stripped: ``"auto"`` (test the image), ``"yes"`` (trust it is) or ``"no"`` (give no volume).

    Returns:
        ``{"status": "ok" | "truncated" | "not_estimated", "reason": str, "brain_mask_ml": float | None,
        "brain_volume_ml": float | None, "csf_ml": float | None, "background_fraction", "edge_fraction",
        "skull_stripped": str, "method": str}``.
    """
    if skull_stripped not in SKULL_STRIPPED_CHOICES:
        raise ValueError(f"skull_stripped must be one of {SKULL_STRIPPED_CHOICES}, got {skull_stripped!r}")
    record = {"status": "not_estimated", "reason": "", "brain_mask_ml": None, "brain_volume_ml": None, "csf_ml": None,
              "background_fraction": None, "edge_fraction": None, "skull_stripped": skull_stripped, "method": METHOD}
    if skull_stripped == "no":
        record["reason"] = "the image is declared not skull-stripped (--skull-stripped no)"
        return record
    data = np.asarray(data, dtype=np.float32)
    lo = float(data.min())
    span = float(data.max()) - lo
    at_min = data <= lo + 1e-6 * max(span, 1e-12)
    record["background_fraction"] = round(float(at_min.mean()), 4)
    above = data[~at_min]
    if above.size == 0:
        record["reason"] = "the image is constant"
        return record
    hi = float(np.percentile(above[:: max(1, above.size // 2_000_000)], 99))
    mask = data > lo + _THRESHOLD_FRACTION * (hi - lo)
    if not mask.any():
        record["reason"] = "no foreground above the threshold"
        return record
    mask = ndimage.binary_fill_holes(_largest_component(mask))
    ml = float(mask.sum()) * float(voxel_volume_mm3) / 1000.0
    edge = _edge_fraction(mask)
    record["edge_fraction"] = round(edge, 4)
    if skull_stripped == "auto":
        if record["background_fraction"] < _MIN_BACKGROUND_FRACTION:
            record["reason"] = (f"the image does not look skull-stripped: only {100 * record['background_fraction']:.1f}% of "
                                f"voxels are at the background value (needs {100 * _MIN_BACKGROUND_FRACTION:.0f}%)")
            return record
        if not _PLAUSIBLE_ML[0] <= ml <= _PLAUSIBLE_ML[1]:
            record["reason"] = (f"the image does not look skull-stripped: its foreground is {ml:.0f} mL, outside the "
                                f"{_PLAUSIBLE_ML[0]:.0f}-{_PLAUSIBLE_ML[1]:.0f} mL of a brain")
            return record
    if edge > _EDGE_NOT_ESTIMATED:
        record["reason"] = (f"the foreground touches the image border on {100 * edge:.0f}% of its surface: "
                            "the field of view does not contain the whole brain")
        return record
    values = data[mask].astype(np.float64)
    centres = _kmeans_1d(values[:: max(1, values.size // 1_000_000)])
    csf = values < (centres[0] + centres[1]) / 2
    csf_ml = float(csf.sum()) * float(voxel_volume_mm3) / 1000.0
    record.update({"brain_mask_ml": round(ml, 3), "csf_ml": round(csf_ml, 3), "brain_volume_ml": round(ml - csf_ml, 3)})
    if edge > _EDGE_TRUNCATED:
        record["status"] = "truncated"
        record["reason"] = (f"the brain touches the image border on {100 * edge:.0f}% of its surface (cut by the "
                            "field of view): the volumes are lower bounds")
    else:
        record["status"] = "ok"
    return record
