"""Turn labelled cases into the arrays training reads, cached on disk.

A case is a T1 file and a FreeSurfer-valued label file on the same grid (an nnU-Net style
cohort, :mod:`basalseg.data.cohort`). Each is brought to canonical 1 mm space exactly as at
inference (:func:`basalseg.pipeline.Pipeline.prepare`): image resampled linearly and scaled to
[0, 1], labels by nearest neighbour and mapped to class indices. The result is stored as
``<work>/cases/<name>.npz`` (``image01`` float16, ``classes`` uint8, ``affine``) so later
stages and reruns skip the resampling. The file also records its ``source`` (the sha256 of the
image and label files and the label mapping, :func:`source_key`); a prepared case whose source
differs, or that records none, is prepared again: a cohort regenerated or replaced under the same
case names (``runs/cohorts/heldout_mni_seed`` made with another seed) is never scored or trained on
with the previous cohort's arrays.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..download import sha256_file
from ..intensity import normalize01
from ..outputs import atomic_write_bytes
from ..spatial import Grid, resample_to_grid, to_canonical
from ..structures import labels_to_classes

__all__ = ["PreparedCase", "prepare_case", "load_prepared", "prepare_cases", "source_key"]


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


def source_key(case) -> str:
    """What a prepared case is made from, as JSON: the sha256 of the image and label files and the
    label mapping (the same bytes under another path or time stamp give the same key)."""
    mapping = getattr(case, "label_mapping", None)
    return json.dumps({"image_sha256": sha256_file(case.image_path), "label_sha256": sha256_file(case.label_path),
                       "label_mapping": sorted((int(k), int(v)) for k, v in mapping.items()) if mapping else None})


def _recorded_source(path: Path) -> str | None:
    try:
        with np.load(path) as data:
            return str(data["source"]) if "source" in data.files else None
    except (OSError, ValueError):  # unreadable or truncated: prepared again
        return None


def prepare_cases(cases: list, work: str | os.PathLike, progress=None) -> list[Path]:
    """Prepare every case once; return the cache files. A case already prepared from the same
    source (:func:`source_key`) is skipped; one from another source, or from before sources were
    recorded, is prepared again (module docstring)."""
    work = Path(work)
    paths = []
    for n, case in enumerate(cases):
        path = _cache_path(work, case.name)
        source = source_key(case)
        if _recorded_source(path) != source:
            prepared = prepare_case(case)
            buffer = io.BytesIO()
            np.savez_compressed(buffer, image01=prepared.image01.astype(np.float16), classes=prepared.classes,
                                affine=prepared.grid.affine, source=np.array(source))
            atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
        if progress:
            progress(n + 1, len(cases))
    return paths
