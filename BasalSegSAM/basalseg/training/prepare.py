"""Turn labelled cases into the arrays training reads, cached on disk.

A case is a T1 file and a FreeSurfer-valued label file on the same grid (an nnU-Net style
cohort, :mod:`basalseg.data.cohort`). Each is brought to canonical 1 mm space exactly as at
inference (:func:`basalseg.pipeline.Pipeline.prepare`): image resampled linearly and scaled to
[0, 1], labels by nearest neighbour and mapped to class indices. The result is stored as
``<work>/cases/<name>.npz`` (``image01`` float16, ``classes`` uint8, ``affine``) so later
stages and reruns skip the resampling.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..intensity import normalize01
from ..outputs import atomic_write_bytes
from ..spatial import Grid, resample_to_grid, to_canonical
from ..structures import labels_to_classes

__all__ = ["PreparedCase", "prepare_case", "load_prepared", "prepare_cases"]


@dataclass
class PreparedCase:
    name: str
    image01: np.ndarray  # (X, Y, Z) float32 in [0, 1], canonical grid
    classes: np.ndarray  # (X, Y, Z) uint8 class indices
    grid: Grid


def prepare_case(case) -> PreparedCase:
    """Canonical image and class labels of one :class:`~basalseg.data.cohort.CohortCase` (no caching)."""
    volume, labels = case.load()  # labels: FreeSurfer values on the image grid
    if labels.shape[:3] != volume.shape:
        raise ValueError(f"{case.name}: labels {labels.shape} are not on the image grid {volume.shape}")
    image, grid = to_canonical(volume)
    canonical_labels = resample_to_grid(labels.reshape(volume.shape), volume.affine, grid, order=0)
    return PreparedCase(case.name, normalize01(image), labels_to_classes(canonical_labels), grid)


def _cache_path(work: Path, name: str) -> Path:
    return work / "cases" / f"{name}.npz"


def load_prepared(path: str | os.PathLike) -> PreparedCase:
    with np.load(path) as data:
        grid = Grid(tuple(int(s) for s in data["classes"].shape), data["affine"].astype(np.float64))
        return PreparedCase(Path(path).stem, data["image01"].astype(np.float32), data["classes"].copy(), grid)


def prepare_cases(cases: list, work: str | os.PathLike, progress=None) -> list[Path]:
    """Prepare every case once (skipping those already cached); return the cache files."""
    work = Path(work)
    paths = []
    for n, case in enumerate(cases):
        path = _cache_path(work, case.name)
        if not path.is_file():
            prepared = prepare_case(case)
            buffer = io.BytesIO()
            np.savez_compressed(buffer, image01=prepared.image01.astype(np.float16), classes=prepared.classes,
                                affine=prepared.grid.affine)
            atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
        if progress:
            progress(n + 1, len(cases))
    return paths
