"""Overlap metrics: the one Dice the package uses (evaluation, training, bench, QC report), and
the foundation-vs-student agreement the pipeline records (:func:`foundation_student_dice`).

``dice(a, b) = 2 |A ∩ B| / (|A| + |B|)`` over boolean masks of one shape. The empty-mask rule is
stated once, here: when both masks are empty the value is ``empty`` (1.0 by default: two empty
segmentations agree perfectly; callers that want "no evidence" pass ``empty=None``).
"""

from __future__ import annotations

import numpy as np

from .structures import STRUCTURES

__all__ = ["dice", "dice_per_class", "foundation_student_dice"]


def dice(a: np.ndarray, b: np.ndarray, empty: float | None = 1.0) -> float | None:
    """Dice of two boolean masks (any shape, the same for both).

    Args:
        a, b: masks (non-zero = inside).
        empty: the value when both are empty (see module docstring).

    Raises:
        ValueError: the shapes differ.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes: {a.shape} and {b.shape}")
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return empty
    return 2.0 * int(np.count_nonzero(a & b)) / total


def dice_per_class(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """:func:`dice` of each class ``1 .. num_classes - 1`` of two class-index maps (1.0 where both
    are empty)."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    return np.array([dice(pred == c, ref == c) for c in range(1, num_classes)])


def foundation_student_dice(masks: np.ndarray, classes: np.ndarray, prompts, first_slice: int = 0) -> dict[str, float | None]:
    """Per structure (key), Dice between the stacked foundation masks and the student's labels,
    over the axial slices that carried a prompt for that structure (the only slices where the
    foundation model produced anything). None when the structure had no prompts, or neither
    labelling has a voxel there (``empty=None`` of :func:`dice`).

    Args:
        masks: ``(8, X, Y, Z)`` boolean foundation masks (``SegmentResult.masks``).
        classes: ``(X, Y, Z)`` student class indices on the same canonical grid (``SegmentResult.classes``).
        prompts: the :class:`~basalseg.prompts.PromptSet` used.
        first_slice: the axial slice index of the arrays' first slice, when they are a crop of the
            grid (``masks`` and ``classes`` of one region holding all of both; the pipeline's).
    """
    out: dict[str, float | None] = {}
    for s in STRUCTURES:
        ks = sorted({p.slice - int(first_slice) for p in prompts.for_structure(s.key)})
        if not ks:
            out[s.key] = None
            continue
        value = dice(masks[s.class_index - 1][:, :, ks], np.asarray(classes[:, :, ks]) == s.class_index, empty=None)
        out[s.key] = None if value is None else round(value, 4)
    return out
