"""Run the frozen foundation model once per training scan and keep its masks.

Student epochs then read masks from disk instead of re-running the foundation model, which
costs ~2 s per slice on a CPU. For each prepared case:

1. the trained prompt generator gives prompts, exactly as at inference;
2. for training scans each box corner is jittered by up to ``jitter`` pixels (uniform integer,
   seeded per case), so the student sees foundation masks from imperfect prompts, as it will
   on new scans; held-out scans use ``jitter=0``;
3. the backend runs on the prompted slices (:func:`basalseg.foundation.run_foundation`);
4. the student's crop (:func:`basalseg.student.student_roi`) of image, labels, foundation masks
   and the prompter's labelmap is saved to ``<cache>/<name>.npz``, with the prompts and the
   backend's description.

A case already in the cache for the same backend is skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..foundation import FoundationBackend, run_foundation
from ..outputs import atomic_write_bytes
from ..prompter import generate_prompts
from ..prompts import PromptSet, prompts_from_dict
from ..student import student_roi
from .prepare import load_prepared

__all__ = ["jitter_prompts", "build_foundation_cache", "CachedCase", "load_cached_case"]


@dataclass
class CachedCase:
    """The student's view of one case (all arrays on the same crop of the canonical grid)."""

    name: str
    image01: np.ndarray  # (X, Y, Z) float32
    classes: np.ndarray  # (X, Y, Z) uint8 reference
    masks: np.ndarray  # (8, X, Y, Z) bool foundation masks
    coarse: np.ndarray  # (X, Y, Z) uint8 prompter labelmap
    roi_start: tuple[int, int, int]
    full_shape: tuple[int, int, int]
    prompts: PromptSet
    backend: dict


def jitter_prompts(prompts: PromptSet, jitter: int, rng: np.random.Generator) -> PromptSet:
    """A copy of ``prompts`` with every box coordinate moved by a uniform integer in [-jitter, jitter]
    (kept inside the slice, corners kept ordered)."""
    if jitter <= 0:
        return prompts
    nx, ny, _ = prompts.grid.shape
    out = PromptSet(grid=prompts.grid, prompts=[], source=dict(prompts.source, jitter=jitter))
    for p in prompts.prompts:
        x0, y0, x1, y1 = (np.asarray(p.box) + rng.integers(-jitter, jitter + 1, size=4)).tolist()
        x0, x1 = sorted((min(max(x0, 0), nx - 1), min(max(x1, 0), nx - 1)))
        y0, y1 = sorted((min(max(y0, 0), ny - 1), min(max(y1, 0), ny - 1)))
        out.prompts.append(type(p)(p.structure, p.slice, [float(x0), float(y0), float(x1), float(y1)],
                                   [list(pt) for pt in p.points], list(p.point_labels)))
    return out


def build_foundation_cache(prepared: list[str | os.PathLike], prompter: torch.nn.Module, backend: FoundationBackend,
                           cache_dir: str | os.PathLike, jitter: int = 2, seed: int = 0, crop: bool = True,
                           device: str | torch.device = "cpu", reference_in_roi: bool = True,
                           progress=None) -> list[Path]:
    """Fill ``cache_dir`` with one ``.npz`` per prepared case; return their paths (see module docstring).

    ``reference_in_roi`` grows the crop to contain the reference labels (training: the student
    must see whole structures); held-out evaluation passes False so the crop is exactly the one
    inference uses.
    """
    cache_dir = Path(cache_dir)
    paths = []
    for n, path in enumerate(prepared):
        case = load_prepared(path)
        out = cache_dir / f"{case.name}.npz"
        if out.is_file():
            with np.load(out) as existing:
                if json.loads(str(existing["backend"])).get("backend") == backend.name:
                    paths.append(out)
                    if progress:
                        progress(n + 1, len(prepared))
                    continue
        prompts, coarse = generate_prompts(prompter, case.image01, case.grid, device)
        rng = np.random.default_rng([seed, zlib.crc32(case.name.encode())])
        prompts = jitter_prompts(prompts, jitter, rng)
        masks = run_foundation(backend, case.image01, prompts, crop=crop)
        roi = student_roi(masks, (coarse > 0) | (case.classes > 0) if reference_in_roi else coarse)
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            image01=case.image01[roi].astype(np.float16),
            classes=case.classes[roi],
            masks=np.packbits(masks[(slice(None),) + roi], axis=None),
            masks_shape=np.array(masks[(slice(None),) + roi].shape),
            coarse=coarse[roi],
            roi_start=np.array([s.start for s in roi]),
            full_shape=np.array(case.classes.shape),
            prompts=np.array(json.dumps(prompts.to_dict())),
            backend=np.array(json.dumps(backend.describe())),
        )
        atomic_write_bytes(out, buffer.getvalue())
        paths.append(out)
        if progress:
            progress(n + 1, len(prepared))
    return paths


def load_cached_case(path: str | os.PathLike) -> CachedCase:
    with np.load(path) as d:
        shape = tuple(int(s) for s in d["masks_shape"])
        masks = np.unpackbits(d["masks"], count=int(np.prod(shape))).reshape(shape).astype(bool)
        return CachedCase(
            name=Path(path).stem,
            image01=d["image01"].astype(np.float32),
            classes=d["classes"].copy(),
            masks=masks,
            coarse=d["coarse"].copy(),
            roi_start=tuple(int(v) for v in d["roi_start"]),
            full_shape=tuple(int(v) for v in d["full_shape"]),
            prompts=prompts_from_dict(json.loads(str(d["prompts"]))),
            backend=json.loads(str(d["backend"])),
        )
