"""Reading and checking input images (NIfTI and NRRD).

Conventions, used everywhere in the package:

* A :class:`Volume` holds a 3D array indexed ``[i, j, k]`` (voxel axes in file order) and a 4x4
  ``affine`` that maps voxel indices ``(i, j, k, 1)`` to world coordinates in millimetres in
  **RAS+** (x to the patient's Right, y Anterior, z Superior), NIfTI's convention. NRRD files,
  which usually store LPS, are converted on reading.
* The input's grid and affine are kept untouched; :mod:`basalseg.spatial` maps to and from the
  networks' canonical space.
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputImageError

log = logging.getLogger("basalseg")

__all__ = ["Volume", "load_volume", "check_volume", "LPS_TO_RAS", "SUPPORTED_SUFFIXES"]

#: Flips x and y: LPS world <-> RAS world (the same matrix both ways).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

SUPPORTED_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")

#: Images larger than this many voxels are refused (a 1024^3 volume); memory would not be bounded.
MAX_VOXELS = 1024**3


@dataclass
class Volume:
    """A 3D image on its own grid.

    Attributes:
        data: float32 array, shape ``(I, J, K)``.
        affine: 4x4 float64 voxel-to-RAS-world matrix (mm).
        path: where it was read from, if anywhere.
        meta: free-form information kept for provenance (format, original dtype, ...).
    """

    data: np.ndarray
    affine: np.ndarray
    path: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in mm (column norms of the affine)."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm^3 (|det| of the affine's 3x3 part)."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))


def _first_line(exc: BaseException) -> str:
    """A library error's message cut to its first line (errors here are one line)."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    import nibabel as nib

    if path.name.lower().endswith(".gz"):
        # nibabel reads gzip lazily; a truncated stream surfaces late and cryptically.
        with open(path, "rb") as handle:
            if handle.read(2) != b"\x1f\x8b":
                raise InputImageError(f"{path}: not a gzip file although its name ends in .gz")
    shape = None
    # nibabel logs its header repairs ("data code 9999 not recognized; ...") to stderr twice (its own
    # handler and the root logger): the command promises one error line, so keep them quiet here.
    nib_log = logging.getLogger("nibabel.global")
    was_disabled, nib_log.disabled = nib_log.disabled, True
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputImageError(f"{path}: not a NIfTI image")
        # A damaged header can claim any size: refuse what the file cannot hold before nibabel
        # allocates it (deflate compresses at most ~1032:1).
        shape = tuple(int(s) for s in img.shape)
        claimed = 1
        for size in shape:
            claimed *= max(size, 0)
        if claimed > MAX_VOXELS:
            raise InputImageError(f"{path}: unreadable NIfTI file (its header claims {claimed} voxels, shape {shape}, "
                                  f"more than the limit of {MAX_VOXELS}: damaged?)")
        needed, file_size = claimed * int(img.get_data_dtype().itemsize), path.stat().st_size
        if path.name.lower().endswith(".gz"):
            if needed > 1032 * file_size + 4096:
                raise InputImageError(f"{path}: unreadable NIfTI file (its header describes {needed} bytes of voxel "
                                      f"data, more than a {file_size}-byte gzip file can hold: damaged?)")
        elif needed + int(img.header.get_data_offset()) > file_size:
            raise InputImageError(f"{path}: unreadable NIfTI file (its header describes {needed} bytes of voxel data, "
                                  f"the file has {file_size} bytes: truncated?)")
        data = np.asanyarray(img.dataobj)
        if path.name.lower().endswith(".gz"):
            # nibabel stops reading at the last voxel, before the gzip trailer: without reading to
            # the end, a damaged stream whose CRC32 fails would load as silently wrong voxels.
            with gzip.open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass
    except InputImageError:
        raise
    except MemoryError as exc:
        raise InputImageError(f"{path}: not enough memory to read an image of shape {shape}") from exc
    except Exception as exc:  # damaged files raise many types: EOFError, zlib.error, HeaderDataError, ...
        raise InputImageError(f"{path}: unreadable NIfTI file ({type(exc).__name__}: {_first_line(exc)})") from exc
    finally:
        nib_log.disabled = was_disabled
    affine = img.affine
    if affine is None:
        raise InputImageError(f"{path}: NIfTI header has no usable orientation (qform/sform)")
    meta = {"format": "nifti", "dtype": str(img.get_data_dtype())}
    affine, notes = _choose_nifti_affine(img, np.asarray(affine, dtype=np.float64), shape)
    for note in notes:
        log.warning("%s: %s", path, note)
    if notes:
        meta["notes"] = notes
    return data, affine, meta


def _choose_nifti_affine(img, affine: np.ndarray, shape) -> tuple[np.ndarray, list[str]]:
    """The voxel-to-world matrix to use, and notes on what was chosen.

    nibabel takes the sform when its code is set, else the qform. Where the sform is set but
    singular and the qform is usable, the qform is taken instead (with a note); where both are set
    and place the image's corners more than 0.1 mm apart, the sform is kept and a note says so.
    """
    header = img.header
    try:
        sform, s_code = header.get_sform(coded=True)
        qform, q_code = header.get_qform(coded=True)
    except Exception:  # a header without these fields (NIfTI-2 edge cases): nibabel's choice stands
        return affine, []
    def usable(m) -> bool:
        return m is not None and np.isfinite(m).all() and abs(np.linalg.det(np.asarray(m)[:3, :3])) > 1e-9
    notes: list[str] = []
    if s_code and not usable(sform) and q_code and usable(qform):
        notes.append("the sform is singular; its valid qform is used instead")
        return np.asarray(qform, dtype=np.float64), notes
    if s_code and q_code and usable(sform) and usable(qform):
        dims = [max(int(n) - 1, 0) for n in list(shape)[:3]] + [0] * (3 - len(list(shape)[:3]))
        corners = np.array([[i, j, k, 1.0] for i in (0, dims[0]) for j in (0, dims[1]) for k in (0, dims[2])]).T
        gap = float(np.abs((np.asarray(sform) - np.asarray(qform)) @ corners)[:3].max())
        if gap > 0.1:
            notes.append(f"its qform and sform disagree (image corners up to {gap:.1f} mm apart); the sform is used, "
                         "as by nibabel and most viewers")
    return affine, notes


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    import nrrd

    try:
        data, header = nrrd.read(str(path), index_order="F")
    except Exception as exc:  # pynrrd raises its own error types and plain ValueErrors
        raise InputImageError(f"{path}: unreadable NRRD file ({type(exc).__name__}: {_first_line(exc)})") from exc
    directions = header.get("space directions")
    origin = header.get("space origin")
    space = str(header.get("space", "left-posterior-superior")).lower()
    if directions is None:
        raise InputImageError(f"{path}: NRRD header has no 'space directions'; cannot place it in space")
    rows = [np.asarray(d, dtype=float) for d in directions if d is not None and not np.all(np.isnan(np.asarray(d, float)))]
    if len(rows) != 3:
        raise InputImageError(f"{path}: NRRD has {len(rows)} spatial axes; a 3D volume is needed")
    affine = np.eye(4)
    affine[:3, :3] = np.stack(rows, axis=1)
    affine[:3, 3] = np.zeros(3) if origin is None else np.asarray(origin, dtype=float)
    if space in ("left-posterior-superior", "lps"):
        affine = LPS_TO_RAS @ affine
    elif space not in ("right-anterior-superior", "ras"):
        raise InputImageError(f"{path}: NRRD space {space!r} is not supported (use RAS or LPS)")
    # Non-spatial axes (e.g. a list of channels) have a 'none' direction.
    if data.ndim == 4:
        kinds = [str(k).lower() for k in header.get("kinds", [])]
        if kinds and kinds[0] not in ("domain", "space"):
            data = np.moveaxis(data, 0, -1)
    return data, affine, {"format": "nrrd", "dtype": str(data.dtype)}


def load_volume(path: str | os.PathLike, *, check: bool = True) -> Volume:
    """Read a 3D image from NIfTI (``.nii``, ``.nii.gz``) or NRRD (``.nrrd``, ``.nhdr``).

    Args:
        path: the file.
        check: run :func:`check_volume` (dimensionality, finite, not empty/constant).

    Returns:
        The volume, data as float32, affine in RAS.

    Raises:
        InputImageError: missing, unreadable or unsuitable file; the message names the problem.
    """
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"{path}: no such file")
    if path.is_dir():
        raise InputImageError(f"{path}: is a folder, not an image file")
    suffix = _suffix(path)
    if suffix in (".nii", ".nii.gz"):
        data, affine, meta = _read_nifti(path)
    elif suffix in (".nrrd", ".nhdr"):
        data, affine, meta = _read_nrrd(path)
    else:
        raise InputImageError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    volume = Volume(data=data, affine=affine, path=str(path), meta=meta)
    if check:
        volume = check_volume(volume, name=str(path))
    return volume


def check_volume(volume: Volume, name: str = "image") -> Volume:
    """Check that a volume is a usable 3D image; return it with float32 data.

    Accepts a 4D array whose last axis has length 1 (squeezed). Refuses 2D images, 4D series,
    non-finite values, empty or constant volumes, singular affines and volumes over
    :data:`MAX_VOXELS`.

    Raises:
        InputImageError: naming the problem.
    """
    data = np.asanyarray(volume.data)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise InputImageError(f"{name}: 4D image with {data.shape[-1]} volumes; give a single 3D T1 volume")
    if data.ndim != 3:
        raise InputImageError(f"{name}: {data.ndim}D image of shape {tuple(data.shape)}; a 3D volume is needed")
    if min(data.shape) < 2:
        raise InputImageError(f"{name}: image of shape {tuple(data.shape)} is a single slice; a 3D volume is needed")
    if data.size > MAX_VOXELS:
        raise InputImageError(f"{name}: image of {data.size} voxels exceeds the limit of {MAX_VOXELS}")
    if np.iscomplexobj(data) or data.dtype.kind not in "biuf":
        raise InputImageError(f"{name}: voxel type {data.dtype} is not a real-valued image")
    # Checked in the file's own type (min/max of integers cannot overflow), then cast to float32
    # once: no float64 copy of the whole volume (1 GiB for 512^3).
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise InputImageError(f"{name}: {bad} voxels are NaN or infinite")
        del finite
    lo, hi = float(data.min()), float(data.max())
    if hi == lo:
        what = "empty (all zero)" if hi == 0 else f"constant (every voxel is {hi:g})"
        raise InputImageError(f"{name}: the volume is {what}")
    if max(abs(lo), abs(hi)) > np.finfo(np.float32).max:
        raise InputImageError(f"{name}: intensities up to {max(abs(lo), abs(hi)):.3g} overflow 32-bit floats")
    affine = np.asarray(volume.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputImageError(f"{name}: the voxel-to-world matrix is missing or singular")
    return Volume(data=np.asarray(data, dtype=np.float32), affine=affine, path=volume.path, meta=dict(volume.meta))
