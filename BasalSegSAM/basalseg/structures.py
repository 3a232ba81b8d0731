"""The eight structures BasalSegSAM segments, written once.

Every part of the pipeline (networks, prompts, outputs, the Slicer module) takes its structure
list, label values, names and colours from here.

* **Class index** (network channel): 0 is background, 1..8 follow :data:`STRUCTURES` order.
* **Label value** (files on disk): FreeSurfer aseg values, so results open next to FreeSurfer
  output: 10/11/12/13 = left thalamus/caudate/putamen/pallidum, 49/50/51/52 = right.
* **Key**: the snake_case name used in ``prompts.json`` and on the command line
  (``left_putamen``). :func:`get_structure` also accepts the FreeSurfer name
  (``Left-Putamen``) and the label value.
* **Colour**: FreeSurfer's ``FreeSurferColorLUT.txt`` colour for that label, as RGB in 0..255.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UnknownStructureError

__all__ = [
    "Structure",
    "STRUCTURES",
    "NUM_CLASSES",
    "get_structure",
    "class_to_label_lut",
    "left_right_permutation",
    "labels_to_classes",
    "classes_to_labels",
]


@dataclass(frozen=True)
class Structure:
    """One segmented structure.

    Attributes:
        key: snake_case identifier (``left_putamen``).
        name: FreeSurfer aseg name (``Left-Putamen``).
        label: FreeSurfer aseg label value (12).
        class_index: network output channel (1..8; 0 is background).
        color: RGB colour, 0..255.
        hemisphere: ``"left"`` or ``"right"`` (the patient's side).
    """

    key: str
    name: str
    label: int
    class_index: int
    color: tuple[int, int, int]
    hemisphere: str

    @property
    def color_float(self) -> tuple[float, float, float]:
        """Colour as RGB floats in 0..1 (Slicer's convention)."""
        return tuple(c / 255.0 for c in self.color)  # type: ignore[return-value]

    @property
    def title(self) -> str:
        """Human-readable name, e.g. ``Left putamen``."""
        side, part = self.key.split("_", 1)
        return f"{side.capitalize()} {part}"


_TABLE = [
    ("left_thalamus", "Left-Thalamus", 10, (0, 118, 14), "left"),
    ("left_caudate", "Left-Caudate", 11, (122, 186, 220), "left"),
    ("left_putamen", "Left-Putamen", 12, (236, 13, 176), "left"),
    ("left_pallidum", "Left-Pallidum", 13, (12, 48, 255), "left"),
    ("right_thalamus", "Right-Thalamus", 49, (0, 118, 14), "right"),
    ("right_caudate", "Right-Caudate", 50, (122, 186, 220), "right"),
    ("right_putamen", "Right-Putamen", 51, (236, 13, 176), "right"),
    ("right_pallidum", "Right-Pallidum", 52, (13, 48, 255), "right"),
]

#: The eight structures in class-index order (class index = position + 1).
STRUCTURES: tuple[Structure, ...] = tuple(
    Structure(key, name, label, i + 1, color, side) for i, (key, name, label, color, side) in enumerate(_TABLE)
)

#: Number of network output classes: background + 8 structures.
NUM_CLASSES = len(STRUCTURES) + 1

_ALIASES: dict[str, Structure] = {}
for _s in STRUCTURES:
    _ALIASES[_s.key] = _s
    _ALIASES[_s.name.lower()] = _s
    _ALIASES[str(_s.label)] = _s
# FreeSurfer 6 and older call the thalamus "Thalamus-Proper".
_ALIASES["left-thalamus-proper"] = STRUCTURES[0]
_ALIASES["right-thalamus-proper"] = STRUCTURES[4]


def get_structure(name: str | int) -> Structure:
    """Return the structure for a key, FreeSurfer name or label value.

    Args:
        name: ``"left_putamen"``, ``"Left-Putamen"`` or ``12``.

    Raises:
        UnknownStructureError: nothing matches; the message lists the valid keys.
    """
    found = _ALIASES.get(str(name).strip().lower())
    if found is None:
        valid = ", ".join(s.key for s in STRUCTURES)
        raise UnknownStructureError(f"unknown structure {name!r}; expected one of: {valid}")
    return found


def left_right_permutation() -> list[int]:
    """Class-index permutation (length :data:`NUM_CLASSES`) that swaps each left structure with its
    right twin; 0 (background) stays. Used for left-right mirroring on the RAS+ canonical grid
    (axis 0 is left-right): the student's mirrored pass and its mirror augmentation."""
    perm = list(range(NUM_CLASSES))
    by_part: dict[str, list[int]] = {}
    for s in STRUCTURES:
        by_part.setdefault(s.key.split("_", 1)[1], []).append(s.class_index)
    for a, b in by_part.values():
        perm[a], perm[b] = b, a
    return perm


def class_to_label_lut() -> np.ndarray:
    """Lookup table (length 9) from class index to FreeSurfer label value (0 stays 0)."""
    return np.array([0] + [s.label for s in STRUCTURES], dtype=np.int16)


def labels_to_classes(labels: np.ndarray, mapping: dict[int, int] | None = None) -> np.ndarray:
    """Map a label volume to class indices (uint8); labels not in the mapping become 0.

    Args:
        labels: integer label array (any shape).
        mapping: label value -> class index. Defaults to the FreeSurfer values of :data:`STRUCTURES`;
            pass another mapping for atlases with other numbering.
    """
    mapping = mapping or {s.label: s.class_index for s in STRUCTURES}
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.uint8)
    for value, cls in mapping.items():
        out[labels == value] = cls
    return out


def classes_to_labels(classes: np.ndarray) -> np.ndarray:
    """Map class indices (0..8) to FreeSurfer label values (int16)."""
    classes = np.asarray(classes)
    if classes.size and (classes.min() < 0 or classes.max() >= NUM_CLASSES):
        raise ValueError(f"class indices must lie in 0..{NUM_CLASSES - 1}")
    lut = class_to_label_lut()
    if classes.ndim == 0:
        return lut[int(classes)]
    out = np.empty(classes.shape, dtype=lut.dtype)
    step = max(1, (1 << 22) // max(int(np.prod(classes.shape[1:])), 1))  # ~4 M voxels a block: bounded index copies
    for i in range(0, classes.shape[0], step):
        out[i : i + step] = lut[classes[i : i + step].astype(np.intp)]
    return out
