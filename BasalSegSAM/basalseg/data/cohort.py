"""Labelled cohorts in nnU-Net folder layout: reading, checking, and atomic writing.

Layout (nnU-Net v2 "raw dataset")::

    <cohort>/
        dataset.json                (optional here; written by the synthetic generator)
        imagesTr/<NAME>_0000.nii.gz (channel 0: the T1 image)
        labelsTr/<NAME>.nii.gz      (integer labelmap on the image's grid)

Only channel ``_0000`` is used; other channels (``_0001`` ...) are ignored. The file ending is
``.nii.gz`` unless ``dataset.json`` names another ``file_ending`` (``.nii``).

**Label values.** By default label files are read as FreeSurfer aseg values: 10-13 and 49-52
are the eight structures (:data:`basalseg.structures.STRUCTURES`), every other value becomes
background. Cohorts with another numbering (e.g. nnU-Net class indices 1..8) pass a
``label_mapping``: a dict *user value -> FreeSurfer value* (a value may also be given as a
structure key or name, ``"left_putamen"``), or the path of a JSON file holding that object
(keys are strings in JSON: ``{"1": 10, "2": "left_caudate"}``). With a mapping, user values not
in it become background.

:func:`read_cohort` checks the folder up front and raises :class:`CohortError` naming the case
for an image without a label file (or the reverse), an image and label on different grids, and
a label file that contains none of the eight structures.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np

from ..errors import BasalSegError
from ..imageio import Volume, load_volume
from ..structures import STRUCTURES, get_structure

__all__ = [
    "CohortError",
    "CohortCase",
    "LabelMapping",
    "read_label_mapping",
    "apply_label_mapping",
    "read_cohort",
    "case_paths",
    "write_nifti_atomic",
    "write_json_atomic",
    "atomic_path",
]

#: dict user value -> FreeSurfer value (or structure name), a JSON file path, or None.
LabelMapping = Union[Mapping[Any, Any], str, os.PathLike, None]

_FS_LABELS = frozenset(s.label for s in STRUCTURES)
_CHANNEL = "_0000"


class CohortError(BasalSegError, ValueError):
    """A cohort folder is incomplete or inconsistent; the message names the case and problem."""


@dataclass(frozen=True)
class CohortCase:
    """One labelled case of a cohort.

    Attributes:
        name: case identifier (``NAME`` in ``NAME_0000.nii.gz``).
        image_path: the T1 image (channel 0).
        label_path: the labelmap.
        label_mapping: user value -> FreeSurfer value, or None for FreeSurfer-valued labels.
    """

    name: str
    image_path: Path
    label_path: Path
    label_mapping: Mapping[int, int] | None = None

    def load(self) -> tuple[Volume, np.ndarray]:
        """Read the image and its labels, the labels mapped to FreeSurfer values (int16; only
        the eight structures kept, everything else 0)."""
        image = load_volume(self.image_path)
        labels = _read_labels(self.label_path)
        return image, apply_label_mapping(labels, self.label_mapping)


def read_label_mapping(mapping: LabelMapping) -> dict[int, int] | None:
    """Validate a label mapping and return it as ``{int user value: FreeSurfer value}``.

    Args:
        mapping: dict user value -> FreeSurfer value (10-13, 49-52, or 0 for background; a
            structure key/name such as ``"left_putamen"`` is accepted too), the path of a JSON
            file holding such an object, or None (labels are FreeSurfer values already).

    Raises:
        CohortError: unreadable JSON file, non-integer keys, or target values that are not one
            of the eight structures (or 0).
    """
    if mapping is None:
        return None
    source = "label_mapping"
    if isinstance(mapping, (str, os.PathLike)):
        path = Path(mapping)
        source = str(path)
        if not path.is_file():
            raise CohortError(f"label_mapping file {path} does not exist")
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CohortError(f"label_mapping file {path} is not valid JSON ({exc})") from exc
    if not isinstance(mapping, Mapping) or not mapping:
        raise CohortError(f"{source}: expected a non-empty object user label -> FreeSurfer label")
    out: dict[int, int] = {}
    for key, value in mapping.items():
        try:
            user = int(str(key).strip())
        except ValueError:
            raise CohortError(f"{source}: key {key!r} is not an integer label value") from None
        if isinstance(value, (int, np.integer)) and int(value) == 0:
            target = 0
        else:
            try:
                target = get_structure(value).label
            except (KeyError, ValueError):
                valid = ", ".join(str(v) for v in sorted(_FS_LABELS))
                raise CohortError(
                    f"{source}: user label {user} maps to {value!r}, which is not one of the FreeSurfer "
                    f"labels {valid} (or 0), nor a structure name"
                ) from None
        out[user] = target
    return out


def apply_label_mapping(labels: np.ndarray, mapping: Mapping[int, int] | None) -> np.ndarray:
    """Map user label values to FreeSurfer values; keep only the eight structures (int16)."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.int16)
    table = mapping if mapping is not None else {v: v for v in _FS_LABELS}
    for user, target in table.items():
        if target:
            out[labels == user] = target
    return out


def case_paths(root: str | os.PathLike, name: str, file_ending: str = ".nii.gz") -> tuple[Path, Path]:
    """``(image path, label path)`` of case ``name`` in a cohort folder (nnU-Net layout)."""
    root = Path(root)
    return root / "imagesTr" / f"{name}{_CHANNEL}{file_ending}", root / "labelsTr" / f"{name}{file_ending}"


def _read_labels(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        raise CohortError(f"{path}: unreadable label file ({type(exc).__name__}: {exc})") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CohortError(f"{path}: label file is {data.ndim}D; a 3D labelmap is needed")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise CohortError(f"{path}: label file holds non-integer values")
    return data.astype(np.int32)


def _header_grid(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise CohortError(f"{path}: unreadable NIfTI header ({type(exc).__name__}: {exc})") from exc
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape, np.asarray(img.affine, dtype=np.float64)


def _file_ending(root: Path) -> str:
    meta = root / "dataset.json"
    if meta.is_file():
        try:
            ending = json.loads(meta.read_text(encoding="utf-8")).get("file_ending")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise CohortError(f"{meta}: not valid JSON ({exc})") from exc
        if ending:
            return str(ending)
    return ".nii.gz"


def _names(folder: Path, ending: str, suffix: str) -> dict[str, Path]:
    out = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.endswith(suffix + ending):
            out[path.name[: -len(suffix + ending)]] = path
    return out


def _summarise(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_cohort(
    folder: str | os.PathLike,
    label_mapping: LabelMapping = None,
    *,
    check_grids: bool = True,
    check_labels: bool = True,
    grid_tolerance_mm: float = 1e-3,
) -> list[CohortCase]:
    """List the labelled cases of a cohort folder in nnU-Net layout (see module docstring).

    Args:
        folder: the cohort folder holding ``imagesTr`` and ``labelsTr``.
        label_mapping: user label value -> FreeSurfer value (dict or JSON file path); None when
            the label files hold FreeSurfer values already.
        check_grids: compare each image's and label's shape and affine (headers only).
        check_labels: read every label file and require at least one of the eight structures
            (after mapping).
        grid_tolerance_mm: largest affine difference accepted as "same grid".

    Returns:
        The cases, sorted by name.

    Raises:
        CohortError: missing folders, an image without a label file or the reverse, no cases,
            mismatched grids, label files without any of the structures, a bad mapping.
    """
    root = Path(folder)
    if not root.is_dir():
        raise CohortError(f"cohort folder {root} does not exist")
    mapping = read_label_mapping(label_mapping)
    for sub in ("imagesTr", "labelsTr"):
        if not (root / sub).is_dir():
            raise CohortError(f"cohort folder {root} has no {sub}/ subfolder (nnU-Net layout expected)")
    ending = _file_ending(root)
    images = _names(root / "imagesTr", ending, _CHANNEL)
    labels = _names(root / "labelsTr", ending, "")
    no_label = sorted(set(images) - set(labels))
    if no_label:
        raise CohortError(f"{root}: no label file labelsTr/NAME{ending} for image(s) {_summarise(no_label)}")
    no_image = sorted(set(labels) - set(images))
    if no_image:
        raise CohortError(f"{root}: no image imagesTr/NAME{_CHANNEL}{ending} for label file(s) {_summarise(no_image)}")
    if not images:
        raise CohortError(f"{root}: no cases (expected imagesTr/NAME{_CHANNEL}{ending} with labelsTr/NAME{ending})")
    cases = []
    for name in sorted(images):
        case = CohortCase(name, images[name], labels[name], mapping)
        if check_grids:
            ishape, iaff = _header_grid(case.image_path)
            lshape, laff = _header_grid(case.label_path)
            if ishape != lshape:
                raise CohortError(f"case {name}: image shape {ishape} differs from label shape {lshape}")
            if not np.allclose(iaff, laff, atol=grid_tolerance_mm):
                raise CohortError(f"case {name}: image and label files have different voxel-to-world matrices")
        if check_labels:
            data = _read_labels(case.label_path)
            if not apply_label_mapping(data, mapping).any():
                found = np.unique(data)
                shown = ", ".join(str(int(v)) for v in found[:12]) + (" ..." if found.size > 12 else "")
                hint = "" if mapping else " (pass label_mapping if the file uses another numbering)"
                raise CohortError(
                    f"case {name}: label file {case.label_path.name} contains none of the eight structures; "
                    f"values found: {shown}{hint}"
                )
        cases.append(case)
    return cases


def _atomic_target(path: Path) -> tuple[int, str]:
    """A temporary file next to ``path`` (same file system, so ``os.replace`` is atomic), with the
    permissions an ordinary new file would get (``mkstemp`` makes it private)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def atomic_path(path: str | os.PathLike) -> tuple[int, str]:
    """Open a temporary file for ``path`` (see :func:`write_nifti_atomic`); the caller writes it,
    then ``os.replace(tmp, path)``, and removes it on failure. Returns ``(fd, tmp path)``."""
    return _atomic_target(Path(path))


def write_nifti_atomic(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, dtype: Any = None) -> Path:
    """Write a NIfTI file through a temporary file in the same folder, renamed into place.

    Args:
        path: destination (``.nii`` or ``.nii.gz``).
        data: the array.
        affine: 4x4 voxel-to-RAS matrix (written as both qform and sform).
        dtype: on-disk type; defaults to ``data``'s.
    """
    import nibabel as nib

    path = Path(path)
    array = np.asarray(data) if dtype is None else np.asarray(data).astype(dtype)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    gz_tmp = tmp + (".nii.gz" if path.name.endswith(".gz") else ".nii")
    try:
        img.to_filename(gz_tmp)
        os.replace(gz_tmp, path)
    finally:
        for leftover in (tmp, gz_tmp):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON through a temporary file renamed into place."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
