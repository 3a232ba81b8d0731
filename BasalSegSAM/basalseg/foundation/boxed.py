"""Foundation masks stored only inside the box that can hold them.

The foundation model writes masks only inside each prompted slice's crop (the union of its boxes
plus a margin, :func:`basalseg.foundation.runner.slice_roi`), so the ``(8, X, Y, Z)`` stack is
empty outside the union of those crops. On a 512^3 input a full boolean stack is 1 GB (8 bytes per
voxel) of which the basal ganglia and thalamus fill a few percent; :class:`BoxedMasks` keeps the
box only, and the pipeline reads crops of it (:meth:`BoxedMasks.crop`).

Coordinates: ``box`` is a tuple of three slices of the canonical ``(X, Y, Z)`` grid (voxel axis
order ``i, j, k``, half-open), ``data`` is ``(..., bx, by, bz)`` with the leading axes (planes,
structures) of the full array. Voxels outside ``box`` are False.

For code that wants the whole array (tests, the benchmark's voxel comparisons), a
:class:`BoxedMasks` behaves as that array where it is read: ``np.asarray(masks)``, ``masks[...]``,
``masks == other``, ``masks.shape``. Each of these builds the full array (the memory the box
saves), so the pipeline itself only uses :meth:`crop`, :attr:`data` and :attr:`box`.
"""

from __future__ import annotations

import numpy as np

from ..spatial import bounding_box

__all__ = ["BoxedMasks", "hull"]


def hull(*boxes: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    """The smallest box (tuple of slices, half-open, no steps) holding every given box; None-s are
    skipped, None when none is given."""
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return tuple(slice(min(b[d].start for b in boxes), max(b[d].stop for b in boxes)) for d in range(len(boxes[0])))


class BoxedMasks:
    """Boolean masks ``(..., X, Y, Z)`` of which only ``box`` is stored (module docstring).

    Args:
        data: ``(..., bx, by, bz)`` boolean, the masks inside ``box``.
        box: three slices of the full grid, ``stop - start`` equal to ``data``'s last three sizes.
        grid_shape: the full grid's ``(X, Y, Z)``.
    """

    __array_priority__ = 20  # ``ndarray == BoxedMasks`` defers to our __eq__

    def __init__(self, data: np.ndarray, box: tuple[slice, ...], grid_shape: tuple[int, ...]):
        data = np.asarray(data, dtype=bool)
        box = tuple(slice(int(s.start), int(s.stop)) for s in box)
        grid_shape = tuple(int(n) for n in grid_shape)
        if len(box) != 3 or len(grid_shape) != 3 or data.ndim < 3:
            raise ValueError(f"boxed masks need a 3D box and grid, got box {box}, grid {grid_shape}, data {data.shape}")
        if tuple(s.stop - s.start for s in box) != data.shape[-3:]:
            raise ValueError(f"box {box} does not match the data's shape {data.shape}")
        if any(s.start < 0 or s.stop > n for s, n in zip(box, grid_shape)):
            raise ValueError(f"box {box} lies outside the grid {grid_shape}")
        self.data, self.box, self.grid_shape = data, box, grid_shape

    @classmethod
    def empty(cls, lead: tuple[int, ...], box: tuple[slice, ...], grid_shape: tuple[int, ...]) -> "BoxedMasks":
        """All-False masks with leading axes ``lead`` stored in ``box``."""
        box = tuple(slice(int(s.start), int(s.stop)) for s in box)
        return cls(np.zeros(tuple(lead) + tuple(s.stop - s.start for s in box), dtype=bool), box, grid_shape)

    # --- what the pipeline uses --------------------------------------------------------------

    def crop(self, region: tuple[slice, ...]) -> np.ndarray:
        """The masks inside ``region`` (three half-open slices of the full grid, clipped to it):
        ``(..., rx, ry, rz)``, False where ``region`` reaches outside the box."""
        region = tuple(slice(max(int(r.start or 0), 0), min(int(n if r.stop is None else r.stop), n))
                       for r, n in zip(region, self.grid_shape))
        out = np.zeros(self.data.shape[:-3] + tuple(max(r.stop - r.start, 0) for r in region), dtype=bool)
        src, dst = [], []
        for r, b in zip(region, self.box):
            lo, hi = max(r.start, b.start), min(r.stop, b.stop)
            if hi <= lo:
                return out
            src.append(slice(lo - b.start, hi - b.start))
            dst.append(slice(lo - r.start, hi - r.start))
        out[(Ellipsis,) + tuple(dst)] = self.data[(Ellipsis,) + tuple(src)]
        return out

    def rebox(self, box: tuple[slice, ...]) -> "BoxedMasks":
        """The same masks stored in another box (which must hold every True voxel to keep them)."""
        return BoxedMasks(self.crop(box), box, self.grid_shape)

    def bounding_box(self) -> tuple[slice, ...] | None:
        """Slices (full grid) around the True voxels of every leading channel; None when empty."""
        inner = bounding_box(self.data.reshape((-1,) + self.data.shape[-3:]).any(axis=0))
        if inner is None:
            return None
        return tuple(slice(b.start + i.start, b.start + i.stop) for i, b in zip(inner, self.box))

    def __len__(self) -> int:
        return self.data.shape[0]

    def channel(self, index) -> "BoxedMasks":
        """Leading-axis indexing that keeps the box (``masks.channel(0)``: plane 0's stack)."""
        return BoxedMasks(self.data[index], self.box, self.grid_shape)

    # --- the full array, for readers that want it ---------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape[:-3] + self.grid_shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def to_array(self) -> np.ndarray:
        """The full ``(..., X, Y, Z)`` boolean array (allocates it)."""
        out = np.zeros(self.shape, dtype=bool)
        out[(Ellipsis,) + self.box] = self.data
        return out

    def __array__(self, dtype=None, copy=None):
        full = self.to_array()
        return full if dtype is None else full.astype(dtype)

    def __getitem__(self, key):
        return self.to_array()[key]

    def __eq__(self, other):
        return self.to_array() == np.asarray(other)

    def __ne__(self, other):
        return self.to_array() != np.asarray(other)

    __hash__ = None  # mutable, compared element-wise like an array

    def __repr__(self) -> str:
        return f"BoxedMasks(shape={self.shape}, box={tuple((s.start, s.stop) for s in self.box)})"
