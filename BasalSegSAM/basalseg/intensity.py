"""Intensity normalisation shared by every network stage.

T1 intensities have no fixed scale, so each volume is mapped to [0, 1] by robust percentiles
of its foreground (voxels above the lowest 1% of the range, which drops the zero background of
skull-stripped images and the air of others): ``p_low`` -> 0, ``p_high`` -> 1, clipped.

Before any stage, :func:`conform_intensities` puts an input's intensities where every stage
expects them: the background at about 0 and no lone extreme voxels. Scanners and converters
write T1s that are not so: with an offset that makes the background negative (a signed
reconstruction, an export of ``image - c``, a z-scored image), with a few hot voxels (spikes,
a marker, a converter's overflow) that set the range, or saturated (clipped at some level, e.g.
a conversion to 8 bits). What it changes it says (notes in ``provenance.json``, a warning);
an image that needs nothing is returned unchanged. Saturation cannot be undone: it is reported
as the ``saturated`` QC flag (:func:`saturation_flag`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["normalize01", "foreground_mask", "conform_intensities", "saturation_flag", "OUTLIER_FACTOR",
           "SATURATED_FRACTION"]

#: voxels brighter than this many times the 99.9th percentile of the positive voxels are outliers
#: (measured: synthetic heads 1.07-1.35 times it, the MNI152 and ICBM 2009c templates 1.02 / 1.04)
OUTLIER_FACTOR = 3.0
#: more than this fraction of the foreground at the image's maximum value: a saturated image
SATURATED_FRACTION = 0.01
#: an image with at least this fraction of its voxels at about 0 has a zero background
ZERO_BACKGROUND = 0.10
#: percentiles are estimated on every n-th voxel of larger images
_SAMPLES = 2_000_000


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
    # float32 out: the result used to be a float64 array, 8 bytes per canonical voxel instead of the
    # documented 4
    out = np.empty(data.shape, dtype=np.float32)
    _map_blocks(data.reshape(-1), out.reshape(-1), lambda block: np.clip((block - lo) / (hi - lo), 0.0, 1.0))
    return out


def _map_blocks(src: np.ndarray, dst: np.ndarray, fn) -> None:
    """``dst[:] = fn(src)`` for flat arrays, in blocks of 4 Mi voxels and in float64 (no overflow at
    float32's extremes; the float64 temporaries stay one block in size)."""
    step = 1 << 22
    for start in range(0, src.size, step):
        dst[start : start + step] = fn(src[start : start + step].astype(np.float64))


def _sample(data: np.ndarray) -> np.ndarray:
    """Every n-th voxel (at most about :data:`_SAMPLES`), in memory order: no copy of the image
    (NIfTI arrays are Fortran-ordered, whose C-order reshape would copy them whole)."""
    flat = np.ravel(data, order="K")
    return flat[:: max(1, int(np.ceil(flat.size / _SAMPLES)))].copy()


def conform_intensities(data: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """``(data, notes)``: the intensities every stage expects (module docstring), and what was changed.

    * an **offset**: when the lowest 0.1 % of voxels lie below 0, the image is shifted so that they
      lie at 0 (the background or darkest tissue of a T1 is its darkest part; a z-scored image, or
      one stored over a signed type's whole range, is the same image shifted) -- unless the image
      has a zero background (at least :data:`ZERO_BACKGROUND` of it within 0.5 % of the range
      around 0: a skull-stripped brain), whose negative voxels are a spline's undershoot;
    * voxels still **below 0** are set to 0;
    * **outliers**: voxels brighter than :data:`OUTLIER_FACTOR` times the 99.9th percentile of the
      positive voxels are set to the brightest voxel that is not one.

    ``data`` itself is returned when nothing applies (no voxel below 0, no outlier: ordinary
    T1s, whose results are then the same with or without this step); otherwise one float32 copy
    (in ``data``'s memory order) is made and changed in place.
    """
    data = np.asarray(data, dtype=np.float32)
    notes: list[str] = []
    sample = _sample(data)
    low = float(np.percentile(sample, 0.1))
    high = float(np.percentile(sample, 99.9))
    out = data
    shift, keep_zeros = None, False  # what to subtract; whether exact zeros stay 0 (a masked brain)
    if low < 0:
        zero_background = high > low and float(np.mean(np.abs(sample) <= 0.005 * (high - low))) >= ZERO_BACKGROUND
        if not zero_background:
            shift = low  # an offset
        elif float(np.mean(sample == 0)) >= ZERO_BACKGROUND:
            inside = sample[sample != 0]
            inside_low = float(np.percentile(inside, 0.1))
            if inside_low < -0.05 * (high - inside_low):
                # a background of exact zeros around a brain with substantially negative intensities
                # (a skull-stripped brain z-scored inside its mask): the brain shifted, the zeros kept
                shift, keep_zeros = inside_low, True
    if shift is not None:
        # an image spanning -3e38..3e38 spans 6e38 after the shift: such a span is also scaled down
        # (the stages are scale-invariant)
        span = float(data.max()) - shift
        factor = 1.0 if span < 1e30 else 1e6 / span

        def moved(block):
            shifted = (block - shift) * factor
            return np.where(block != 0, np.maximum(shifted, 0.0), 0.0) if keep_zeros else shifted

        out = np.empty_like(data)
        _map_blocks(np.ravel(data, order="K"), np.ravel(out, order="K"), moved)  # views: same memory order
        sample = moved(sample.astype(np.float64)).astype(np.float32)
    negative = int(np.count_nonzero(out < 0)) if out.min() < 0 else 0
    if negative:
        out = out if out is not data else data.copy(order="K")
        np.maximum(out, np.float32(0), out=out)
    if keep_zeros:
        notes.append(f"a background of zeros around intensities down to {shift:.4g} (a skull-stripped brain "
                     f"standardised inside its mask?): the non-zero voxels were shifted by {-shift:.4g} so that "
                     "the darkest lie at 0, the background kept at 0")
    elif shift is not None:
        notes.append(f"the image's background and its lowest 0.1 % of intensities lie below 0 (at {low:.4g}): an "
                     f"offset; the image was shifted by {-low:.4g} so that its background lies at 0"
                     + (f" (and scaled by {factor:.3g} to fit 32-bit floats)" if factor != 1.0 else "")
                     + (f" ({negative} voxel(s) still below 0 were set to 0)" if negative else ""))
    elif negative:
        notes.append(f"{negative} voxel(s) below 0 around the image's zero background (the undershoot of an "
                     "interpolation) were set to 0")
    positive = sample[sample > 0]
    if positive.size:
        cap = OUTLIER_FACTOR * float(np.percentile(positive, 99.9))
        top = float(out.max())
        hot = int(np.count_nonzero(out > cap)) if cap > 0 and top > cap else 0
        if hot:
            brightest = float(np.max(out, where=out <= cap, initial=0.0))  # the brightest voxel that is not an outlier
            out = out if out is not data else data.copy(order="K")
            np.putmask(out, out > cap, np.float32(brightest))
            notes.append(f"{hot} voxel(s) brighter than {OUTLIER_FACTOR:g} times the image's 99.9th percentile (up to "
                         f"{top:.4g}, against {cap / OUTLIER_FACTOR:.4g}) were set to the brightest other voxel's "
                         f"{brightest:.4g}: outliers such as spikes would otherwise set the intensity range")
    return out, notes


def saturation_flag(data: np.ndarray) -> dict | None:
    """The ``saturated`` QC flag (``{"kind", "message", "structure"}``) when more than
    :data:`SATURATED_FRACTION` of the foreground (:func:`foreground_mask`) sits at the image's
    maximum value: the image was clipped, so the brightest tissues lost their contrast and
    volumes may be wrong; else None."""
    sample = _sample(np.asarray(data))
    fg = sample[foreground_mask(sample)]
    if fg.size == 0:
        return None
    top = float(sample.max())
    fraction = float(np.count_nonzero(fg >= top)) / fg.size
    if fraction <= SATURATED_FRACTION:
        return None
    return {"kind": "saturated", "structure": None,
            "message": f"{100 * fraction:.1f} % of the image's foreground sits at its maximum value ({top:.4g}): the "
                       "image looks saturated (clipped, e.g. by a conversion to 8 bits), so the brightest tissues lost "
                       "their contrast and the volumes may be wrong; use the scanner's original image"}
