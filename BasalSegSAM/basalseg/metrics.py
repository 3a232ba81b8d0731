"""Overlap metrics: the one Dice the package uses (evaluation, training, bench, QC report).

``dice(a, b) = 2 |A ∩ B| / (|A| + |B|)`` over boolean masks of one shape. The empty-mask rule is
stated once, here: when both masks are empty the value is ``empty`` (1.0 by default: two empty
segmentations agree perfectly; callers that want "no evidence" pass ``empty=None``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["dice", "dice_per_class"]


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
