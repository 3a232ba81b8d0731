"""Run a 2D foundation backend over a volume's prompted axial slices and stack the masks in 3D.

For each slice that carries prompts, the slice is cut to the region of interest (the union of
that slice's boxes plus a margin), encoded once, and all of its boxes are decoded together.
Masks are pasted back into one boolean volume per structure on the canonical grid.

A :class:`SliceMaskCache` remembers each slice's prompts and masks, so a rerun after prompt
edits only recomputes the slices whose prompts changed (the Slicer module's Segment button).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import Cancelled
from ..prompts import Prompt, PromptSet
from ..structures import STRUCTURES
from .base import FoundationBackend

__all__ = ["run_foundation", "SliceMaskCache", "slice_image", "prompt_signature"]

ProgressFn = Callable[[int, int], None]


def slice_image(volume01: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` as the 2D image backends see: ``(Y, X)`` = ``volume[:, :, k].T``."""
    return np.ascontiguousarray(volume01[:, :, k].T)


def prompt_signature(prompts: list[Prompt]) -> str:
    """A stable hash of one slice's prompts (structure, box, points, labels)."""
    payload = json.dumps([p.to_dict() for p in sorted(prompts, key=lambda p: p.structure)], sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()


@dataclass
class SliceMaskCache:
    """Masks already computed, per slice: ``{k: (signature, backend_name, {structure_key: (x0, y0, mask_xy)})}``.

    ``mask_xy`` is a boolean array indexed ``[x, y]`` placed at offset ``(x0, y0)`` of the slice.
    """

    entries: dict[int, tuple[str, str, dict[str, tuple[int, int, np.ndarray]]]] = field(default_factory=dict)

    def get(self, k: int, signature: str, backend: str):
        entry = self.entries.get(k)
        if entry is not None and entry[0] == signature and entry[1] == backend:
            return entry[2]
        return None


def _roi(prompts: list[Prompt], shape_xy: tuple[int, int], margin: int) -> tuple[int, int, int, int]:
    """Crop ``(x0, y0, x1, y1)`` (half-open) covering all boxes on a slice plus ``margin``."""
    boxes = np.array([p.box for p in prompts], dtype=float)
    x0 = max(int(np.floor(boxes[:, 0].min())) - margin, 0)
    y0 = max(int(np.floor(boxes[:, 1].min())) - margin, 0)
    x1 = min(int(np.ceil(boxes[:, 2].max())) + 1 + margin, shape_xy[0])
    y1 = min(int(np.ceil(boxes[:, 3].max())) + 1 + margin, shape_xy[1])
    return x0, y0, x1, y1


def run_foundation(
    backend: FoundationBackend,
    volume01: np.ndarray,
    prompts: PromptSet,
    *,
    crop: bool = True,
    crop_margin: int = 16,
    one_pass_per_slice: bool = True,
    cache: SliceMaskCache | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Foundation masks for every prompted slice, stacked in 3D.

    Args:
        backend: any :class:`~basalseg.foundation.base.FoundationBackend`.
        volume01: ``(X, Y, Z)`` image on the canonical grid, intensities in [0, 1].
        prompts: prompts on the same grid.
        crop: cut each slice to the union of its boxes plus ``crop_margin`` before encoding
            (more encoder pixels on the structures); ``False`` encodes the whole slice.
        one_pass_per_slice: encode each slice once for all its structures; ``False`` re-encodes
            the slice for every structure (the naive baseline the benchmark compares against).
        cache: reuse masks of slices whose prompts did not change; updated in place.
        progress: called with ``(slices_done, slices_total)``.
        should_stop: polled between slices; returning True raises :class:`~basalseg.errors.Cancelled`.

    Returns:
        ``(8, X, Y, Z)`` boolean masks in structure (class index) order.
    """
    if volume01.shape != tuple(prompts.grid.shape):
        raise ValueError(f"image shape {volume01.shape} does not match the prompts' grid {tuple(prompts.grid.shape)}")
    nx, ny, _ = volume01.shape
    out = np.zeros((len(STRUCTURES),) + volume01.shape, dtype=bool)
    index = {s.key: s.class_index - 1 for s in STRUCTURES}
    slices = prompts.slices()
    for done, k in enumerate(slices):
        if should_stop is not None and should_stop():
            raise Cancelled("cancelled during the foundation model")
        on_slice = prompts.on_slice(k)
        signature = prompt_signature(on_slice)
        cached = cache.get(k, signature, backend.name) if cache is not None else None
        if cached is None:
            cached = _segment_slice(backend, volume01, k, on_slice, crop, crop_margin, one_pass_per_slice)
            if cache is not None:
                cache.entries[k] = (signature, backend.name, cached)
        for key, (x0, y0, mask_xy) in cached.items():
            out[index[key], x0 : x0 + mask_xy.shape[0], y0 : y0 + mask_xy.shape[1], k] |= mask_xy
        if progress is not None:
            progress(done + 1, len(slices))
    return out


def _segment_slice(backend, volume01, k, on_slice, crop, crop_margin, one_pass_per_slice):
    nx, ny, _ = volume01.shape
    x0, y0, x1, y1 = _roi(on_slice, (nx, ny), crop_margin) if crop else (0, 0, nx, ny)
    image = slice_image(volume01, k)[y0:y1, x0:x1]
    offset = np.array([x0, y0, x0, y0], dtype=np.float32)
    boxes = np.array([p.box for p in on_slice], dtype=np.float32) - offset
    n_pts = max((len(p.points) for p in on_slice), default=0)
    points = labels = None
    if n_pts:
        # Prompts with fewer points are padded with label -1, SAM's "not a point".
        points = np.zeros((len(on_slice), n_pts, 2), dtype=np.float32)
        labels = np.full((len(on_slice), n_pts), -1, dtype=np.int64)
        for n, p in enumerate(on_slice):
            if p.points:
                points[n, : len(p.points)] = np.asarray(p.points, dtype=np.float32) - offset[:2]
                labels[n, : len(p.points)] = p.point_labels
    if one_pass_per_slice:
        backend.set_image(image)
        masks = backend.predict(boxes, points, labels)
    else:
        masks = []
        for n in range(len(on_slice)):
            backend.set_image(image)
            masks.append(backend.predict(boxes[n : n + 1], None if points is None else points[n : n + 1],
                                         None if labels is None else labels[n : n + 1])[0])
        masks = np.stack(masks)
    return {p.structure: (x0, y0, np.ascontiguousarray(m.T)) for p, m in zip(on_slice, masks)}
