"""Head-like synthetic subjects: a synthetic brain inside a head, in a random pose and scanner grid.

:mod:`basalseg.data.synth` makes skull-stripped brains in template position. Clinical T1s have a
head around the brain, a pose of their own and a scanner grid of their own; this module wraps a
synthetic brain accordingly (issue 11). Every random number comes from
``numpy.random.default_rng(SeedSequence([seed, 11]))`` in a fixed order (the brain itself from
``seed``, as :func:`basalseg.data.synth.synthesize` draws it), so a subject is a pure function of
(template, labels, seed, configs); the numbers drawn are returned in ``params["head"]``.

**1. Brain.** :func:`~basalseg.data.synth.synthesize` with the given :class:`SynthConfig` but no
intensity corruption (that comes last, on the whole head), on the canonical 1 mm grid of the
template crop, padded with zeros to a canvas that holds the head (exact: the brain's background
is 0). Its 8-structure labels and its full labels are pulled with it.

**2. Head tissues** (T1 scale, white matter ~ 1), layered outward from the brain mask (the
synthetic brain's full labels or non-zero voxels, closed and hole-filled) by Euclidean distance,
each layer's thickness drawn per subject and modulated by a smooth random field (+-30 %):
CSF rim (1-4 mm, 0.05-0.3), inner table (1-2.5 mm, 0-0.1), diploe/marrow (1.5-5 mm, 0.45-0.9),
outer table (1-2.5 mm, 0-0.1), subcutaneous fat (2-7 mm, 0.95-1.4: brighter than white matter
on T1), muscle/galea (1-4 mm, 0.3-0.55), skin (1-2 mm, 0.5-0.75). With probability
``eyes_prob``, two eyeballs (radius 10-13 mm, vitreous 0.05-0.25) in orbital fat in front of the
frontal lobes; with probability ``neck_prob`` a neck below the brain (an elliptic cylinder of
muscle with a fat rim and a vertebral column of bone/marrow, 40-90 mm long). Every tissue has
its own within-tissue std (``tissue_std``). With ``contrast="template"`` the brain keeps the
template's intensities; with ``"t1_gmm"`` it keeps the per-label T1-like GMM of ``synth``.

**3. Pose and scanner grid.** The head is rotated about its centre by R (each axis
U(+-``rotation_deg``)), translated by U(+-``translation_mm``) and the whole scene shifted by an
origin offset U(+-``origin_mm``) per axis (scanner coordinates far from the brain). The output
grid has a random axis orientation (a random permutation and flips of RAS: any of the 48 axis
codes), voxel size U(``spacing_mm``) (one draw for all axes), and with probability
``thick_slice_prob`` one random axis gets slices of U(``thick_slice_mm``) thickness. It covers
the rotated head plus U(0, ``fov_pad_mm``) per side, at most U(``fov_mm``) per axis (a window kept
around the brain, which cuts the neck or the top of a large head); with probability ``crop_prob`` it is cut
to a brain-centred box instead (down to the brain plus ``crop_min_mm``), so fields of view range
from tight brain crops to the whole head and neck.

**4. Acquisition.** Each output voxel averages ``profile_samples`` canvas samples spread over its
extent along every axis (a box slice profile: thick slices are real partial-volume slabs), after
a Gaussian pre-blur of sigma max(U(0, ``blur_sigma_mm``), 0.34 x voxel size), and along a thick-slice axis one
sample per mm of the slab; then a bias field (``exp`` of a smooth field,
std U(0, ``bias_std``)), Rician noise (magnitude of complex Gaussian noise of std U(``noise_std``);
the air gets a noise floor as real magnitude images do), and gamma ``exp(N(0, gamma_std^2))``.
With probability ``artefact_prob`` (default 0; ``basalseg synth --head --artefacts P``), before
the noise, k-space artefacts (:func:`_kspace_artefacts`): Gibbs ringing (MONAI ``GibbsNoise``) and
motion-like ghosts (a periodic phase error on every 2nd-4th line along a random phase-encoding
axis), recorded in ``params["head"]["artefacts"]``.

**Ground truth** is on the output grid: the labels are sampled at the output voxel centres through
the same transform (nearest neighbour), so they stay exactly aligned with the image. The inverse
pose (output world -> template canvas world) is returned in ``params["head"]["canvas_from_world"]``,
and the brain on the output grid (tissue code "brain", nearest neighbour) as ``subject.brain_mask``.

**5. Skull-stripped** (``skull_stripped=True``, ``basalseg synth --head --skull-stripped``): after
all of the above, every voxel outside ``subject.brain_mask`` is set to 0: a brain extracted on the
scanner grid, in the head's pose, as a skull-stripping tool leaves it. Nothing else changes (the
same draws, labels and grid as the head of the same seed).

**Rescans** (``rescan=k``, ``basalseg synth --head --rescans K``): the same person scanned again
on the same protocol, for the scan-rescan study of localised results (docs/UNCERTAINTY.md). The
anatomy and the protocol are the subject's (every draw of steps 1-2 but the intensities; of step
3 the orientation, voxel size, thick slices and the output matrix, and the scanner origin); the
head sits in a new pose (a further rotation U(+-6 deg) per axis and translation U(+-5 mm) about
its posed centre), the field of view follows the brain to its new place, off by U(+-5 mm) per
axis, and every intensity (brain GMM, tissue means, stds and texture) and every acquisition draw
of step 4 are new, from a second stream (``SeedSequence([seed, 11, 7919, k])``;
the brain's from :func:`~basalseg.data.synth.rescan_seed`, the artefacts' from
``SeedSequence([seed, 13, k])``). ``rescan=0`` is the subject, bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from ..imageio import Volume
from ..spatial import Grid
from ..structures import STRUCTURES
from .settings import JsonSettings
from .synth import SynthConfig, SynthSource, SyntheticSubject, _rotation, synthesize

__all__ = ["HeadConfig", "synthesize_head", "brain_config_for_heads", "HEAD_GENERATOR_VERSION", "random_orientation",
           "RESCAN_ROTATION_DEG", "RESCAN_TRANSLATION_MM"]

HEAD_GENERATOR_VERSION = 1
#: a rescan's further head pose: rotations U(+-6 deg) about every axis, translations U(+-5 mm)
#: (the skull-stripped rescans' pose, :func:`basalseg.data.synth.synthesize` ``rescan=``)
RESCAN_ROTATION_DEG = 6.0
RESCAN_TRANSLATION_MM = 5.0
_FS = np.array([s.label for s in STRUCTURES])

#: layer name -> (thickness range mm, mean range); from the brain outward.
_LAYERS = (
    ("csf", (1.0, 4.0), (0.05, 0.30)),
    ("inner_table", (1.0, 2.5), (0.0, 0.10)),
    ("marrow", (1.5, 5.0), (0.45, 0.90)),
    ("outer_table", (1.0, 2.5), (0.0, 0.10)),
    ("fat", (2.0, 7.0), (0.95, 1.40)),
    ("muscle", (1.0, 4.0), (0.30, 0.55)),
    ("skin", (1.0, 2.0), (0.50, 0.75)),
)


@dataclass(frozen=True)
class HeadConfig(JsonSettings):
    """Head, pose and scanner-grid settings (module docstring); JSON round-trip with ``to_dict``."""

    _SETTINGS_NAME = "head config"

    rotation_deg: float = 30.0
    translation_mm: float = 20.0
    origin_mm: float = 150.0
    spacing_mm: tuple[float, float] = (0.8, 1.5)
    thick_slice_prob: float = 0.5
    thick_slice_mm: tuple[float, float] = (3.0, 6.0)
    fov_pad_mm: float = 15.0
    crop_prob: float = 0.15
    crop_min_mm: float = 15.0
    eyes_prob: float = 0.8
    neck_prob: float = 0.8
    tissue_std: tuple[float, float] = (0.01, 0.05)
    blur_sigma_mm: float = 0.5
    bias_std: float = 0.3
    bias_spacing_mm: float = 50.0
    noise_std: tuple[float, float] = (0.005, 0.04)
    gamma_std: float = 0.2
    profile_samples: int = 1
    fov_mm: tuple[float, float] = (220.0, 270.0)
    skull_stripped: bool = False
    artefact_prob: float = 0.0
    ringing_alpha: tuple[float, float] = (0.05, 0.35)
    ghost_phase_rad: tuple[float, float] = (0.2, 1.2)

    def __post_init__(self) -> None:
        if self.ringing_alpha[1] > 1:
            raise ValueError(f"ringing_alpha must lie in [0, 1]; got {self.ringing_alpha}")
        for name in ("spacing_mm", "thick_slice_mm", "tissue_std", "noise_std", "fov_mm", "ringing_alpha", "ghost_phase_rad"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high; got {(lo, hi)}")
        if self.spacing_mm[0] <= 0:
            raise ValueError(f"spacing_mm must be positive; got {self.spacing_mm}")
        for name in ("thick_slice_prob", "crop_prob", "eyes_prob", "neck_prob", "artefact_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1]; got {getattr(self, name)}")
        if self.profile_samples < 1:
            raise ValueError(f"profile_samples must be >= 1; got {self.profile_samples}")


def brain_config_for_heads(config: SynthConfig | None = None) -> SynthConfig:
    """The brain-level settings for head subjects: the given ones with the brain's own rotation
    and translation small (the head's pose does that) and a margin that holds the scaled brain,
    and no intensity corruption (applied to the whole head instead)."""
    config = config or SynthConfig()
    return replace(config, margin_mm=max(config.margin_mm, 15.0), rotation_deg=min(config.rotation_deg, 5.0),
                   translation_mm=0.0, bias_std=0.0, blur_sigma_mm=0.0, thick_slice_prob=0.0, noise_std=0.0,
                   gamma_std=0.0, keep_full_labels=True)


def random_orientation(rng: np.random.Generator) -> np.ndarray:
    """A random signed permutation matrix (3x3): one of the 48 axis orientation codes."""
    perm = rng.permutation(3)
    signs = rng.choice([-1.0, 1.0], 3)
    m = np.zeros((3, 3))
    m[perm, np.arange(3)] = signs
    return m


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], spacing_vox: float, std: float) -> np.ndarray:
    n_ctrl = [max(2, int(np.ceil(n / spacing_vox)) + 1) for n in shape]
    ctrl = rng.standard_normal(n_ctrl) * std
    return ndimage.zoom(ctrl, [n / c for n, c in zip(shape, n_ctrl)], order=1, mode="nearest", grid_mode=False).astype(np.float32)


def _brain_mask(image: np.ndarray, full: np.ndarray | None) -> np.ndarray:
    mask = image > 0.02 * float(np.percentile(image[image > 0], 99)) if (image > 0).any() else image > 0
    if full is not None:
        mask |= full > 0
    mask = ndimage.binary_closing(mask, iterations=3)
    mask = ndimage.binary_fill_holes(mask)
    lab, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, lab, np.arange(1, n + 1))
        mask = lab == int(np.argmax(sizes)) + 1
    return mask


def synthesize_head(source: SynthSource, seed: int, config: SynthConfig | None = None,
                    head: HeadConfig | None = None, rescan: int = 0) -> SyntheticSubject:
    """One head-like subject (module docstring). ``source`` must be prepared with
    :func:`brain_config_for_heads` of ``config`` (its margin); returns image and labels on a random
    scanner grid (``subject.image.affine``), full labels on that grid too.

    Args:
        rescan: 0 = the subject itself. ``k >= 1``: a synthetic *rescan* of the same person on the
            same protocol (module docstring, "Rescans"): the anatomy (brain deformation, structure
            volumes, head layers, eyes, neck) and the protocol (axis orientation, voxel size,
            thick-slice axis and thickness, output matrix, scanner origin) are the subject's; the
            head is moved by a further rigid pose (rotations U(+-:data:`RESCAN_ROTATION_DEG`),
            translations U(+-:data:`RESCAN_TRANSLATION_MM`) about the posed head's centre), the
            field of view follows the brain, off by U(+-:data:`RESCAN_TRANSLATION_MM`) per axis,
            and every intensity and acquisition draw is new (brain GMM, tissue means and texture,
            blur, bias, noise, gamma, k-space artefacts), from streams of their own.
    """
    head = head or HeadConfig()
    rescan = int(rescan)
    if rescan < 0:
        raise ValueError(f"rescan must be >= 0; got {rescan}")
    bconf = brain_config_for_heads(config)
    t0 = time.perf_counter()
    brain = synthesize(source, seed, bconf, rescan=rescan, repose=False)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 11]))
    # a rescan's intensity and acquisition draws (the subject's are still drawn from rng, in the
    # same order, so that every anatomical and protocol draw stays the subject's)
    scan = rng if rescan == 0 else np.random.default_rng(np.random.SeedSequence([int(seed), 11, 7919, rescan]))
    img_b, lab_b, full_b = brain.image.data, brain.labels, brain.full_labels
    # --- canvas: the brain grid padded so the head (and the neck) fit ---
    pad_lo = np.array([22, 30, 75])  # R-L, posterior/anterior, inferior (neck)/superior
    pad_hi = np.array([22, 35, 22])
    pads = tuple((int(a), int(b)) for a, b in zip(pad_lo, pad_hi))
    image = np.pad(img_b.astype(np.float32), pads)
    labels = np.pad(lab_b, pads)
    full = np.pad(full_b, pads) if full_b is not None else None
    affine = brain.image.affine.copy()
    affine[:3, 3] = affine[:3, 3] - affine[:3, :3] @ pad_lo
    shape = image.shape
    bmask = _brain_mask(image, full)
    dist = ndimage.distance_transform_edt(~bmask).astype(np.float32)  # mm (1 mm canvas)
    modul = 1.0 + np.clip(_smooth_field(rng, shape, 30.0, 0.15), -0.3, 0.3)
    tissue = np.zeros(shape, np.int8)  # 0 air, 1 brain, 2.. layers, then eyes/orbit/neck codes
    tissue[bmask] = 1
    names = ["air", "brain"]
    means, stds = {}, {}
    edge = 0.0
    draws = {}
    tstd = head.tissue_std
    for code, (name, thick_r, mean_r) in enumerate(_LAYERS, start=2):
        t = float(rng.uniform(*thick_r))
        means[name], stds[name] = float(rng.uniform(*mean_r)), float(rng.uniform(*tstd))
        if rescan:
            means[name], stds[name] = float(scan.uniform(*mean_r)), float(scan.uniform(*tstd))
        draws[name] = round(t, 3)
        shell = (~bmask) & (dist >= edge * modul) & (dist < (edge + t) * modul)
        tissue[shell & (tissue == 0)] = code
        edge += t
        names.append(name)
    head_radius = edge
    idx = np.argwhere(bmask)
    lo, hi = idx.min(0), idx.max(0)
    centre_b = (lo + hi) / 2.0
    extra = {}
    grid_idx = None
    if rng.uniform() < head.eyes_prob:
        r_eye = float(rng.uniform(10, 13))
        sep = float(rng.uniform(28, 34))
        y_eye = hi[1] - float(rng.uniform(0, 8))
        z_eye = lo[2] + (hi[2] - lo[2]) * float(rng.uniform(0.22, 0.32))
        grid_idx = np.indices(shape, dtype=np.float32) if grid_idx is None else grid_idx
        eyes = np.zeros(shape, bool)
        for sgn in (-1, 1):
            c = np.array([centre_b[0] + sgn * sep, y_eye, z_eye])
            d2 = sum((grid_idx[a] - c[a]) ** 2 for a in range(3))
            eyes |= d2 < r_eye ** 2
        orbit = ndimage.binary_dilation(eyes, iterations=4) & ~eyes & ~bmask
        tissue[orbit] = len(names)
        names.append("orbital_fat")
        means["orbital_fat"], stds["orbital_fat"] = float(rng.uniform(0.95, 1.4)), float(rng.uniform(*tstd))
        if rescan:
            means["orbital_fat"], stds["orbital_fat"] = float(scan.uniform(0.95, 1.4)), float(scan.uniform(*tstd))
        tissue[eyes & ~bmask] = len(names)
        names.append("vitreous")
        means["vitreous"], stds["vitreous"] = float(rng.uniform(0.05, 0.25)), float(rng.uniform(*tstd))
        if rescan:
            means["vitreous"], stds["vitreous"] = float(scan.uniform(0.05, 0.25)), float(scan.uniform(*tstd))
        extra["eyes"] = {"radius_mm": round(r_eye, 2), "separation_mm": round(2 * sep, 2)}
        # skin/fat around the eyes so they sit inside the head
        around = ndimage.binary_dilation(orbit | eyes, iterations=3) & (tissue == 0)
        tissue[around] = names.index("skin")
    if rng.uniform() < head.neck_prob:
        length = float(rng.uniform(40, 90))
        ax_r, ax_a = float(rng.uniform(50, 62)), float(rng.uniform(48, 60))
        grid_idx = np.indices(shape[:2], dtype=np.float32)
        cx, cy = centre_b[0], centre_b[1] - float(rng.uniform(5, 20))
        ell = ((grid_idx[0] - cx) / ax_r) ** 2 + ((grid_idx[1] - cy) / ax_a) ** 2
        z_top = lo[2] + (hi[2] - lo[2]) * 0.25
        z = np.arange(shape[2])
        zsel = (z <= z_top) & (z >= lo[2] - length)
        neck_muscle = ell < 0.8
        neck_fat = (ell >= 0.8) & (ell < 1.0)
        col = ((grid_idx[0] - cx) / 9.0) ** 2 + ((grid_idx[1] - (cy - 5)) / 9.0) ** 2 < 1
        for mask2d, name in ((neck_fat, "fat"), (neck_muscle, "muscle")):
            m3 = mask2d[:, :, None] & zsel[None, None, :] & (tissue == 0)
            tissue[m3] = names.index(name)
        tissue[col[:, :, None] & zsel[None, None, :] & ~bmask] = names.index("marrow")
        extra["neck"] = {"length_mm": round(length, 1), "semi_axes_mm": [round(ax_r, 1), round(ax_a, 1)]}
    del dist, modul
    # --- compose intensities (brain from synth; tissues with their own mean and std) ---
    canvas = np.where(bmask, image, 0.0).astype(np.float32)
    noise = rng.standard_normal(shape, dtype=np.float32)
    if rescan:
        noise = scan.standard_normal(shape, dtype=np.float32)
    for code, name in enumerate(names):
        if code < 2:
            continue
        sel = tissue == code
        canvas[sel] = means[name] + stds[name] * noise[sel]
    del noise
    # --- pose and output grid ---
    rot = rng.uniform(-head.rotation_deg, head.rotation_deg, 3)
    trans = rng.uniform(-head.translation_mm, head.translation_mm, 3)
    origin = rng.uniform(-head.origin_mm, head.origin_mm, 3)
    orient = random_orientation(rng)
    spacing = np.full(3, float(rng.uniform(*head.spacing_mm)))
    thick = None
    if rng.uniform() < head.thick_slice_prob:
        axis = int(rng.integers(0, 3))
        spacing[axis] = float(rng.uniform(*head.thick_slice_mm))
        thick = {"axis": axis, "thickness_mm": round(float(spacing[axis]), 3)}
    crop = rng.uniform() < head.crop_prob
    pad = rng.uniform(0, head.fov_pad_mm, 6)
    crop_margin = float(rng.uniform(head.crop_min_mm, head.crop_min_mm + 25))
    cap = rng.uniform(*head.fov_mm, 3)  # a scanner's field of view: at most U(fov_mm) per axis
    centre_w = affine[:3, :3] @ centre_b + affine[:3, 3]
    head_mask = tissue > 0
    box_src = bmask if crop else head_mask
    bidx = np.argwhere(box_src)
    b_lo, b_hi = bidx.min(0), bidx.max(0)
    corners = np.array([[x, y, z, 1.0] for x in (b_lo[0], b_hi[0]) for y in (b_lo[1], b_hi[1]) for z in (b_lo[2], b_hi[2])])
    dirs = orient * spacing[None, :]  # output axes: direction columns orient * spacing

    def posed(rotation: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """canvas world -> output world: ``R (x - c) + c + t + origin``."""
        f = np.eye(4)
        f[:3, :3] = rotation
        f[:3, 3] = centre_w + shift + origin - rotation @ centre_w
        return f

    def brain_centre(f: np.ndarray) -> np.ndarray:  # along each output axis direction (mm)
        return (f @ affine @ np.append(centre_b, 1.0))[:3] @ orient

    fwd = posed(_rotation(rot), trans)
    in_axes = (fwd @ affine @ corners.T)[:3].T @ orient  # the box's corners along each output axis (mm)
    a_lo = in_axes.min(0) - (crop_margin if crop else pad[:3])
    a_hi = in_axes.max(0) + (crop_margin if crop else pad[3:])
    brain_c = brain_centre(fwd)
    for a in range(3):  # at most the cap, kept around the brain
        if a_hi[a] - a_lo[a] > cap[a]:
            lo_a = min(max(brain_c[a] - cap[a] / 2, a_lo[a]), a_hi[a] - cap[a])
            a_lo[a], a_hi[a] = lo_a, lo_a + cap[a]
    out_shape = tuple(int(np.ceil((h - l) / s)) + 1 for l, h, s in zip(a_lo, a_hi, spacing))
    repose = None
    if rescan:
        # the same protocol (the subject's grid: orientation, voxel size, matrix) on the head moved
        # by D, t_d about its posed centre (R (x - c) + c + t -> D R (x - c) + c + t + t_d), the
        # field of view placed on it as the operator places it: following the brain, off by a few mm
        d_rot = scan.uniform(-RESCAN_ROTATION_DEG, RESCAN_ROTATION_DEG, 3)
        d_trans = scan.uniform(-RESCAN_TRANSLATION_MM, RESCAN_TRANSLATION_MM, 3)
        fov_shift = scan.uniform(-RESCAN_TRANSLATION_MM, RESCAN_TRANSLATION_MM, 3)
        fwd = posed(_rotation(d_rot) @ _rotation(rot), trans + d_trans)
        a_lo = a_lo + (brain_centre(fwd) - brain_c) + fov_shift
        repose = {"rotation_deg": d_rot.round(3).tolist(), "translation_mm": d_trans.round(3).tolist(),
                  "fov_shift_mm": fov_shift.round(3).tolist()}
    out_affine = np.eye(4)
    out_affine[:3, :3] = dirs
    out_affine[:3, 3] = orient @ a_lo
    # --- acquisition: pre-blur, slice-profile averaging, bias, Rician noise, gamma ---
    rng = scan  # from here on every draw is of the acquisition (a rescan's own)
    blur = float(rng.uniform(0, head.blur_sigma_mm))
    # in-plane partial volume: a Gaussian of the output voxel size (FWHM ~ spacing) on the canvas
    sigma_pv = max(blur, 0.42 * float(np.min(spacing)) * 0.8)
    canvas = ndimage.gaussian_filter(canvas, sigma_pv, mode="constant")
    canvas_from_out = np.linalg.inv(affine) @ np.linalg.inv(fwd) @ out_affine
    n_prof = int(head.profile_samples)
    offsets_1d = [(np.arange(n_prof) + 0.5) / n_prof - 0.5 for _ in spacing]
    if thick is not None:  # enough samples to span the slab every ~1 mm
        k = max(n_prof, int(np.ceil(spacing[thick["axis"]])))
        offsets_1d[thick["axis"]] = (np.arange(k) + 0.5) / k - 0.5
    out_img = np.zeros(out_shape, np.float32)
    out_lab = np.zeros(out_shape, np.int16)
    out_full = np.zeros(out_shape, np.int16) if full is not None else None
    out_tissue = np.zeros(out_shape, np.int8)
    nsub = 0
    slab = max(1, int(4e6 // (out_shape[1] * out_shape[2])))
    jj, kk = np.meshgrid(np.arange(out_shape[1], dtype=np.float32), np.arange(out_shape[2], dtype=np.float32), indexing="ij")
    for i0 in range(0, out_shape[0], slab):
        ii = np.arange(i0, min(i0 + slab, out_shape[0]), dtype=np.float32)
        vox = np.stack([np.broadcast_to(ii[:, None, None], (ii.size,) + jj.shape),
                        np.broadcast_to(jj[None], (ii.size,) + jj.shape),
                        np.broadcast_to(kk[None], (ii.size,) + jj.shape)]).reshape(3, -1)
        base = canvas_from_out[:3, :3] @ vox + canvas_from_out[:3, 3:4]
        out_lab[i0:i0 + ii.size] = ndimage.map_coordinates(labels, base, order=0, mode="constant", cval=0).reshape((ii.size,) + jj.shape)
        out_tissue[i0:i0 + ii.size] = ndimage.map_coordinates(tissue, base, order=0, mode="constant", cval=0).reshape((ii.size,) + jj.shape)
        if out_full is not None:
            out_full[i0:i0 + ii.size] = ndimage.map_coordinates(full, base, order=0, mode="constant", cval=0).reshape((ii.size,) + jj.shape)
        acc = np.zeros(base.shape[1], np.float32)
        nsub = 0
        for ox in offsets_1d[0]:
            for oy in offsets_1d[1]:
                for oz in offsets_1d[2]:
                    shift = canvas_from_out[:3, :3] @ np.array([ox, oy, oz])
                    acc += ndimage.map_coordinates(canvas, base + shift[:, None], order=1, mode="constant", cval=0.0,
                                                   prefilter=False)
                    nsub += 1
        out_img[i0:i0 + ii.size] = (acc / nsub).reshape((ii.size,) + jj.shape)
    del canvas
    bias_std = float(rng.uniform(0, head.bias_std))
    mean_sp = float(np.mean(spacing))
    out_img *= np.exp(_smooth_field(rng, out_shape, head.bias_spacing_mm / mean_sp, bias_std))
    out_img, artefacts = _kspace_artefacts(out_img, head, seed, rescan)
    sigma = float(rng.uniform(*head.noise_std))
    if sigma > 0:
        n1 = rng.standard_normal(out_shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(out_shape, dtype=np.float32) * sigma
        out_img = np.sqrt((out_img + n1) ** 2 + n2 ** 2)
    gamma = float(np.exp(rng.normal(0, head.gamma_std))) if head.gamma_std > 0 else 1.0
    top = float(np.percentile(out_img, 99.9)) or 1.0
    out_img = (np.clip(out_img / top, 0, None) ** gamma).astype(np.float32)
    vox_mm3 = float(np.prod(spacing))
    volumes = {s.key: float((out_lab == s.label).sum() * vox_mm3) for s in STRUCTURES}
    canvas_from_world = np.linalg.inv(fwd)
    params = dict(brain.params)
    params["volumes_mm3"] = volumes
    params["layout"] = ("top-level entries: the brain as drawn on the template grid (its deformation and contrast; "
                        "a rescan's pose there is none); 'volumes_mm3': the labels on the output grid; 'head': the "
                        "head around it, its pose in the scanner, the field of view and the acquisition")
    params["head"] = {
        "generator_version": HEAD_GENERATOR_VERSION, "layers_mm": draws, "head_thickness_mm": round(head_radius, 2),
        "tissue_means": {k: round(v, 4) for k, v in means.items()}, "tissue_stds": {k: round(v, 4) for k, v in stds.items()},
        **extra, "rotation_deg": rot.round(3).tolist(), "translation_mm": trans.round(3).tolist(),
        "origin_offset_mm": origin.round(3).tolist(), "orientation": orient.astype(int).tolist(),
        "axcodes": _axcodes(orient), "spacing_mm": spacing.round(4).tolist(), "thick_slices": thick,
        "crop_to_brain": bool(crop), "shape": [int(s) for s in out_shape], "blur_sigma_mm": round(blur, 3),
        "bias_std": round(bias_std, 4), "noise_std": round(sigma, 4), "gamma": round(gamma, 4),
        "canvas_from_world": canvas_from_world.round(6).tolist(), "seconds": round(time.perf_counter() - t0, 2),
    }
    if artefacts is not None:
        params["head"]["artefacts"] = artefacts
    if repose is not None:
        params["head"]["rescan"] = {"index": rescan, **repose}
    brain_mask = out_tissue == 1  # the brain on the output grid
    if head.skull_stripped:
        out_img = np.where(brain_mask, out_img, np.float32(0)).astype(np.float32)
        params["head"]["skull_stripped"] = True
    volume = Volume(out_img, out_affine, meta={"synthetic": True, "template": source.name, "seed": int(seed), "head": True})
    subject = SyntheticSubject(volume, out_lab, out_full if (config is not None and config.keep_full_labels) else None,
                               params)
    subject.brain_mask = brain_mask  # type: ignore[attr-defined]
    return subject


def _kspace_artefacts(image: np.ndarray, head: HeadConfig, seed: int, rescan: int = 0) -> tuple[np.ndarray, dict | None]:
    """Step 4b (module docstring): Gibbs ringing and motion ghosts, with probability ``artefact_prob``.

    Draws come from their own stream (``SeedSequence([seed, 13])``), so every other draw of the
    subject, and the whole subject when the artefacts are off, stay as without them.
    Ringing: MONAI's ``GibbsNoise`` (k-space truncation; alpha U(``ringing_alpha``)). Ghosts: along
    a random phase-encoding axis, every 2nd-4th k-space line gets a phase error U(``ghost_phase_rad``)
    (as from periodic motion), which copies the head at shifts of N/period voxels; the magnitude
    image is kept. Returns the image (float32) and the draws (None when off).
    """
    if head.artefact_prob <= 0:
        return image, None
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 13] + ([int(rescan)] if rescan else [])))
    if rng.uniform() >= head.artefact_prob:
        return image, None
    from monai.transforms import GibbsNoise
    from scipy import fft

    alpha = float(rng.uniform(*head.ringing_alpha))
    axis, period = int(rng.integers(3)), int(rng.integers(2, 5))
    phase = float(rng.uniform(*head.ghost_phase_rad))
    if alpha > 0:
        image = np.asarray(GibbsNoise(alpha)(image[None]).numpy()[0], dtype=np.float32)
    if phase > 0:
        k = fft.fft(image, axis=axis, workers=1)
        lines = [slice(None)] * 3
        lines[axis] = slice(0, None, period)  # every period-th k-space line, in place
        k[tuple(lines)] *= np.complex64(np.exp(1j * phase))
        image = np.abs(fft.ifft(k, axis=axis, workers=1)).astype(np.float32)
    return image, {"ringing_alpha": round(alpha, 4), "ghost_axis": axis, "ghost_period": period,
                   "ghost_phase_rad": round(phase, 4)}


def _axcodes(orient: np.ndarray) -> str:
    out = ""
    for col in range(3):
        axis = int(np.argmax(np.abs(orient[:, col])))
        out += ("R", "A", "S")[axis] if orient[axis, col] > 0 else ("L", "P", "I")[axis]
    return out
