"""Slice stride: encode every k-th prompted slice and interpolate the others (changes the masks).

:func:`plan_slices` picks the slices, :func:`interpolate_mask` fills a slice between two run
slices by shape-based interpolation (2D signed distances), :func:`stride_masks` derives a
stride's masks from the all-slices masks (exact: a run slice's masks do not depend on the
stride), which is how the benchmark and the cohort evaluation measure a stride's cost.
"""

from __future__ import annotations

import numpy as np

from ..prompts import Prompt, PromptSet
from ..structures import STRUCTURES
from .slices import plane_view

__all__ = ["fill_between", "interpolate_mask", "plan_slices", "stride_masks"]


def plan_slices(prompts: PromptSet, stride: int = 1) -> dict[int, list[Prompt]]:
    """The slices run through the foundation model, with their prompts.

    With ``stride`` 1, every prompted slice. With ``stride`` k > 1, slice ``z`` is run when
    ``(z - z_min) % k == 0`` (``z_min``: the first prompted slice) or when it is some structure's
    first or last prompted slice; a slice that is run gets all of its prompts (so its masks are
    exactly those of the all-slices run, whose region-of-interest crop depends on every box of the
    slice). A structure's prompted slices that are not run are interpolated between its nearest
    run slices below and above (:func:`interpolate_mask`).
    """
    stride = max(int(stride), 1)
    slices = prompts.slices()
    if not slices:
        return {}
    keep = set(slices)
    if stride > 1:
        keep = {z for z in slices if (z - slices[0]) % stride == 0}
        for s in STRUCTURES:
            own = prompts.for_structure(s.key)
            if own:
                keep.update((own[0].slice, own[-1].slice))
    return {z: prompts.on_slice(z) for z in sorted(keep)}


def stride_masks(masks: np.ndarray, prompts: PromptSet, stride: int) -> np.ndarray:
    """What :func:`~basalseg.foundation.runner.run_foundation` with ``stride`` returns, given the
    all-slices masks ``(8, X, Y, Z)`` of the same backend: the run slices are kept and the others
    interpolated. (A run slice's masks do not depend on the stride, see :func:`plan_slices`.) Used
    to measure the quality cost of a stride without running the model again."""
    plan = plan_slices(prompts, stride)
    out = np.zeros_like(masks)
    view, src = plane_view(out, prompts.axis), plane_view(masks, prompts.axis)
    for z in plan:
        view[:, :, :, z] = src[:, :, :, z]
    if stride > 1:
        fill_between(out, prompts, plan, {s.key: s.class_index - 1 for s in STRUCTURES})
    return out


def _signed_distance_2d(mask: np.ndarray) -> np.ndarray:
    from ..sdm import signed_distance

    d = signed_distance(mask)
    return np.where(np.isfinite(d), d, np.sign(d) * 1e4).astype(np.float32)


def interpolate_mask(lower: np.ndarray, upper: np.ndarray, t: float) -> np.ndarray:
    """Shape-based interpolation between two 2D masks: ``(1 - t) d_lower + t d_upper < 0`` with
    ``d`` the signed distance to each mask's boundary (negative inside)."""
    d = (1.0 - t) * _signed_distance_2d(lower) + t * _signed_distance_2d(upper)
    return d < 0


def fill_between(out: np.ndarray, prompts: PromptSet, plan: dict[int, list[Prompt]], index: dict[str, int],
                 first_slice: int = 0) -> None:
    """Interpolate each structure's prompted slices that were not run (``stride`` > 1), in the prompts' plane.

    ``out`` holds the slices from ``first_slice`` on (a boxed stack's data: slice ``z`` is
    ``out[..., z - first_slice]`` in the plane's view); every slice filled lies between two run
    slices of the same structure, so inside any box that holds the run ones."""
    out = plane_view(out, prompts.axis)
    k0 = int(first_slice)
    for s in STRUCTURES:
        own = [p.slice for p in prompts.for_structure(s.key)]
        run = [z for z in own if z in plan]
        c = index[s.key]
        wanted = set(own)
        for lo, hi in zip(run[:-1], run[1:]):
            for z in range(lo + 1, hi):
                if z in wanted:
                    out[c, :, :, z - k0] = interpolate_mask(out[c, :, :, lo - k0], out[c, :, :, hi - k0], (z - lo) / (hi - lo))

