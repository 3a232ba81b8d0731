"""The one foundation runner: a 2D backend over a volume's prompted slices, masks stacked in 3D.

Training (:func:`basalseg.training.foundation_cache.build_foundation_cache`), inference
(:class:`basalseg.pipeline.Pipeline`, and through it the Slicer worker) and the benchmark
(:mod:`basalseg.bench`) all call :func:`run_foundation` (one plane) or :func:`run_planes`
(several planes); only the options differ.

For each slice that carries prompts, the slice is cut to the region of interest (the union of
that slice's boxes plus a margin, :func:`slice_roi`), encoded once, and all of its boxes are
decoded together (:func:`prompt_arrays` gives them in the crop's pixels). Masks are pasted back
into one boolean volume per structure on the canonical grid.

* **Backends.** A :class:`~basalseg.foundation.base.BatchedFoundationBackend` (the fast
  LiteMedSAM) is given ``batch`` slices per encoder pass (``encode``) and decodes each with
  ``predict_on``; any other :class:`~basalseg.foundation.base.FoundationBackend` (SAM-2, the plain
  LiteMedSAM, test fakes) is run one slice at a time with ``set_image``/``predict``. With
  ``batch=1`` both give the same masks for the same model.
* **Planes and context**: the slices are those of the prompts' plane (``PromptSet.axis``);
  ``context`` gives the backend slices ``k-1, k, k+1`` as its 3 channels
  (:mod:`basalseg.foundation.slices`).
* **Stride** (changes the masks): only the slices of
  :func:`~basalseg.foundation.stride.plan_slices` are run, the others interpolated.
* **Cache**: a :class:`~basalseg.foundation.slice_cache.SliceMaskCache` gives back the masks of
  slices whose prompts did not change, and receives the new ones.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from ..errors import Cancelled
from ..prompts import Prompt, PromptSet, plane_axes
from ..structures import STRUCTURES
from .base import BatchedFoundationBackend, FoundationBackend
from .boxed import BoxedMasks, hull
from .slice_cache import SliceMaskCache, cache_tag, prompt_signature
from .slices import plane_view, slice_image
from .stride import fill_between, plan_slices

__all__ = ["run_foundation", "run_planes", "slice_roi", "prompt_arrays", "default_batch",
           # re-exported from the modules that own them
           "SliceMaskCache", "cache_tag", "prompt_signature", "plane_view", "slice_image", "BoxedMasks"]

ProgressFn = Callable[[int, int], None]


def default_batch(device: str | torch.device | None) -> int:
    """Slices per encoder batch when not told: 8 on CUDA, 1 on CPU (batches are slower there)."""
    return 8 if device is not None and torch.device(device).type == "cuda" else 1


def slice_roi(prompts: list[Prompt], shape_xy: tuple[int, int], margin: int) -> tuple[int, int, int, int]:
    """The crop ``(x0, y0, x1, y1)`` (half-open, in the slice's ``(x, y)`` pixels) covering every
    box of one slice's ``prompts`` plus ``margin``, clipped to a slice of ``shape_xy = (nx, ny)``."""
    boxes = np.array([p.box for p in prompts], dtype=float)
    x0 = max(int(np.floor(boxes[:, 0].min())) - margin, 0)
    y0 = max(int(np.floor(boxes[:, 1].min())) - margin, 0)
    x1 = min(int(np.ceil(boxes[:, 2].max())) + 1 + margin, shape_xy[0])
    y1 = min(int(np.ceil(boxes[:, 3].max())) + 1 + margin, shape_xy[1])
    return x0, y0, x1, y1


def prompt_arrays(on_slice: list[Prompt], x0: int = 0, y0: int = 0
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One slice's prompts as the arrays a backend's ``predict`` takes, in the pixels of a crop
    whose corner is ``(x0, y0)``: ``boxes`` ``(N, 4)`` XYXY float32, ``points`` ``(N, P, 2)``
    ``(x, y)`` float32 and ``labels`` ``(N, P)`` int64 (None when no prompt has points). A prompt
    with fewer than ``P`` points is padded with label -1, SAM's "not a point"."""
    offset = np.array([x0, y0, x0, y0], dtype=np.float32)
    boxes = np.array([p.box for p in on_slice], dtype=np.float32) - offset
    n_pts = max((len(p.points) for p in on_slice), default=0)
    points = labels = None
    if n_pts:
        points = np.zeros((len(on_slice), n_pts, 2), dtype=np.float32)
        labels = np.full((len(on_slice), n_pts), -1, dtype=np.int64)
        for n, p in enumerate(on_slice):
            if p.points:
                points[n, : len(p.points)] = np.asarray(p.points, dtype=np.float32) - offset[:2]
                labels[n, : len(p.points)] = p.point_labels
    return boxes, points, labels


def run_foundation(
    backend: FoundationBackend,
    volume01: np.ndarray,
    prompts: PromptSet,
    *,
    crop: bool = True,
    crop_margin: int = 16,
    one_pass_per_slice: bool = True,
    batch: int = 1,
    stride: int = 1,
    cache: SliceMaskCache | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    context: bool = False,
    boxed: bool = False,
) -> np.ndarray | BoxedMasks:
    """Foundation masks for every prompted slice of one plane, stacked in 3D.

    Args:
        backend: any :class:`~basalseg.foundation.base.FoundationBackend`; a
            :class:`~basalseg.foundation.base.BatchedFoundationBackend` is encoded ``batch``
            slices at a time.
        volume01: ``(X, Y, Z)`` image on the canonical grid, intensities in [0, 1].
        prompts: prompts on the same grid; their ``axis`` says which plane's slices are run.
        crop: cut each slice to the union of its boxes plus ``crop_margin`` before encoding
            (more encoder pixels on the structures); ``False`` encodes the whole slice.
        one_pass_per_slice: encode each slice once for all its structures; ``False`` re-encodes
            the slice for every structure through ``set_image`` (the naive baseline the benchmark
            compares against; same masks).
        batch: slices per encoder pass for a batched backend (ignored for the others);
            :func:`default_batch` is what the pipeline uses when not told.
        stride: run every ``stride``-th prompted slice plus each structure's first and last and
            interpolate the others (:func:`~basalseg.foundation.stride.plan_slices`; changes the
            masks); 1 runs every prompted slice.
        cache: reuse masks of slices whose prompts did not change; updated in place.
        progress: called with ``(slices_done, slices_total)``: once for the slices the cache
            gave, then after each computed slice.
        should_stop: polled before each encoder batch; returning True raises
            :class:`~basalseg.errors.Cancelled`.
        context: give the backend slices ``k-1, k, k+1`` as its 3 channels.
        boxed: return :class:`~basalseg.foundation.boxed.BoxedMasks` holding only the box of the
            slices' crops (the masks are empty outside it; what the pipeline uses, so that a
            large input does not carry a full-size stack), instead of the full array.

    Returns:
        ``(8, X, Y, Z)`` boolean masks in structure (class index) order (boxed or full).
    """
    if volume01.shape != tuple(prompts.grid.shape):
        raise ValueError(f"image shape {volume01.shape} does not match the prompts' grid {tuple(prompts.grid.shape)}")
    axis = prompts.axis
    nx, ny, _ = prompts.plane_shape()
    index = {s.key: s.class_index - 1 for s in STRUCTURES}
    plan = plan_slices(prompts, stride)
    batched = one_pass_per_slice and isinstance(backend, BatchedFoundationBackend)
    batch = max(int(batch), 1) if batched else 1
    results: dict[int, dict] = {}
    todo: list[int] = []
    for k, on_slice in plan.items():
        cached = None
        if cache is not None:
            cached = cache.get(k, prompt_signature(on_slice), backend.name, context=context, axis=axis)
        if cached is not None:
            results[k] = cached
        else:
            todo.append(k)
    done, total = len(results), len(plan)
    if done and progress is not None:
        progress(done, total)
    for start in range(0, len(todo), batch):
        if should_stop is not None and should_stop():
            raise Cancelled("cancelled during the foundation model")
        chunk = todo[start : start + batch]
        rois = [slice_roi(plan[k], (nx, ny), crop_margin) if crop else (0, 0, nx, ny) for k in chunk]
        images = [slice_image(volume01, k, axis, context)[y0:y1, x0:x1] for k, (x0, y0, x1, y1) in zip(chunk, rois)]
        embeddings = backend.encode(images) if batched else [None] * len(chunk)
        for k, (x0, y0, _, _), image, embedding in zip(chunk, rois, images, embeddings):
            on_slice = plan[k]
            boxes, points, labels = prompt_arrays(on_slice, x0, y0)
            if batched:
                masks = backend.predict_on(embedding, boxes, points, labels)
            elif one_pass_per_slice:
                backend.set_image(image)
                masks = backend.predict(boxes, points, labels)
            else:
                masks = _one_pass_per_structure(backend, image, boxes, points, labels)
            entry = {p.structure: (x0, y0, np.ascontiguousarray(m.T)) for p, m in zip(on_slice, masks)}
            results[k] = entry
            if cache is not None:
                cache.put(k, prompt_signature(on_slice), backend.name, entry, context=context, axis=axis)
            done += 1
            if progress is not None:
                progress(done, total)
    # the box of every slice's crop, in the plane's (x, y, slice) pixels, then on the canonical grid
    pieces = [(k, x0, y0, m.shape) for k, entry in results.items() for x0, y0, m in entry.values()]
    if pieces:  # one pixel of background around the crops, so 2D distance maps of the stride fill are the full plane's
        plane_box = (slice(max(min(x0 for _, x0, _, _ in pieces) - 1, 0), min(max(x0 + sh[0] for _, x0, _, sh in pieces) + 1, nx)),
                     slice(max(min(y0 for _, _, y0, _ in pieces) - 1, 0), min(max(y0 + sh[1] for _, _, y0, sh in pieces) + 1, ny)),
                     slice(min(k for k, *_ in pieces), max(k for k, *_ in pieces) + 1))
    else:
        plane_box = (slice(0, 1),) * 3
    box = [None, None, None]
    u, v = plane_axes(axis)
    box[u], box[v], box[axis] = plane_box
    out = BoxedMasks.empty((len(STRUCTURES),), tuple(box), volume01.shape)
    view = plane_view(out.data, axis)
    bx, by, bk = (s.start for s in plane_box)
    for k, entry in results.items():
        for key, (x0, y0, mask_xy) in entry.items():
            view[index[key], x0 - bx : x0 - bx + mask_xy.shape[0], y0 - by : y0 - by + mask_xy.shape[1], k - bk] |= mask_xy
    if stride > 1:
        fill_between(out.data, prompts, plan, index, first_slice=bk)
        if progress is not None:  # the interpolation is part of the stage: report its end
            progress(total, total)
    return out if boxed else out.to_array()


def _one_pass_per_structure(backend: FoundationBackend, image: np.ndarray, boxes: np.ndarray,
                            points: np.ndarray | None, labels: np.ndarray | None) -> np.ndarray:
    """The naive way: the slice encoded again for each structure, one box per decoder call."""
    masks = []
    for n in range(len(boxes)):
        backend.set_image(image)
        masks.append(backend.predict(boxes[n : n + 1], None if points is None else points[n : n + 1],
                                     None if labels is None else labels[n : n + 1])[0])
    return np.stack(masks)


def run_planes(
    backend: FoundationBackend,
    volume01: np.ndarray,
    prompt_sets: list[PromptSet],
    *,
    progress: ProgressFn | None = None,
    timings: dict | None = None,
    boxed: bool = False,
    **options,
) -> np.ndarray | BoxedMasks:
    """:func:`run_foundation` on each plane's prompts, results stacked.

    Args:
        backend: any backend.
        volume01: ``(X, Y, Z)`` canonical image in [0, 1].
        prompt_sets: one prompt set per plane (their ``axis`` differ).
        progress: ``(slices_done, slices_total)`` over all planes.
        timings: when given, filled with ``{plane: {"seconds": s, "slices": n}}``.
        boxed: return :class:`~basalseg.foundation.boxed.BoxedMasks` ``(P, 8, ...)`` in the hull
            of the planes' boxes instead of the full array.
        options: passed to :func:`run_foundation` (``crop``, ``context``, ``batch``, ``stride``,
            ``cache``, ``should_stop``, ...).

    Returns:
        ``(P, 8, X, Y, Z)`` boolean masks, planes in the order given (boxed or full).
    """
    if not prompt_sets:
        raise ValueError("run_planes needs at least one prompt set")
    totals = [len(ps.slices()) for ps in prompt_sets]
    total = max(sum(totals), 1)
    planes: list[BoxedMasks] = []
    before = 0
    for n, ps in enumerate(prompt_sets):
        report = None
        if progress is not None:
            report = lambda done, _t, before=before: progress(before + done, total)
        t = time.perf_counter()
        planes.append(run_foundation(backend, volume01, ps, progress=report, boxed=True, **options))
        if timings is not None:
            timings[ps.plane] = {"seconds": time.perf_counter() - t, "slices": totals[n]}
        before += totals[n]
    box = hull(*(m.box for m in planes))
    data = planes[0].data[None] if len(planes) == 1 else np.stack([m.rebox(box).data for m in planes])
    out = BoxedMasks(data, box, volume01.shape)
    return out if boxed else out.to_array()
