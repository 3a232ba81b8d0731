"""Run a 2D foundation backend over a volume's prompted slices and stack the masks in 3D.

For each slice that carries prompts, the slice is cut to the region of interest (the union of
that slice's boxes plus a margin), encoded once, and all of its boxes are decoded together.
Masks are pasted back into one boolean volume per structure on the canonical grid.

**Planes.** The slices are those of the prompts' plane (``PromptSet.axis``: axial by default,
coronal or sagittal for multi-plane fusion); :func:`slice_image` states each plane's row/column
convention. :func:`run_planes` runs several planes and stacks them ``(P, 8, X, Y, Z)``.

**3-slice context** (``context=True``, after SlideSAM): the image given to the backend is
``(H, W, 3)`` whose colour channels are slices ``k-1, k, k+1`` of the same plane (clamped at
the volume's first and last slice, where the missing neighbour is the slice itself), instead of
slice ``k`` alone (which the backends repeat to 3 channels). Prompts and masks still belong to
slice ``k``.

A :class:`SliceMaskCache` remembers each slice's prompts and masks, so a rerun after prompt
edits only recomputes the slices whose prompts changed (the Slicer module's Segment button).
Its entries are keyed by plane and slice and tagged with the backend name and the context
setting (:func:`cache_tag`), so masks made with context are never reused without it and
vice versa.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import Cancelled
from ..prompts import Prompt, PromptSet, plane_axes, plane_name
from ..structures import STRUCTURES
from .base import FoundationBackend

__all__ = ["run_foundation", "run_planes", "SliceMaskCache", "slice_image", "prompt_signature", "cache_tag",
           "plane_view"]

ProgressFn = Callable[[int, int], None]


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


def cache_tag(backend_name: str, context: bool = False) -> str:
    """What a :class:`SliceMaskCache` entry records besides the prompts: the backend's name, plus
    ``+context3`` for masks made with the 3-slice context."""
    return f"{backend_name}+context3" if context else backend_name


def prompt_signature(prompts: list[Prompt]) -> str:
    """A stable hash of one slice's prompts (structure, box, points, labels)."""
    payload = json.dumps([p.to_dict() for p in sorted(prompts, key=lambda p: p.structure)], sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()


@dataclass
class SliceMaskCache:
    """Masks already computed, per slice: ``{key: (signature, tag, {structure_key: (x0, y0, mask_xy)})}``.

    ``key`` is the slice index ``k`` for an axial slice (as before planes existed, so caches
    saved by the Slicer worker stay valid) and ``(plane, k)`` for a coronal or sagittal one
    (:meth:`key`). ``tag`` is :func:`cache_tag` of the backend name and the context setting: an
    entry is reused only for the same prompts, backend and context. ``mask_xy`` is a boolean
    array indexed ``[x, y]`` placed at offset ``(x0, y0)`` of the slice.
    """

    entries: dict = field(default_factory=dict)

    @staticmethod
    def key(k: int, axis: int = 2):
        """The entry key of slice ``k`` across ``axis``."""
        return int(k) if axis == 2 else (plane_name(axis), int(k))

    def get(self, k: int, signature: str, backend: str, *, context: bool = False, axis: int = 2):
        entry = self.entries.get(self.key(k, axis))
        if entry is not None and entry[0] == signature and entry[1] == cache_tag(backend, context):
            return entry[2]
        return None

    def put(self, k: int, signature: str, backend: str, masks: dict, *, context: bool = False, axis: int = 2) -> None:
        self.entries[self.key(k, axis)] = (signature, cache_tag(backend, context), masks)


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
    context: bool = False,
) -> np.ndarray:
    """Foundation masks for every prompted slice, stacked in 3D.

    Args:
        backend: any :class:`~basalseg.foundation.base.FoundationBackend`.
        volume01: ``(X, Y, Z)`` image on the canonical grid, intensities in [0, 1].
        prompts: prompts on the same grid; their ``axis`` says which plane's slices are run.
        crop: cut each slice to the union of its boxes plus ``crop_margin`` before encoding
            (more encoder pixels on the structures); ``False`` encodes the whole slice.
        one_pass_per_slice: encode each slice once for all its structures; ``False`` re-encodes
            the slice for every structure (the naive baseline the benchmark compares against).
        cache: reuse masks of slices whose prompts did not change; updated in place.
        progress: called with ``(slices_done, slices_total)``.
        should_stop: polled between slices; returning True raises :class:`~basalseg.errors.Cancelled`.
        context: give the backend slices ``k-1, k, k+1`` as its 3 channels (module docstring).

    Returns:
        ``(8, X, Y, Z)`` boolean masks in structure (class index) order.
    """
    if volume01.shape != tuple(prompts.grid.shape):
        raise ValueError(f"image shape {volume01.shape} does not match the prompts' grid {tuple(prompts.grid.shape)}")
    axis = prompts.axis
    out = np.zeros((len(STRUCTURES),) + volume01.shape, dtype=bool)
    view = plane_view(out, axis)
    index = {s.key: s.class_index - 1 for s in STRUCTURES}
    slices = prompts.slices()
    for done, k in enumerate(slices):
        if should_stop is not None and should_stop():
            raise Cancelled("cancelled during the foundation model")
        on_slice = prompts.on_slice(k)
        signature = prompt_signature(on_slice)
        cached = cache.get(k, signature, backend.name, context=context, axis=axis) if cache is not None else None
        if cached is None:
            cached = _segment_slice(backend, volume01, k, on_slice, crop, crop_margin, one_pass_per_slice, axis, context)
            if cache is not None:
                cache.put(k, signature, backend.name, cached, context=context, axis=axis)
        for key, (x0, y0, mask_xy) in cached.items():
            view[index[key], x0 : x0 + mask_xy.shape[0], y0 : y0 + mask_xy.shape[1], k] |= mask_xy
        if progress is not None:
            progress(done + 1, len(slices))
    return out


def run_planes(
    backend: FoundationBackend,
    volume01: np.ndarray,
    prompt_sets: list[PromptSet],
    *,
    runner: Callable | None = None,
    progress: ProgressFn | None = None,
    timings: dict | None = None,
    **options,
) -> np.ndarray:
    """Run the foundation model on each plane's prompts and stack the results.

    Args:
        backend: any backend.
        volume01: ``(X, Y, Z)`` canonical image in [0, 1].
        prompt_sets: one :class:`PromptSet` per plane (their ``axis`` picks the plane).
        runner: :func:`run_foundation` (default) or
            :func:`~basalseg.foundation.fast.run_foundation_fast` (or a ``functools.partial`` of it).
        progress: ``(slices_done, slices_total)`` over all planes.
        timings: when given, filled with ``{plane: {"seconds": s, "slices": n}}``.
        options: passed to the runner (``crop``, ``context``, ``cache``, ``should_stop``, ...).

    Returns:
        ``(P, 8, X, Y, Z)`` boolean masks, planes in the order given.
    """
    import time

    runner = runner or run_foundation
    totals = [len(ps.slices()) for ps in prompt_sets]
    total = max(sum(totals), 1)
    out = None
    before = 0
    for n, ps in enumerate(prompt_sets):
        report = None
        if progress is not None:
            report = lambda done, _t, before=before: progress(before + done, total)
        t = time.perf_counter()
        masks = runner(backend, volume01, ps, progress=report, **options)
        if len(prompt_sets) == 1:
            out = masks[None]  # one plane (the default): a view, no copy
        else:
            if out is None:
                out = np.zeros((len(prompt_sets),) + masks.shape, dtype=bool)
            out[n] = masks
        if timings is not None:
            timings[ps.plane] = {"seconds": time.perf_counter() - t, "slices": totals[n]}
        before += totals[n]
    if out is None:
        raise ValueError("run_planes needs at least one prompt set")
    return out


def _segment_slice(backend, volume01, k, on_slice, crop, crop_margin, one_pass_per_slice, axis=2, context=False):
    u, v = plane_axes(axis)
    nx, ny = volume01.shape[u], volume01.shape[v]
    x0, y0, x1, y1 = _roi(on_slice, (nx, ny), crop_margin) if crop else (0, 0, nx, ny)
    image = slice_image(volume01, k, axis, context)[y0:y1, x0:x1]
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
