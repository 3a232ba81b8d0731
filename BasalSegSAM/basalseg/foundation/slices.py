"""The 2D images a foundation backend sees: a volume's slices across one canonical axis.

**Planes.** Axial slices are across axis 2 (``k``), coronal across axis 1 (``j``), sagittal
across axis 0 (``i``); :func:`slice_image` states each plane's row/column convention and
:func:`plane_view` addresses a ``(..., X, Y, Z)`` array by ``(x, y, slice)`` of a plane.

**3-slice context** (``context=True``, after SlideSAM): the image given to the backend is
``(H, W, 3)`` whose colour channels are slices ``k-1, k, k+1`` of the same plane (clamped at
the volume's first and last slice, where the missing neighbour is the slice itself), instead of
slice ``k`` alone (which the backends repeat to 3 channels). Prompts and masks still belong to
slice ``k``.
"""

from __future__ import annotations

import numpy as np

from ..prompts import plane_axes

__all__ = ["plane_view", "slice_image"]


def plane_view(array: np.ndarray, axis: int) -> np.ndarray:
    """A view of ``array`` (``(..., X, Y, Z)``) whose last three axes are ``(x, y, slice)`` of the
    plane across ``axis``: ``[..., x, y, k]`` addresses the voxel at slice ``k``, pixel ``(x, y)``
    (axial: unchanged; coronal: ``(i, k, j)``; sagittal: ``(j, k, i)``). Writes go through to
    ``array``."""
    plane_axes(axis)
    return np.moveaxis(array, array.ndim - 3 + axis, -1)


def slice_image(volume01: np.ndarray, k: int, axis: int = 2, context: bool = False) -> np.ndarray:
    """Slice ``k`` across ``axis`` as the 2D image backends see (rows ``y``, columns ``x``):

    * axial (``axis=2``, default): ``volume[:, :, k].T``, shape ``(Y, X)``: rows ``j``, columns ``i``;
    * coronal (``axis=1``): ``volume[:, k, :].T``, shape ``(Z, X)``: rows ``k``, columns ``i``;
    * sagittal (``axis=0``): ``volume[k, :, :].T``, shape ``(Z, Y)``: rows ``k``, columns ``j``.

    With ``context`` the result is ``(H, W, 3)``: channels are slices ``k-1, k, k+1`` of the
    same plane, clamped at the ends (slice 0 gives channels ``0, 0, 1``; the last slice ``n-1``
    gives ``n-2, n-1, n-1``).
    """
    view = plane_view(volume01, axis)
    if not context:
        return np.ascontiguousarray(view[:, :, k].T)
    last = view.shape[2] - 1
    ks = (max(k - 1, 0), k, min(k + 1, last))
    return np.ascontiguousarray(np.stack([view[:, :, n].T for n in ks], axis=-1))
