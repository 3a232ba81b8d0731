"""Quality-control pictures: the result drawn over the image (the one montage of the package).

:func:`montage_png` draws ``n`` axial slices (top row) and ``n`` coronal slices (bottom row)
spread over the structures' extent, in radiological convention as 3D Slicer shows them: the
patient's right on the picture's left (marked "R"), anterior at the top of axial views,
superior at the top of coronal views. Structures are outlined in their FreeSurfer colours
(:mod:`basalseg.structures`), optionally filled; prompt boxes are drawn on the axial slices
that carry them. Two looks of it are used:

* the result folder's ``qc.png`` (:func:`overlay_png`, written by :mod:`basalseg.results`):
  outlines only, boxes in the structures' colours, 4 slices a row;
* the cohort report's montage (:mod:`basalseg.report`; :func:`montage_png`'s defaults): 40 %
  fill, yellow boxes, slice positions in mm, a colour legend, 5 slices a row.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .prompts import PromptSet
from .structures import STRUCTURES

__all__ = ["montage_png", "overlay_png"]

_YELLOW = (255, 255, 0)


def _pick_slices(classes: np.ndarray, axis: int, n: int) -> list[int]:
    """``n`` slice indices spread over the extent of the labelled structures along ``axis``
    (the middle of the volume when nothing is labelled)."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.nonzero((classes > 0).any(axis=other))[0]
    if present.size == 0:
        mid = classes.shape[axis] // 2
        return [mid] * n if n == 1 else list(np.linspace(mid - 10, mid + 10, n).round().astype(int).clip(0, classes.shape[axis] - 1))
    lo, hi = present.min(), present.max()
    return list(np.linspace(lo + (hi - lo) * 0.15, hi - (hi - lo) * 0.15, n).round().astype(int))


def _blend(gray: np.ndarray, classes: np.ndarray, fill: float) -> np.ndarray:
    """RGB ``uint8`` of a 2D slice: grey levels (``[0, 1]`` -> 0..255, truncated), each structure
    filled at opacity ``fill`` (0: not filled) and outlined opaque in its colour."""
    rgb = np.repeat((np.clip(gray, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2).astype(np.float64)
    for s in STRUCTURES:
        mask = classes == s.class_index
        if mask.any():
            if fill > 0:
                rgb[mask] = (1 - fill) * rgb[mask] + fill * np.asarray(s.color, float)
            rgb[mask & ~ndimage.binary_erosion(mask)] = s.color
    return rgb.round().astype(np.uint8)


def _label(draw, xy: tuple[int, int], text: str, fill=(255, 255, 255)) -> None:
    """Text on a black box, legible over bright anatomy."""
    x, y = xy
    draw.rectangle([x - 1, y - 1, x + 6 * len(text) + 1, y + 10], fill=(0, 0, 0))
    draw.text((x, y), text, fill=fill)


def montage_png(image01: np.ndarray, classes: np.ndarray, prompts: PromptSet | None = None, title: str | None = None,
                grid=None, n: int = 5, zoom: int = 2, crop_margin: int = 20, fill: float = 0.4, annotate: bool = True,
                box_colour: tuple[int, int, int] | None = _YELLOW) -> bytes:
    """A PNG: ``n`` axial (top) and ``n`` coronal (bottom) slices with the structures drawn.

    Args:
        image01: ``(X, Y, Z)`` canonical image in [0, 1] (RAS+, :mod:`basalseg.spatial`).
        classes: ``(X, Y, Z)`` class indices on the same grid.
        prompts: draw these boxes on the axial slices that carry them (``box = [x0, y0, x1, y1]``
            in canonical voxels, inclusive).
        title: text at the top.
        grid: the canonical :class:`~basalseg.spatial.Grid`, to label slices in mm (else indices).
        n, zoom, crop_margin: slices per row, integer magnification, voxels kept around the
            structures (the whole volume when nothing is labelled).
        fill: opacity of the structures' fill in their colour (0: outlines only).
        annotate: slice positions, boxed "R" marks on both rows, a colour legend and at least
            360 pixels of width; False: a plain "R" on the axial row only.
        box_colour: the prompt boxes' colour; None: each structure's own colour.
    """
    from .spatial import bounding_box

    box = bounding_box(classes > 0, crop_margin) or tuple(slice(0, s) for s in classes.shape)
    img_c, cls_c = image01[box], classes[box]
    off = [b.start for b in box]
    nx, ny, nz = cls_c.shape

    def world(axis: int, index: int) -> str:
        if grid is None:
            return f"{'ijk'[axis]}={index + off[axis]}"
        value = float(grid.affine[axis, 3] + grid.affine[axis, axis] * (index + off[axis]))
        return f"{'xyz'[axis]}={value:+.0f}mm"

    tiles_ax, tiles_co = [], []
    for k in _pick_slices(cls_c, 2, n):
        rgb = _blend(img_c[::-1, ::-1, k].T, cls_c[::-1, ::-1, k].T, fill)  # rows anterior->posterior, cols R->L
        tile = Image.fromarray(rgb).resize((nx * zoom, ny * zoom), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        if prompts is not None:
            for p in prompts.on_slice(k + off[2]):
                x0, y0, x1, y1 = p.box[0] - off[0], p.box[1] - off[1], p.box[2] - off[0], p.box[3] - off[1]
                # picture column = nx-1-x, row = ny-1-y (the view above)
                draw.rectangle([(nx - 1 - x1) * zoom, (ny - 1 - y1) * zoom, (nx - x0) * zoom - 1, (ny - y0) * zoom - 1],
                               outline=box_colour or p.struct.color, width=1)
        if annotate:
            _label(draw, (2, tile.height - 12), world(2, k))
        tiles_ax.append(tile)
    for j in _pick_slices(cls_c, 1, n):
        rgb = _blend(img_c[::-1, j, ::-1].T, cls_c[::-1, j, ::-1].T, fill)  # rows superior->inferior, cols R->L
        tile = Image.fromarray(rgb).resize((nx * zoom, nz * zoom), Image.NEAREST)
        if annotate:
            _label(ImageDraw.Draw(tile), (2, tile.height - 12), world(1, j))
        tiles_co.append(tile)
    gap, head, legend = 4, (16 if title else 0), (16 if annotate else 0)
    width = sum(t.width for t in tiles_ax) + gap * (len(tiles_ax) - 1)
    if annotate:
        width = max(width, 360)
    height = head + tiles_ax[0].height + gap + tiles_co[0].height + legend
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(255, 255, 255))
    x = 0
    for t_ax, t_co in zip(tiles_ax, tiles_co):
        canvas.paste(t_ax, (x, head))
        canvas.paste(t_co, (x, head + t_ax.height + gap))
        if annotate:
            _label(draw, (x + 2, head + 2), "R", fill=_YELLOW)
            _label(draw, (x + 2, head + t_ax.height + gap + 2), "R", fill=_YELLOW)
        else:
            draw.text((x + 2, head + 2), "R", fill=_YELLOW)
        x += t_ax.width + gap
    if annotate:
        x, y = 4, height - legend + 2
        for s in STRUCTURES[:4]:  # left and right share FreeSurfer colours
            part = s.key.split("_", 1)[1]
            draw.rectangle([x, y + 2, x + 9, y + 11], fill=s.color)
            draw.text((x + 13, y), part, fill=(255, 255, 255))
            x += 20 + 7 * len(part)
        if prompts is not None:
            draw.rectangle([x, y + 2, x + 9, y + 11], outline=box_colour or (255, 255, 255))
            draw.text((x + 13, y), "prompt box", fill=(255, 255, 255))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png(image01: np.ndarray, classes: np.ndarray, prompts: PromptSet | None = None, n: int = 4,
                zoom: int = 2, crop_margin: int = 25, title: str | None = None) -> bytes:
    """The result folder's ``qc.png``: :func:`montage_png` with outlines only, prompt boxes in the
    structures' colours and no annotations (arguments as there)."""
    return montage_png(image01, classes, prompts, title=title, n=n, zoom=zoom, crop_margin=crop_margin, fill=0.0,
                       annotate=False, box_colour=None)
