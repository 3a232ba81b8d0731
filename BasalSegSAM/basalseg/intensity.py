"""Intensity normalisation shared by every network stage.

T1 intensities have no fixed scale, so each volume is mapped to [0, 1] by robust percentiles
of its foreground (voxels above the lowest 1% of the range, which drops the zero background of
skull-stripped images and the air of others): ``p_low`` -> 0, ``p_high`` -> 1, clipped.
"""

from __future__ import annotations

import numpy as np

__all__ = ["normalize01", "foreground_mask"]


def foreground_mask(data: np.ndarray) -> np.ndarray:
    """Voxels above 1% of the intensity range (background of skull-stripped or air-filled images excluded)."""
    lo, hi = float(data.min()), float(data.max())
    return data > lo + 0.01 * (hi - lo)


def normalize01(data: np.ndarray, p_low: float = 0.5, p_high: float = 99.5, max_samples: int = 2_000_000) -> np.ndarray:
    """Map ``data`` to float32 [0, 1] by foreground percentiles.

    Args:
        data: any-shape real array.
        p_low, p_high: percentiles of the foreground mapped to 0 and 1.
        max_samples: percentiles are estimated on at most this many evenly strided foreground
            voxels (exact for smaller volumes), which keeps 512^3 inputs cheap.

    Returns:
        float32 array of the same shape.
    """
    data = np.asarray(data, dtype=np.float32)
    fg = data[foreground_mask(data)]
    if fg.size == 0:
        fg = data.ravel()
    if fg.size > max_samples:
        fg = fg[:: int(np.ceil(fg.size / max_samples))]
    lo, hi = (float(v) for v in np.percentile(fg, [p_low, p_high]))
    if not hi > lo:
        # (Nearly) constant foreground. "lo + 1" is lo again above 2**53 (a two-valued int64 image),
        # which made 0/0 = NaN voxels; a step relative to lo stays representable.
        hi = lo + max(1.0, abs(lo) * 1e-6)
    # float64 arithmetic (no overflow at float32's extremes) in blocks, float32 out: the result
    # used to be a float64 array, 8 bytes per canonical voxel instead of the documented 4.
    out = np.empty(data.shape, dtype=np.float32)
    src, dst = data.reshape(-1), out.reshape(-1)
    step = 1 << 22
    for start in range(0, src.size, step):
        block = (src[start : start + step].astype(np.float64) - lo) / (hi - lo)
        dst[start : start + step] = np.clip(block, 0.0, 1.0)
    return out
