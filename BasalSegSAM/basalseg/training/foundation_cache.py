"""Run the frozen foundation model once per training scan and keep its masks.

Student epochs then read masks from disk instead of re-running the foundation model, which
costs ~2 s per slice on a CPU. For each prepared case:

1. the trained prompt generator gives prompts, exactly as at inference;
2. for training scans each box corner is jittered by up to ``jitter`` pixels (uniform integer,
   seeded per case), so the student sees foundation masks from imperfect prompts, as it will
   on new scans; held-out scans use ``jitter=0``;
3. the backend runs on the prompted slices through the runner inference uses
   (:func:`basalseg.foundation.runner.run_planes`, one encoder pass per slice, no stride);
4. the student's crop (:func:`basalseg.student.student_roi`) of image, labels, foundation masks
   and the prompter's labelmap is saved to ``<cache>/<name>.npz``, with the prompts and the
   backend's description.

A cached case is reused only when everything that made it is the same (its **key**, stored in
the file): the prepared case's arrays (a fingerprint of ``image01`` and ``classes``,
:func:`array_fingerprint`), the backend (name and checkpoint sha256), the prompter (a fingerprint of
its weights, :func:`network_fingerprint`), the variant, and the options ``jitter``, ``seed`` (only
when ``jitter > 0``: it draws nothing otherwise), ``crop`` and ``reference_in_roi``. So an
interrupted run resumes, and a case made otherwise (another prompter or checkpoint, a training
cache with jittered prompts and the reference-grown crop found by a held-out evaluation, a cohort
regenerated under the same case names) is computed again rather than silently reused; so is a
file from before a part of the key was recorded.

**Variants** (``docs/CONTEXT_AND_PLANES.md``): ``context=True`` runs the foundation model with
the 3-slice context; ``planes=("axial", "coronal", "sagittal")`` also runs it on coronal and
sagittal slices, prompted from the prompter's labelmap along those axes
(:func:`basalseg.prompts.plane_prompt_sets`, the pipeline's derivation: the structures of the
axial prompts only; each plane's boxes jittered like the axial ones). A
multi-plane case stores its masks per plane, ``(P, 8, X, Y, Z)``, and the student reads their
fused SDM (:func:`basalseg.student.build_student_input`); :attr:`CachedCase.foundation_masks`
is the majority vote. Give each variant its own cache folder (:func:`variant_name`).

**Timing**: each new case records the seconds its foundation stage took (all planes, and per
plane with its number of slices) and the prompter's, under ``timing`` (cases cached before this
existed have none).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..foundation import FoundationBackend
from ..foundation.runner import run_planes
from ..outputs import atomic_write_bytes
from ..prompter import generate_prompts
from ..prompts import PLANES, PromptSet, normalise_planes, plane_prompt_sets, prompts_from_dict
from ..sdm import majority_vote
from ..student import student_roi
from .prepare import load_prepared

__all__ = ["jitter_prompts", "build_foundation_cache", "CachedCase", "load_cached_case", "variant_name",
           "read_timing", "network_fingerprint", "array_fingerprint"]


def variant_name(foundation: str, context: bool = False, planes=("axial",)) -> str:
    """The cache folder name of a foundation variant: ``litemedsam`` (default), ``litemedsam-ctx3``,
    ``litemedsam-3planes``, ``litemedsam-ctx3-3planes``; other plane sets spell their planes
    (``litemedsam-axial+coronal``)."""
    planes = normalise_planes(planes)
    name = foundation + ("-ctx3" if context else "")
    if planes == tuple(PLANES):
        name += "-3planes"
    elif planes != ("axial",):
        name += "-" + "+".join(planes)
    return name


@dataclass
class CachedCase:
    """The student's view of one case (all arrays on the same crop of the canonical grid)."""

    name: str
    image01: np.ndarray  # (X, Y, Z) float32
    classes: np.ndarray  # (X, Y, Z) uint8 reference
    masks: np.ndarray  # (8, X, Y, Z) bool foundation masks; (P, 8, X, Y, Z) per plane for multi-plane caches
    coarse: np.ndarray  # (X, Y, Z) uint8 prompter labelmap
    roi_start: tuple[int, int, int]
    full_shape: tuple[int, int, int]
    prompts: PromptSet  # the axial prompts
    backend: dict
    context: bool = False
    planes: tuple = ("axial",)
    timing: dict | None = None  # {"foundation_s", "prompter_s", "planes": {plane: {"seconds", "slices"}}}

    @property
    def foundation_masks(self) -> np.ndarray:
        """``(8, X, Y, Z)``: the masks, or for several planes their per-structure majority vote
        (:func:`basalseg.sdm.majority_vote`: at least 2 of 3 planes)."""
        return majority_vote(self.masks) if self.masks.ndim == 5 else self.masks


def jitter_prompts(prompts: PromptSet, jitter: int, rng: np.random.Generator) -> PromptSet:
    """A copy of ``prompts`` with every box coordinate moved by a uniform integer in [-jitter, jitter]
    (kept inside the slice, corners kept ordered)."""
    if jitter <= 0:
        return prompts
    nx, ny, _ = prompts.plane_shape()
    out = PromptSet(grid=prompts.grid, prompts=[], source=dict(prompts.source, jitter=jitter), axis=prompts.axis)
    for p in prompts.prompts:
        x0, y0, x1, y1 = (np.asarray(p.box) + rng.integers(-jitter, jitter + 1, size=4)).tolist()
        x0, x1 = sorted((min(max(x0, 0), nx - 1), min(max(x1, 0), nx - 1)))
        y0, y1 = sorted((min(max(y0, 0), ny - 1), min(max(y1, 0), ny - 1)))
        out.prompts.append(type(p)(p.structure, p.slice, [float(x0), float(y0), float(x1), float(y1)],
                                   [list(pt) for pt in p.points], list(p.point_labels)))
    return out


def _variant_of(data) -> dict:
    """The ``{"context", "planes"}`` a cached ``.npz`` was made with (older files: the default)."""
    if "variant" in data.files:
        v = json.loads(str(data["variant"]))
        return {"context": bool(v.get("context", False)), "planes": list(normalise_planes(v.get("planes", ["axial"])))}
    return {"context": False, "planes": ["axial"]}


def network_fingerprint(net: torch.nn.Module | None) -> str:
    """sha256 (first 16 hex digits) of a network's weights: every state-dict entry's name, dtype,
    shape and bytes, in order. ``None`` (tests that patch the prompter's output) gives ``"none"``."""
    if net is None:
        return "none"
    digest = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def array_fingerprint(*arrays: np.ndarray) -> str:
    """sha256 (first 16 hex digits) of arrays' dtypes, shapes and bytes, in order."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}:{a.shape}".encode())
        digest.update(a.view(np.uint8).reshape(-1).data)
    return digest.hexdigest()[:16]


def _cache_key(backend: FoundationBackend, prompter, variant: dict, jitter: int, seed: int, crop: bool,
               reference_in_roi: bool) -> dict:
    """What every case of one :func:`build_foundation_cache` call depends on (module docstring);
    each case adds its ``input`` fingerprint. :func:`_key_of` reads the whole key back."""
    return {"backend": backend.name, "checkpoint_sha256": backend.describe().get("checkpoint_sha256"),
            "prompter": network_fingerprint(prompter), "variant": variant,
            "options": {"jitter": int(jitter), "seed": int(seed) if jitter > 0 else None, "crop": bool(crop),
                        "reference_in_roi": bool(reference_in_roi)}}


def _key_of(data) -> dict:
    """The key a cached ``.npz`` was made with (:func:`_cache_key`; ``None`` for the parts that
    older files did not record, so they never match)."""
    backend = json.loads(str(data["backend"])) if "backend" in data.files else {}
    return {"backend": backend.get("backend"), "checkpoint_sha256": backend.get("checkpoint_sha256"),
            "prompter": str(data["prompter"]) if "prompter" in data.files else None, "variant": _variant_of(data),
            "options": json.loads(str(data["options"])) if "options" in data.files else None,
            "input": str(data["input"]) if "input" in data.files else None}


def build_foundation_cache(prepared: list[str | os.PathLike], prompter: torch.nn.Module, backend: FoundationBackend,
                           cache_dir: str | os.PathLike, jitter: int = 2, seed: int = 0, crop: bool = True,
                           device: str | torch.device = "cpu", reference_in_roi: bool = True,
                           progress=None, context: bool = False, planes=("axial",)) -> list[Path]:
    """Fill ``cache_dir`` with one ``.npz`` per prepared case; return their paths (see module docstring).

    ``reference_in_roi`` grows the crop to contain the reference labels (training: the student
    must see whole structures); held-out evaluation passes False so the crop is exactly the one
    inference uses. ``context`` and ``planes`` select the variant (module docstring); a cached
    case made for another backend or variant is computed again (use one folder per variant,
    :func:`variant_name`, so they do not replace each other).
    """
    cache_dir = Path(cache_dir)
    planes = normalise_planes(planes)
    variant = {"context": bool(context), "planes": list(planes)}
    common = _cache_key(backend, prompter, variant, jitter, seed, crop, reference_in_roi)
    paths = []
    for n, path in enumerate(prepared):
        case = load_prepared(path)
        out = cache_dir / f"{case.name}.npz"
        key = dict(common, input=array_fingerprint(case.image01, case.classes))
        if out.is_file():
            with np.load(out) as existing:
                if _key_of(existing) == key:
                    paths.append(out)
                    if progress:
                        progress(n + 1, len(prepared))
                    continue
        t = time.perf_counter()
        prompts, coarse = generate_prompts(prompter, case.image01, case.grid, device)
        prompter_s = time.perf_counter() - t
        rng = np.random.default_rng([seed, zlib.crc32(case.name.encode())])
        prompts = jitter_prompts(prompts, jitter, rng)  # axial first: the default variant's draws are unchanged
        # the other planes' prompts as the pipeline draws them, each jittered in plane order
        sets = {plane: ps if plane == "axial" else jitter_prompts(ps, jitter, rng)
                for plane, ps in plane_prompt_sets(prompts, coarse, planes).items()}
        plane_timing: dict = {}
        stacked = run_planes(backend, case.image01, [sets[p] for p in planes], timings=plane_timing, crop=crop,
                             context=bool(context))
        timing = {"foundation_s": round(sum(v["seconds"] for v in plane_timing.values()), 4),
                  "prompter_s": round(prompter_s, 4),
                  "planes": {p: {"seconds": round(v["seconds"], 4), "slices": v["slices"]} for p, v in plane_timing.items()},
                  "device": str(getattr(backend, "device", ""))}
        masks = stacked[0] if len(planes) == 1 else stacked
        roi = student_roi(stacked, (coarse > 0) | (case.classes > 0) if reference_in_roi else coarse)
        lead = (slice(None),) * (masks.ndim - 3)
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            image01=case.image01[roi].astype(np.float16),
            classes=case.classes[roi],
            masks=np.packbits(masks[lead + roi], axis=None),
            masks_shape=np.array(masks[lead + roi].shape),
            coarse=coarse[roi],
            roi_start=np.array([s.start for s in roi]),
            full_shape=np.array(case.classes.shape),
            prompts=np.array(json.dumps(prompts.to_dict())),
            plane_prompts=np.array(json.dumps({p: ps.to_dict() for p, ps in sets.items() if p != "axial"})),
            backend=np.array(json.dumps(backend.describe())),
            prompter=np.array(key["prompter"]),
            variant=np.array(json.dumps(variant)),
            options=np.array(json.dumps(key["options"])),
            input=np.array(key["input"]),
            timing=np.array(json.dumps(timing)),
        )
        atomic_write_bytes(out, buffer.getvalue())
        paths.append(out)
        if progress:
            progress(n + 1, len(prepared))
    return paths


def read_timing(path: str | os.PathLike) -> dict | None:
    """The ``timing`` record of a cached case (None for cases cached before timings existed)."""
    with np.load(path) as d:
        return json.loads(str(d["timing"])) if "timing" in d.files else None


def load_cached_case(path: str | os.PathLike) -> CachedCase:
    with np.load(path) as d:
        shape = tuple(int(s) for s in d["masks_shape"])
        masks = np.unpackbits(d["masks"], count=int(np.prod(shape))).reshape(shape).astype(bool)
        variant = _variant_of(d)
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
            context=variant["context"],
            planes=tuple(variant["planes"]),
            timing=json.loads(str(d["timing"])) if "timing" in d.files else None,
        )
