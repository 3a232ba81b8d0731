"""Quality-control pictures: the result drawn over the image.

Slices are shown in radiological convention (the patient's right on the picture's left,
anterior at the top of axial views, superior at the top of coronal views), as 3D Slicer shows
them. Structure outlines use the FreeSurfer colours of :mod:`basalseg.structures`; prompt boxes,
when given, are drawn as thin rectangles in the same colours.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .prompts import PromptSet
from .structures import STRUCTURES

__all__ = ["overlay_png", "axial_rgb", "coronal_rgb", "pick_slices"]


def pick_slices(classes: np.ndarray, axis: int, n: int) -> list[int]:
    """``n`` slice indices spread over the extent of the labelled structures along ``axis``
    (the middle of the volume when nothing is labelled)."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.nonzero((classes > 0).any(axis=other))[0]
    if present.size == 0:
        mid = classes.shape[axis] // 2
        return [mid] * n if n == 1 else list(np.linspace(mid - 10, mid + 10, n).round().astype(int).clip(0, classes.shape[axis] - 1))
    lo, hi = present.min(), present.max()
    return list(np.linspace(lo + (hi - lo) * 0.15, hi - (hi - lo) * 0.15, n).round().astype(int))


def _outline_rgb(gray: np.ndarray, labels: np.ndarray) -> np.ndarray:
    rgb = np.repeat((np.clip(gray, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    for s in STRUCTURES:
        mask = labels == s.class_index
        if mask.any():
            edge = mask & ~ndimage.binary_erosion(mask)
            rgb[edge] = s.color
    return rgb


def axial_rgb(image01: np.ndarray, classes: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` as an RGB picture ``(rows, cols, 3)``: rows anterior->posterior,
    columns patient right->left."""
    view = lambda a: a[::-1, ::-1, k].T  # noqa: E731  rows = -j, cols = -i
    return _outline_rgb(view(image01), view(classes))


def coronal_rgb(image01: np.ndarray, classes: np.ndarray, j: int) -> np.ndarray:
    """Coronal slice ``j``: rows superior->inferior, columns patient right->left."""
    view = lambda a: a[::-1, j, ::-1].T  # noqa: E731
    return _outline_rgb(view(image01), view(classes))


def _draw_boxes(img: Image.Image, prompts: PromptSet, k: int, nx: int, ny: int, zoom: int) -> None:
    draw = ImageDraw.Draw(img)
    for p in prompts.on_slice(k):
        x0, y0, x1, y1 = p.box
        # picture column = nx-1-x, row = ny-1-y (see axial_rgb)
        c0, c1 = (nx - 1 - x1) * zoom, (nx - 1 - x0 + 1) * zoom - 1
        r0, r1 = (ny - 1 - y1) * zoom, (ny - 1 - y0 + 1) * zoom - 1
        draw.rectangle([c0, r0, c1, r1], outline=p.struct.color, width=1)


def overlay_png(image01: np.ndarray, classes: np.ndarray, prompts: PromptSet | None = None, n: int = 4,
                zoom: int = 2, crop_margin: int = 25, title: str | None = None) -> bytes:
    """A PNG montage: ``n`` axial slices (top row) and ``n`` coronal slices (bottom row).

    Args:
        image01: ``(X, Y, Z)`` canonical image in [0, 1].
        classes: ``(X, Y, Z)`` class indices on the same grid.
        prompts: draw these boxes on the axial views.
        n: slices per row.
        zoom: integer magnification.
        crop_margin: voxels kept around the structures (the whole slice when nothing is labelled).
        title: text written at the top.
    """
    from .spatial import bounding_box

    box = bounding_box(classes > 0, crop_margin) or tuple(slice(0, s) for s in classes.shape)
    img_c, cls_c = image01[box], classes[box]
    offset = [b.start for b in box]
    tiles_ax = []
    for k in pick_slices(cls_c, 2, n):
        tile = Image.fromarray(axial_rgb(img_c, cls_c, k)).resize((cls_c.shape[0] * zoom, cls_c.shape[1] * zoom), Image.NEAREST)
        if prompts is not None:
            shifted = PromptSet(grid=prompts.grid, prompts=[])
            for p in prompts.on_slice(k + offset[2]):
                q = type(p)(p.structure, k, [p.box[0] - offset[0], p.box[1] - offset[1], p.box[2] - offset[0], p.box[3] - offset[1]])
                shifted.prompts.append(q)
            _draw_boxes(tile, shifted, k, cls_c.shape[0], cls_c.shape[1], zoom)
        tiles_ax.append(tile)
    tiles_co = [Image.fromarray(coronal_rgb(img_c, cls_c, j)).resize((cls_c.shape[0] * zoom, cls_c.shape[2] * zoom), Image.NEAREST)
                for j in pick_slices(cls_c, 1, n)]
    width = sum(t.width for t in tiles_ax) + 4 * (n - 1)
    head = 16 if title else 0
    height = head + tiles_ax[0].height + 4 + tiles_co[0].height
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(255, 255, 255))
    x = 0
    for t_ax, t_co in zip(tiles_ax, tiles_co):
        canvas.paste(t_ax, (x, head))
        canvas.paste(t_co, (x, head + t_ax.height + 4))
        draw.text((x + 2, head + 2), "R", fill=(255, 255, 0))
        x += t_ax.width + 4
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
