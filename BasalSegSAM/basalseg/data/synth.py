"""SynthSeg-style synthetic subjects from one template and its labelmap.

There is no multi-subject labelled dataset offline, so training subjects are made by deforming a
labelled template and corrupting its intensities, in the spirit of SynthSeg (Billot et al.,
Medical Image Analysis 2023). Every random choice comes from ``numpy.random.default_rng(seed)``
in a fixed order, so a subject is a pure function of (template, labelmap, seed, config); the
numbers drawn are returned in ``params``.

**Input.** A template :class:`~basalseg.imageio.Volume` and a labelmap on its grid in FreeSurfer
values (whole-brain ``aparc+aseg`` labels are welcome; only 10-13/49-52 are required). Both are
brought to canonical space (RAS+, 1 mm, :mod:`basalseg.spatial`); the template intensities are
divided by the 99th percentile of the brain.

**Output grid.** A canonical 1 mm grid over a crop of the template: ``roi="brain"`` (bounding box
of the brain, voxels above 1 % of the maximum) or ``roi="structures"`` (box of the eight
structures), grown by ``margin_mm``. Its affine is the template crop's, so an unaugmented subject
overlays the template. Samples are pulled from the whole template (no edge effects at the crop).

**Spatial model** (output world point ``x`` -> template world point ``y``), in this order:

1. *Random smooth deformation*: displacements drawn i.i.d. N(0, s^2) on a control grid of
   ``nonlinear_spacing_mm`` over the output box, s ~ U(0, ``nonlinear_std_mm``), clipped to
   +-``nonlinear_max_mm``, upsampled by cubic splines: ``x' = x + u(x)``.
2. *Random affine* about the box centre ``c``: forward ``M (y - c) + c + t`` with ``M = R Sh S``;
   R = rotations about x, y, z each U(+-``rotation_deg``), S = per-axis scale
   U(``scale_range``), Sh = unit upper-triangular shear with entries U(+-``shear``),
   t = per-axis U(+-``translation_mm``). Pulled: ``y0 = M^-1 (x' - c - t) + c``.
3. *Structure-size variation*: each of the eight structures k draws a volume factor
   ``v_k`` ~ U(1 +- ``structure_volume_range``) and is scaled by ``v_k^(1/3)`` about its centroid
   ``c_k``: ``y = y0 + sum_k w_k(y0) (v_k^(-1/3) - 1) (y0 - c_k)``. The weight ``w_k`` is 1 within
   ``structure_margin_mm`` of the structure, falls to 0 over ``structure_falloff_mm`` (smoothstep
   of the distance), and weights are divided by their sum where they overlap (structures that
   touch, such as putamen and pallidum, share the interface). A structure's volume then changes
   by ``det(M) * v_k`` (exact inside, approximate where neighbours meet), which
   ``params["expected_volume_factor"]`` records.

Steps 1 and 3 are computed on a ``field_spacing_mm`` grid and linearly upsampled; the affine
part is exact at every voxel. Labels are pulled by nearest neighbour, the image by trilinear
interpolation, through the same coordinates, so they stay registered.

**Intensity model**, in this order:

1. Contrast: ``"template"`` warps the template image; ``"t1_gmm"`` draws one Gaussian per label
   (cortical parcels merged into cortex; unlabelled brain voxels split into CSF/GM/WM by
   intensity k-means of the template) with means from T1-like ranges (WM ~1, pallidum >
   thalamus > putamen > caudate > cortex > CSF) and std U(``gmm_std_range``);
   ``"random_gmm"`` draws every mean U(0, 1) (SynthSeg's contrast-agnostic setting).
2. Bias field: ``exp`` of a smooth field, N(0, b^2) on a ``bias_spacing_mm`` grid,
   b ~ U(0, ``bias_std``), multiplied in.
3. Blur: Gaussian, sigma per axis U(0, ``blur_sigma_mm``) (at least 0.5 mm for GMM contrasts,
   for partial volume).
4. Resolution: with probability ``thick_slice_prob`` one random axis is acquired with slices of
   thickness T ~ U(``thick_slice_mm``): blurred along that axis with FWHM = T, sampled every T mm
   (random offset), noise added, linearly interpolated back to 1 mm. Labels keep the 1 mm grid.
5. Gaussian noise, std U(0, ``noise_std``) (relative to WM ~ 1), unless added in step 4.
6. Gamma: the image is scaled to [0, 1] (99.9th percentile) and raised to ``exp(N(0,
   gamma_std^2))``; negatives clipped.

**Output.** float32 image, int16 labels with only the eight structures (FreeSurfer values, all
else 0), optionally the full labels. On one core a brain-sized subject (~165x200x170) takes a few
seconds; :func:`prepare_source` does the per-template work once for a cohort.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..imageio import Volume
from ..spatial import Grid, bounding_box, resample_to_grid, to_canonical
from ..structures import STRUCTURES
from .settings import JsonSettings

__all__ = ["SynthConfig", "SynthSource", "SyntheticSubject", "prepare_source", "synthesize",
           "generate_subject", "subject_seed", "rescan_seed", "GENERATOR_VERSION"]

#: Bumped whenever the same (template, labels, seed, config) would give a different subject.
GENERATOR_VERSION = 1
_FS = np.array([s.label for s in STRUCTURES])
_TISSUE = {"csf": 9001, "gm": 9002, "wm": 9003}  # unlabelled brain voxels, by template intensity
#: Settings used by :func:`prepare_source` (a source only serves configs that agree on them).
_PREPARE_FIELDS = ("roi", "margin_mm", "structure_margin_mm", "structure_falloff_mm", "field_spacing_mm")


@dataclass(frozen=True)
class SynthConfig(JsonSettings):
    """Generator settings (module docstring); ``to_dict``/``from_dict`` round-trip through JSON."""

    roi: str = "brain"
    margin_mm: float = 10.0
    rotation_deg: float = 12.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    shear: float = 0.02
    translation_mm: float = 10.0
    nonlinear_std_mm: float = 1.5
    nonlinear_max_mm: float = 4.0
    nonlinear_spacing_mm: float = 24.0
    structure_volume_range: float = 0.12
    structure_margin_mm: float = 2.0
    structure_falloff_mm: float = 6.0
    field_spacing_mm: float = 2.0
    contrast: str = "template"
    gmm_std_range: tuple[float, float] = (0.01, 0.05)
    bias_std: float = 0.3
    bias_spacing_mm: float = 40.0
    blur_sigma_mm: float = 0.6
    thick_slice_prob: float = 0.5
    thick_slice_mm: tuple[float, float] = (3.0, 6.0)
    noise_std: float = 0.03
    gamma_std: float = 0.25
    keep_full_labels: bool = False

    def __post_init__(self) -> None:
        if self.roi not in ("brain", "structures"):
            raise ValueError(f"roi must be 'brain' or 'structures'; got {self.roi!r}")
        if self.contrast not in ("template", "t1_gmm", "random_gmm"):
            raise ValueError(f"contrast must be 'template', 't1_gmm' or 'random_gmm'; got {self.contrast!r}")
        for name in ("scale_range", "gmm_std_range", "thick_slice_mm"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high; got {(lo, hi)}")
        if not 0 <= self.structure_volume_range < 1:
            raise ValueError(f"structure_volume_range must lie in [0, 1); got {self.structure_volume_range}")
        if not 0 <= self.thick_slice_prob <= 1:
            raise ValueError(f"thick_slice_prob must lie in [0, 1]; got {self.thick_slice_prob}")
        for name in ("field_spacing_mm", "nonlinear_spacing_mm", "bias_spacing_mm", "structure_falloff_mm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")


@dataclass
class SynthSource:
    """A template prepared for generation (:func:`prepare_source`); reused across subjects."""

    name: str
    image: np.ndarray  # canonical, float32, brain p99 = 1
    labels: np.ndarray  # canonical int16, as given (full or eight structures)
    classes: np.ndarray  # canonical int16 synthesis classes (parcels merged, tissue fallback)
    grid: Grid
    out_grid: Grid
    centroids: np.ndarray  # (8, 3) world mm
    weights: np.ndarray  # (8, I, J, K) float32 structure weights on weight_affine's grid
    weight_affine: np.ndarray
    volumes_mm3: dict = field(default_factory=dict)
    prepared_with: dict = field(default_factory=dict)


@dataclass
class SyntheticSubject:
    """A generated subject: image, labels (eight structures), optional full labels, parameters."""

    image: Volume
    labels: np.ndarray
    full_labels: np.ndarray | None
    params: dict


def subject_seed(cohort_seed: int, index: int) -> int:
    """The seed of subject ``index`` of a cohort (independent streams via ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(cohort_seed), int(index)]).generate_state(1, np.uint32)[0])


def _tissue_classes(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """1-D k-means (3 clusters) of brain intensities -> CSF/GM/WM codes, deterministic."""
    values = image[brain]
    centers = np.percentile(values, [10, 50, 90]).astype(np.float64)
    for _ in range(20):
        assign = np.abs(values[:, None] - centers[None]).argmin(1)
        new = np.array([values[assign == c].mean() if (assign == c).any() else centers[c] for c in range(3)])
        if np.allclose(new, centers):
            break
        centers = new
    out = np.zeros(image.shape, dtype=np.int16)
    out[brain] = np.array(list(_TISSUE.values()), dtype=np.int16)[assign]
    return out


def prepare_source(template: Volume, labels: np.ndarray, config: SynthConfig | None = None,
                   name: str = "custom") -> SynthSource:
    """Canonicalise a template and its labels and precompute the structure weight fields.

    Args:
        template: the T1 template (any orientation).
        labels: labelmap on ``template``'s grid, FreeSurfer values; all eight structures present.
        config: generator settings (only ``roi``, margins and ``structure_*`` are used here).
        name: recorded in the subjects' parameters.

    Raises:
        ValueError: shape mismatch or a structure missing from ``labels``.
    """
    config = config or SynthConfig()
    labels = np.asarray(labels)
    if labels.shape != template.shape:
        raise ValueError(f"labels shape {labels.shape} must equal the template shape {template.shape}")
    missing = [s.name for s in STRUCTURES if not (labels == s.label).any()]
    if missing:
        raise ValueError(f"labels: structure(s) {', '.join(missing)} missing (FreeSurfer values expected)")
    image, grid = to_canonical(template)
    lab = resample_to_grid(labels.astype(np.int16), template.affine, grid, order=0)
    brain = image > 0.01 * float(image.max())
    image = (image / max(float(np.percentile(image[brain], 99)), 1e-6)).astype(np.float32)
    classes = lab.copy()
    classes[(classes >= 1000) & (classes < 2000)] = 3  # cortical parcels -> cortex
    classes[(classes >= 2000) & (classes < 3000)] = 42
    fallback = _tissue_classes(image, brain & (classes == 0))
    classes = np.where((classes == 0) & brain, fallback, classes).astype(np.int16)
    box_mask = brain if config.roi == "brain" else np.isin(lab, _FS)
    box = bounding_box(box_mask, margin=int(round(config.margin_mm)))
    start = np.array([b.start for b in box], dtype=np.float64)
    out_affine = grid.affine.copy()
    out_affine[:3, 3] = grid.affine[:3, :3] @ start + grid.affine[:3, 3]
    out_grid = Grid(tuple(b.stop - b.start for b in box), out_affine)  # type: ignore[arg-type]
    # Structure weight fields on a coarse grid around the structures.
    reach = config.structure_margin_mm + config.structure_falloff_mm + 2.0
    sbox = bounding_box(np.isin(lab, _FS), margin=int(np.ceil(reach)) + 2)
    sub = lab[sbox]
    step = max(1, int(round(config.field_spacing_mm)))
    weights, centroids = [], []
    for s in STRUCTURES:
        mask = sub == s.label
        dist = ndimage.distance_transform_edt(~mask, sampling=grid.spacing)
        ramp = np.clip((config.structure_margin_mm + config.structure_falloff_mm - dist) / config.structure_falloff_mm, 0, 1)
        weights.append((ramp * ramp * (3 - 2 * ramp))[::step, ::step, ::step].astype(np.float32))
        idx = np.argwhere(lab == s.label).mean(axis=0)
        centroids.append(grid.affine[:3, :3] @ idx + grid.affine[:3, 3])
    w = np.stack(weights)
    w /= np.maximum(w.sum(axis=0, keepdims=True), 1.0)
    w_affine = grid.affine.copy()
    w_affine[:3, :3] = grid.affine[:3, :3] * step
    w_affine[:3, 3] = grid.affine[:3, :3] @ np.array([b.start for b in sbox], float) + grid.affine[:3, 3]
    vox_mm3 = float(abs(np.linalg.det(grid.affine[:3, :3])))
    volumes = {s.key: float((lab == s.label).sum() * vox_mm3) for s in STRUCTURES}
    prepared = {k: getattr(config, k) for k in _PREPARE_FIELDS}
    return SynthSource(name, image, lab, classes, grid, out_grid, np.array(centroids), w, w_affine, volumes, prepared)


def _interp_matrix(n_out: int, n_in: int, step: float) -> np.ndarray:
    """Linear interpolation weights from a coarse axis (spacing ``step`` voxels) to ``n_out``."""
    pos = np.arange(n_out) / step
    i0 = np.clip(np.floor(pos).astype(int), 0, max(n_in - 2, 0))
    frac = np.clip(pos - i0, 0, 1) if n_in > 1 else np.zeros(n_out)
    mat = np.zeros((n_out, n_in), dtype=np.float32)
    mat[np.arange(n_out), i0] += 1 - frac
    if n_in > 1:
        mat[np.arange(n_out), i0 + 1] += frac
    return mat


def _upsample(coarse: np.ndarray, mats: Sequence[np.ndarray]) -> np.ndarray:
    """Separable linear upsampling of a 3D coarse array (tensor products with ``mats``)."""
    out = np.tensordot(mats[0], coarse.astype(np.float32), axes=(1, 0))
    out = np.tensordot(out, mats[1], axes=(1, 1))
    return np.ascontiguousarray(np.tensordot(out, mats[2], axes=(1, 1)))


def _smooth_random(rng: np.random.Generator, shape: tuple[int, ...], spacing: float, step: float, std: float) -> np.ndarray:
    """N(0, std^2) values on a control grid of ``spacing`` mm, cubic-upsampled to ``shape``
    (a grid of ``step`` mm)."""
    n_ctrl = [max(2, int(np.ceil((n - 1) * step / spacing)) + 1) for n in shape]
    ctrl = rng.standard_normal(n_ctrl) * std
    return ndimage.zoom(ctrl, [n / c for n, c in zip(shape, n_ctrl)], order=3, mode="nearest", grid_mode=False)


def _rotation(deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _t1_mean(label: int, rng: np.random.Generator) -> float:
    """A T1-like mean intensity (WM ~ 1) for a FreeSurfer label or tissue code."""
    groups = [
        ((2, 41, 7, 46, 251, 252, 253, 254, 255, _TISSUE["wm"]), (0.95, 1.05)),
        ((16, 28, 60, 85), (0.85, 1.0)),
        ((77,), (0.75, 0.95)),
        ((13, 52), (0.82, 0.95)),
        ((10, 49), (0.75, 0.9)),
        ((12, 51), (0.7, 0.85)),
        ((11, 50, 26, 58), (0.65, 0.8)),
        ((3, 42, 8, 47, 17, 53, 18, 54, 80, _TISSUE["gm"]), (0.55, 0.75)),
        ((30, 62, 31, 63), (0.4, 0.75)),
        ((4, 5, 14, 15, 24, 43, 44, 72, _TISSUE["csf"]), (0.1, 0.4)),
    ]
    for members, (lo, hi) in groups:
        if label in members:
            return float(rng.uniform(lo, hi))
    return float(rng.uniform(0.5, 1.0))


def _thick_slices(image: np.ndarray, rng: np.random.Generator, axis: int, thickness: float, noise: float) -> np.ndarray:
    """Simulate slices of ``thickness`` mm along ``axis``: blur (FWHM = thickness), sample, add
    noise, interpolate back to the 1 mm grid."""
    n = image.shape[axis]
    blurred = ndimage.gaussian_filter1d(image, thickness / 2.3548, axis=axis, mode="nearest")
    offset = float(rng.uniform(0, thickness))
    pos = np.arange(offset, n - 1 + 1e-6, thickness)
    if pos.size < 2:
        pos = np.array([0.0, n - 1.0])
    low = np.moveaxis(np.stack([_lerp(blurred, p, axis) for p in pos]), 0, axis)
    if noise > 0:
        low = low + rng.standard_normal(low.shape, dtype=np.float32) * noise
    back = np.clip((np.arange(n) - pos[0]) / (pos[1] - pos[0]), 0, pos.size - 1)
    return np.moveaxis(np.stack([_lerp(low, b, axis) for b in back]), 0, axis)


def _lerp(array: np.ndarray, position: float, axis: int) -> np.ndarray:
    i0 = min(int(np.floor(position)), array.shape[axis] - 1)
    i1 = min(i0 + 1, array.shape[axis] - 1)
    f = position - i0
    return np.take(array, i0, axis=axis) * (1 - f) + np.take(array, i1, axis=axis) * f


def rescan_seed(seed: int, rescan: int) -> int:
    """The seed of the scan draws of rescan ``rescan`` (>= 1) of the subject of ``seed``."""
    return int(np.random.SeedSequence([int(seed), 7919, int(rescan)]).generate_state(1, np.uint32)[0])


def synthesize(source: SynthSource, seed: int, config: SynthConfig | None = None, rescan: int = 0,
               repose: bool = True) -> SyntheticSubject:
    """Generate one subject from a prepared template (module docstring).

    Args:
        rescan: 0 = the subject itself. ``k >= 1``: a synthetic *rescan* of the same subject:
            every spatial draw of ``seed`` is kept (the subject's whole deformation), and the
            subject is seen through an extra rigid head pose ``P`` about the box centre
            (rotations U(+-``rotation_deg``/2), translations U(+-``translation_mm``/2)): output
            point ``x`` takes the subject's value at ``P(x)``. Every intensity draw (GMM
            contrast, bias field, blur, thick slices, noise, gamma) and the pose come from a
            second stream, :func:`rescan_seed`. The true volumes stay the subject's, up to the
            nearest-neighbour resampling of the labels in the new pose and anatomy pushed out
            of the box (``params["volumes_mm3"]`` records the rescan's own label volumes).
        repose: with ``rescan >= 1``, False keeps the subject's pose (no ``P``; the pose is still
            drawn, so the intensity draws are those of ``repose=True``): new intensities of the
            same brain in the same place, for a caller that moves the whole head itself
            (:func:`basalseg.data.head.synthesize_head`).

    Raises:
        ValueError: ``config`` differs from the one given to :func:`prepare_source` in a setting
            that the preparation used (``roi``, ``margin_mm``, ``structure_margin_mm``,
            ``structure_falloff_mm``, ``field_spacing_mm``).
    """
    config = config or SynthConfig()
    differ = [k for k in _PREPARE_FIELDS if k in source.prepared_with and source.prepared_with[k] != getattr(config, k)]
    if differ:
        raise ValueError(f"config: {', '.join(differ)} differ(s) from the prepared source's; call prepare_source again")
    rng = np.random.default_rng(int(seed))
    t0 = time.perf_counter()
    out = source.out_grid
    shape = np.array(out.shape)
    # --- random draws (fixed order) ---
    rot = rng.uniform(-config.rotation_deg, config.rotation_deg, 3)
    scale = rng.uniform(*config.scale_range, 3)
    shear = rng.uniform(-config.shear, config.shear, 3)
    trans = rng.uniform(-config.translation_mm, config.translation_mm, 3)
    nl_std = rng.uniform(0, config.nonlinear_std_mm)
    r = config.structure_volume_range
    vol_factor = rng.uniform(1 - r, 1 + r, len(STRUCTURES))
    scan_rng = rng
    pose_rot, pose_trans = np.zeros(3), np.zeros(3)
    if int(rescan) > 0:  # same anatomy, a new head pose in the scanner and new intensity draws
        scan_rng = np.random.default_rng(rescan_seed(seed, rescan))
        pose_rot = scan_rng.uniform(-0.5 * config.rotation_deg, 0.5 * config.rotation_deg, 3)
        pose_trans = scan_rng.uniform(-0.5 * config.translation_mm, 0.5 * config.translation_mm, 3)
        if not repose:
            pose_rot, pose_trans = np.zeros(3), np.zeros(3)
    pose = _rotation(pose_rot)
    shear_m = np.array([[1, shear[0], shear[1]], [0, 1, shear[2]], [0, 0, 1.0]])
    m = _rotation(rot) @ shear_m @ np.diag(scale)
    m_inv = np.linalg.inv(m)
    centre = out.affine[:3, :3] @ ((shape - 1) / 2) + out.affine[:3, 3]
    # --- non-affine part on a coarse output grid ---
    step = float(config.field_spacing_mm)
    cshape = tuple(int(np.ceil((n - 1) / step)) + 1 for n in shape)
    cidx = np.stack(np.meshgrid(*[np.arange(c) * step for c in cshape], indexing="ij"), -1).reshape(-1, 3)
    xc = cidx @ out.affine[:3, :3].T + out.affine[:3, 3]
    u_nl = np.stack([np.clip(_smooth_random(rng, cshape, config.nonlinear_spacing_mm, step, nl_std),
                             -config.nonlinear_max_mm, config.nonlinear_max_mm) for _ in range(3)], -1).reshape(-1, 3)
    if int(rescan) > 0 and repose:
        # A rescan sees the subject through a rigid pose P (output space -> the subject's output
        # space): every output point x is replaced by P(x), and the subject's deformation is
        # evaluated there (interpolated on its coarse grid), so the anatomy is the subject's.
        xc = (xc - centre) @ pose.T + centre + pose_trans
        cvox = (np.linalg.inv(out.affine[:3, :3]) @ (xc - out.affine[:3, 3]).T) / step
        u_grid = u_nl.reshape(cshape + (3,))
        u_nl = np.stack([ndimage.map_coordinates(u_grid[..., c], cvox, order=1, mode="nearest") for c in range(3)], -1)
    y0 = (xc + u_nl - centre - trans) @ m_inv.T + centre
    a_k = vol_factor ** (-1.0 / 3.0) - 1.0
    a_field = np.tensordot(a_k, source.weights, axes=(0, 0))
    b_field = np.tensordot(a_k[:, None] * source.centroids, source.weights, axes=(0, 0))
    winv = np.linalg.inv(source.weight_affine)
    wvox = (y0 @ winv[:3, :3].T + winv[:3, 3]).T
    a_at = ndimage.map_coordinates(a_field, wvox, order=1, mode="constant", cval=0.0)
    b_at = np.stack([ndimage.map_coordinates(b_field[c], wvox, order=1, mode="constant", cval=0.0) for c in range(3)], -1)
    y = y0 + a_at[:, None] * y0 - b_at
    y_aff = (xc - centre - trans) @ m_inv.T + centre
    tinv = np.linalg.inv(source.grid.affine)
    resid_vox = ((y - y_aff) @ tinv[:3, :3].T).reshape(cshape + (3,))
    mats = [_interp_matrix(int(n), c, step) for n, c in zip(shape, cshape)]
    # --- full-resolution sampling coordinates: exact affine + upsampled residual ---
    lin = tinv[:3, :3] @ m_inv @ pose @ out.affine[:3, :3]
    off = tinv[:3, :3] @ (m_inv @ (pose @ (out.affine[:3, 3] - centre) + pose_trans - trans) + centre) + tinv[:3, 3]
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    coords = np.empty((3,) + tuple(shape), dtype=np.float32)
    for c in range(3):
        coords[c] = _upsample(resid_vox[..., c], mats)
        coords[c] += (lin[c, 0] * axes[0])[:, None, None] + (lin[c, 1] * axes[1])[None, :, None] \
            + (lin[c, 2] * axes[2] + off[c])[None, None, :]
    labels_full = ndimage.map_coordinates(source.labels, coords, order=0, mode="constant", cval=0)
    labels = np.where(np.isin(labels_full, _FS), labels_full, 0).astype(np.int16)
    # --- intensities (a rescan draws them from its own stream) ---
    rng = scan_rng
    if config.contrast == "template":
        image = ndimage.map_coordinates(source.image, coords, order=1, mode="constant", cval=0.0, prefilter=False)
        gmm = None
    else:
        classes = ndimage.map_coordinates(source.classes, coords, order=0, mode="constant", cval=0)
        values = np.unique(source.classes)
        means = {}
        for v in values:
            if v == 0:
                means[0] = float(rng.uniform(0, 0.1)) if config.contrast == "random_gmm" else 0.0
            else:
                means[int(v)] = _t1_mean(int(v), rng) if config.contrast == "t1_gmm" else float(rng.uniform(0, 1))
        stds = {int(v): float(rng.uniform(*config.gmm_std_range)) if v else 0.0 for v in values}
        lut_mean = np.zeros(int(values.max()) + 1, np.float32)
        lut_std = np.zeros_like(lut_mean)
        for v in means:
            lut_mean[v], lut_std[v] = means[v], stds[v]
        image = lut_mean[classes] + lut_std[classes] * rng.standard_normal(classes.shape, dtype=np.float32)
        gmm = {"means": {str(k): round(v, 4) for k, v in means.items()}, "stds": {str(k): round(v, 4) for k, v in stds.items()}}
        del classes
    del coords
    bias_std = rng.uniform(0, config.bias_std)
    log_bias = _smooth_random(rng, cshape, config.bias_spacing_mm, step, bias_std)
    image *= np.exp(_upsample(log_bias, mats))
    min_blur = 0.5 if config.contrast != "template" else 0.0
    blur = rng.uniform(min(min_blur, config.blur_sigma_mm), max(config.blur_sigma_mm, min_blur), 3)
    image = ndimage.gaussian_filter(image, blur, mode="nearest")
    noise = rng.uniform(0, config.noise_std)
    thick = None
    if rng.uniform() < config.thick_slice_prob:
        axis = int(rng.integers(0, 3))
        thickness = float(rng.uniform(*config.thick_slice_mm))
        image = _thick_slices(image, rng, axis, thickness, noise)
        thick = {"axis": axis, "thickness_mm": round(thickness, 3)}
    elif noise > 0:
        image = image + rng.standard_normal(image.shape, dtype=np.float32) * noise
    gamma = float(np.exp(rng.normal(0, config.gamma_std)))
    image = np.clip(image, 0, None)
    top = float(np.percentile(image[image > 0], 99.9)) if (image > 0).any() else 1.0
    image = (np.clip(image / max(top, 1e-6), 0, None) ** gamma).astype(np.float32)
    vox = float(abs(np.linalg.det(out.affine[:3, :3])))
    volumes = {s.key: float((labels == s.label).sum() * vox) for s in STRUCTURES}
    det = float(np.linalg.det(m))
    params = {
        "generator_version": GENERATOR_VERSION, "seed": int(seed), "template": source.name,
        "rotation_deg": rot.round(3).tolist(), "scale": scale.round(4).tolist(), "shear": shear.round(4).tolist(),
        "translation_mm": trans.round(3).tolist(), "affine_det": round(det, 4), "nonlinear_std_mm": round(nl_std, 3),
        "structure_volume_factor": {s.key: round(float(v), 4) for s, v in zip(STRUCTURES, vol_factor)},
        "expected_volume_factor": {s.key: round(float(v) * det, 4) for s, v in zip(STRUCTURES, vol_factor)},
        "template_volumes_mm3": source.volumes_mm3, "volumes_mm3": volumes, "contrast": config.contrast,
        "gmm": gmm, "bias_std": round(bias_std, 4), "blur_sigma_mm": blur.round(3).tolist(),
        "thick_slices": thick, "noise_std": round(noise, 4), "gamma": round(gamma, 4),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if int(rescan) > 0:
        params["rescan"] = {"index": int(rescan), "scan_seed": rescan_seed(seed, rescan),
                            "pose_rotation_deg": pose_rot.round(3).tolist(), "pose_translation_mm": pose_trans.round(3).tolist()}
    volume = Volume(image, out.affine.copy(), meta={"synthetic": True, "template": source.name, "seed": int(seed)})
    full = labels_full.astype(np.int16) if config.keep_full_labels else None
    return SyntheticSubject(volume, labels, full, params)


def generate_subject(template: Volume, labels: np.ndarray, seed: int,
                     config: SynthConfig | None = None) -> tuple[Volume, np.ndarray]:
    """One synthetic subject: ``(image Volume on a canonical 1 mm grid, int16 labels)``.

    The labels hold FreeSurfer values of the eight structures only (all else 0). For a cohort,
    prefer :func:`prepare_source` once + :func:`synthesize` per seed (same result, faster).
    """
    subject = synthesize(prepare_source(template, labels, config), seed, config)
    return subject.image, subject.labels
