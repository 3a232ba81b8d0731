"""The signed-distance-map (SDM) channel built from the foundation model's stacked masks.

Definition (per structure, on the canonical grid):

* ``d(v)`` is the signed Euclidean distance from voxel ``v`` to the mask boundary in voxels,
  **negative inside**, positive outside, with the boundary halfway between an inside and an
  outside voxel (so the voxels on either side of it sit at -0.5 and +0.5).
* ``sdm(v) = sigmoid(-d(v) / T)`` where ``|d(v)| <= band``, with temperature ``T = band / 6``;
  beyond the band it is exactly 1 inside and 0 outside. The channel is therefore 0.5 on the
  boundary, rises to ~1 over ``band`` voxels inwards and falls to ~0 over ``band`` voxels
  outwards: it tells the student where the foundation model put the edge and how far each voxel
  is from it, and says nothing far from any edge.

Channel design: **one channel per structure** (8 channels; together with the T1 the student reads
9 channels). A single combined channel would erase the borders between touching structures
(putamen/pallidum, caudate/putamen, left/right thalamus), which are exactly where the foundation
model's per-structure masks carry information the T1 lacks.

Distances come from the ``edt`` package (exact, multi-threaded) when installed, else from
``scipy.ndimage.distance_transform_edt`` (exact, same values).

**Multi-plane fusion** (``--planes axial,coronal,sagittal``; ``docs/CONTEXT_AND_PLANES.md``).
When the foundation model ran on P planes, each plane's stacked masks ``(8, X, Y, Z)`` give
their own SDM channels, and the fused channel of a structure is the **mean over the planes** of
that structure's SDM (:func:`fused_sdm_channels`): still 8 channels, so the student's input is
unchanged. Why the mean of the SDMs rather than a vote on the masks: a voxel that one plane
misses (a slice it had no prompt on, a leak it cut off) still gets a soft value from the others
instead of a hard 0 or 1; the mean of values in [0, 1] stays in [0, 1]; where all planes agree
it is their common value (1 deep inside, 0 far outside, the same sigmoid near a shared edge);
and where the planes disagree evenly it sits near 0.5, the value the single-plane SDM gives
on an edge, so the student reads disagreement as "boundary, uncertain". With one plane it is
exactly :func:`sdm_channels`. For a hard mask ("foundation alone" scores, the QC and
``SegmentResult.masks``) the planes are fused by majority vote (:func:`majority_vote`: at least
2 of 3 planes).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["signed_distance", "sdm_channel", "sdm_channels", "fused_sdm_channels", "majority_vote", "DEFAULT_BAND"]

DEFAULT_BAND = 10.0

try:  # optional fast exact EDT
    import edt as _edt
except ImportError:  # pragma: no cover - exercised where edt is absent
    _edt = None


def _edt_inside(mask: np.ndarray, spacing: tuple[float, ...], threads: int) -> np.ndarray:
    """Distance from each True voxel to the nearest False voxel (0 on False voxels)."""
    if _edt is not None:
        return _edt.edt(np.ascontiguousarray(mask, dtype=np.uint8), anisotropy=spacing, black_border=False,
                        parallel=threads).astype(np.float32)
    return ndimage.distance_transform_edt(mask, sampling=spacing).astype(np.float32)


def signed_distance(mask: np.ndarray, spacing: tuple[float, ...] | None = None, threads: int = 1) -> np.ndarray:
    """Signed distance to the boundary of ``mask``: negative inside, positive outside, +-0.5 at the
    voxels next to the boundary (see module docstring).

    An empty mask gives +inf everywhere, a full one -inf everywhere.
    """
    mask = np.asarray(mask, dtype=bool)
    spacing = tuple(float(s) for s in (spacing or (1.0,) * mask.ndim))
    if not mask.any():
        return np.full(mask.shape, np.inf, dtype=np.float32)
    if mask.all():
        return np.full(mask.shape, -np.inf, dtype=np.float32)
    inside = _edt_inside(mask, spacing, threads)
    outside = _edt_inside(~mask, spacing, threads)
    half = 0.5 * min(spacing)
    return np.where(mask, -(inside - half), outside - half).astype(np.float32)


def sdm_channel(mask: np.ndarray, band: float = DEFAULT_BAND, spacing: tuple[float, ...] | None = None,
                threads: int = 1) -> np.ndarray:
    """The SDM channel of one mask (float32 in [0, 1], same shape).

    Args:
        mask: boolean mask (any dimensionality; 3D on the canonical grid in the pipeline).
        band: half-width of the band around the boundary, in voxels (mm on a 1 mm grid). Must be > 0.
        spacing: voxel size per axis; distances are measured in these units.
        threads: threads for the ``edt`` package.

    Raises:
        ValueError: ``band`` is not positive.
    """
    if not band > 0:
        raise ValueError(f"band must be > 0, got {band}")
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=np.float32)
    # Only the mask's bounding box grown by the band can differ from 0; compute there.
    nz = np.nonzero(mask)
    if len(nz[0]) == 0:
        return out
    # band is in spacing units: grow by that many voxels along the finest axis (+2 for the boundary)
    finest = min(spacing) if spacing else 1.0
    grow = int(np.ceil(band / finest)) + 2
    box = tuple(slice(max(int(i.min()) - grow, 0), min(int(i.max()) + 1 + grow, n)) for i, n in zip(nz, mask.shape))
    d = signed_distance(mask[box], spacing, threads)
    # Exact: the grown margin is all background, so every nearest boundary point lies inside
    # the crop (and where the crop meets the array edge, so does the full array).
    t = band / 6.0
    inner = np.clip(-d / t, -60.0, 60.0)
    val = 1.0 / (1.0 + np.exp(-inner))
    val = np.where(d < -band, 1.0, np.where(d > band, 0.0, val))
    out[box] = val.astype(np.float32)
    return out


def sdm_channels(masks: np.ndarray, band: float = DEFAULT_BAND, threads: int = 1) -> np.ndarray:
    """SDM channels for a stack of masks.

    Args:
        masks: ``(C, X, Y, Z)`` boolean, one mask per structure (class index order).
        band: see :func:`sdm_channel`.

    Returns:
        ``(C, X, Y, Z)`` float32.
    """
    return np.stack([sdm_channel(m, band=band, threads=threads) for m in masks])


def fused_sdm_channels(plane_masks: np.ndarray, band: float = DEFAULT_BAND, threads: int = 1) -> np.ndarray:
    """Multi-plane SDM channels: the mean over planes of each plane's :func:`sdm_channels`.

    Args:
        plane_masks: ``(P, C, X, Y, Z)`` boolean, one stack of per-structure masks per plane (the
            foundation model run on axial, coronal, sagittal slices); ``(C, X, Y, Z)`` is read as
            one plane.
        band: see :func:`sdm_channel`.

    Returns:
        ``(C, X, Y, Z)`` float32 in [0, 1] (module docstring: why the mean).
    """
    plane_masks = np.asarray(plane_masks, dtype=bool)
    if plane_masks.ndim == 4:
        return sdm_channels(plane_masks, band=band, threads=threads)
    if plane_masks.ndim != 5 or plane_masks.shape[0] < 1:
        raise ValueError(f"plane masks must be (P, C, X, Y, Z), got shape {plane_masks.shape}")
    total = np.zeros(plane_masks.shape[1:], dtype=np.float32)
    for masks in plane_masks:
        total += sdm_channels(masks, band=band, threads=threads)
    return (total / np.float32(plane_masks.shape[0])).astype(np.float32)


def majority_vote(plane_masks: np.ndarray) -> np.ndarray:
    """Per structure, the voxels that more than half of the planes mark (2 of 3; both of 2; the
    mask itself for 1 plane). ``(P, C, X, Y, Z)`` -> ``(C, X, Y, Z)`` bool; a ``(C, X, Y, Z)``
    input is returned as is."""
    plane_masks = np.asarray(plane_masks, dtype=bool)
    if plane_masks.ndim == 4:
        return plane_masks
    if plane_masks.ndim != 5 or plane_masks.shape[0] < 1:
        raise ValueError(f"plane masks must be (P, C, X, Y, Z), got shape {plane_masks.shape}")
    n = plane_masks.shape[0]
    if n == 1:
        return plane_masks[0].copy()
    votes = plane_masks.sum(axis=0, dtype=np.uint8)
    return votes > n // 2
