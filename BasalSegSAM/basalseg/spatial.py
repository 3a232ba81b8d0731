"""Canonical space for the networks, and the exact way back to the input grid.

**Canonical space** (written once, used by every network stage): an axis-aligned RAS+ grid
with isotropic voxels (1 mm by default) that covers the input's field of view. Its arrays are
indexed ``[i, j, k]`` with ``i`` increasing toward the patient's Right, ``j`` Anterior and
``k`` Superior. An **axial slice** is ``array[:, :, k]``.

Inputs in any orientation (RAS, LPS, oblique) and with any voxel size map to this space with
:func:`to_canonical`; results go back to the input grid with :func:`resample_to_grid`
(nearest neighbour for labels). When the input grid is itself a permutation/flip of the
canonical grid with the same spacing (RAS or LPS 1 mm), both directions are exact array
re-indexing, no interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .imageio import Volume

__all__ = ["Grid", "canonical_grid", "to_canonical", "resample_to_grid", "bounding_box", "crop_slices"]


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (I, J, K) and the 4x4 voxel-to-RAS ``affine`` (mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def to_dict(self) -> dict:
        return {"shape": [int(s) for s in self.shape], "affine": np.asarray(self.affine).round(6).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(tuple(int(s) for s in d["shape"]), np.asarray(d["affine"], dtype=np.float64))  # type: ignore[arg-type]


def canonical_grid(shape: tuple[int, ...], affine: np.ndarray, spacing: float = 1.0) -> Grid:
    """The RAS+ grid of isotropic ``spacing`` covering the voxel centres of an input grid.

    Its first voxel sits on the input's lowest (R, A, S) voxel centre, so RAS or LPS inputs
    of the same spacing share their voxel centres with it.
    """
    shape = tuple(int(s) for s in shape[:3])
    corners = np.array([[a, b, c, 1.0] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)])
    world = (np.asarray(affine, dtype=np.float64) @ corners.T)[:3].T
    lo, hi = world.min(axis=0), world.max(axis=0)
    out_shape = tuple(int(np.floor((h - l) / spacing + 1e-3)) + 1 for l, h in zip(lo, hi))
    out_affine = np.diag([spacing, spacing, spacing, 1.0])
    out_affine[:3, 3] = lo
    return Grid(out_shape, out_affine)  # type: ignore[arg-type]


def _as_reindexing(vox_map: np.ndarray, from_shape, to_shape, tol: float = 1e-4):
    """If ``vox_map`` (to-voxel -> from-voxel) is a signed axis permutation with integer offsets
    that maps the target grid exactly onto the source grid, return ``(perm, flips)``, else None."""
    rot, trans = vox_map[:3, :3], vox_map[:3, 3]
    rounded = np.round(rot)
    if not np.allclose(rot, rounded, atol=tol) or not np.allclose(trans, np.round(trans), atol=tol):
        return None
    if sorted(np.abs(rounded).sum(axis=0).tolist()) != [1, 1, 1] or sorted(np.abs(rounded).sum(axis=1).tolist()) != [1, 1, 1]:
        return None
    # target axis t reads source axis perm[t], flipped when the sign is negative
    perm = [int(np.argmax(np.abs(rounded[:, t]))) for t in range(3)]
    flips = [rounded[perm[t], t] < 0 for t in range(3)]
    for t in range(3):
        src_len = from_shape[perm[t]]
        start = trans[perm[t]]
        if to_shape[t] != src_len:
            return None
        expected = src_len - 1 if flips[t] else 0
        if abs(start - expected) > tol:
            return None
    return perm, flips


def resample_to_grid(
    data: np.ndarray, from_affine: np.ndarray, to_grid: Grid, order: int = 1, cval: float = 0.0
) -> np.ndarray:
    """Resample an array on one grid onto another (world coordinates matched through affines).

    Args:
        data: array ``(I, J, K)`` on the grid described by ``from_affine``.
        from_affine: its 4x4 voxel-to-RAS matrix.
        to_grid: target grid.
        order: spline order: 0 nearest (labels), 1 trilinear (images).
        cval: value outside the source field of view.

    Returns:
        Array of ``to_grid.shape``, same dtype as ``data`` for ``order=0``, float32 otherwise.
    """
    vox_map = np.linalg.inv(np.asarray(from_affine, dtype=np.float64)) @ to_grid.affine
    exact = _as_reindexing(vox_map, data.shape, to_grid.shape)
    if exact is not None:
        perm, flips = exact
        out = np.transpose(data, perm)
        index = tuple(slice(None, None, -1) if f else slice(None) for f in flips)
        return np.ascontiguousarray(out[index]).astype(data.dtype if order == 0 else np.float32, copy=False)
    out_dtype = data.dtype if order == 0 else np.float32
    src = data if order == 0 else np.asarray(data, dtype=np.float32)
    return ndimage.affine_transform(
        src, vox_map[:3, :3], vox_map[:3, 3], output_shape=tuple(to_grid.shape), order=order,
        mode="constant", cval=cval, output=out_dtype, prefilter=False,
    )


def to_canonical(volume: Volume, spacing: float = 1.0, order: int = 1) -> tuple[np.ndarray, Grid]:
    """Resample a volume into canonical space (see module docstring).

    Returns:
        ``(data, grid)``: float32 array on the canonical grid, and that grid.
    """
    grid = canonical_grid(volume.shape, volume.affine, spacing)
    return resample_to_grid(volume.data, volume.affine, grid, order=order), grid


def bounding_box(mask: np.ndarray, margin: int | tuple[int, ...] = 0) -> tuple[slice, ...] | None:
    """Slices of the bounding box of ``mask``'s non-zero voxels grown by ``margin``, clipped to the
    array; ``None`` for an empty mask."""
    nz = np.nonzero(mask)
    if len(nz[0]) == 0:
        return None
    margins = (margin,) * mask.ndim if isinstance(margin, int) else tuple(margin)
    return tuple(
        slice(max(int(idx.min()) - m, 0), min(int(idx.max()) + 1 + m, n))
        for idx, m, n in zip(nz, margins, mask.shape)
    )


def crop_slices(center: np.ndarray, size: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Slices of a box of ``size`` centred on ``center``, shifted to stay inside ``shape`` where
    possible (a box larger than the array is clipped)."""
    out = []
    for c, s, n in zip(center, size, shape):
        start = int(round(c - s / 2))
        start = min(max(start, 0), max(n - s, 0))
        out.append(slice(start, min(start + s, n)))
    return tuple(out)
