"""basalseg.intensity.conform_intensities and saturation_flag on real templates and altered copies."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from basalseg.data.atlas import template_path
from basalseg.intensity import conform_intensities, normalize01, saturation_flag


@pytest.fixture(scope="module", params=["mni152", "icbm2009c"])
def template(request) -> np.ndarray:
    return np.asarray(nib.load(str(template_path(request.param))).dataobj, dtype=np.float32)


def test_an_ordinary_t1_is_left_as_it_is(template):
    out, notes = conform_intensities(template)
    assert out is template and notes == []
    assert saturation_flag(template) is None


@pytest.mark.parametrize("offset", [-500.0, -3.0e4, 250.0])
def test_an_offset_background_is_brought_back_to_zero(template, offset):
    shifted = template + np.float32(offset)
    out, notes = conform_intensities(shifted)
    if offset > 0:  # a positive offset leaves the background above 0: nothing the stages mind
        assert out is shifted and notes == []
        return
    assert len(notes) == 1 and "an offset" in notes[0]
    assert np.abs(out - template).max() <= 1e-6 * np.abs(offset) + 1e-3
    assert np.abs(normalize01(out) - normalize01(template)).max() < 1e-4


def test_lone_hot_voxels_no_longer_set_the_range(template):
    hot = template.copy()
    rng = np.random.default_rng(0)
    idx = tuple(rng.integers(0, s, 20) for s in hot.shape)
    hot[idx] = 1e6
    out, notes = conform_intensities(hot)
    assert len(notes) == 1 and "20 voxel(s) brighter" in notes[0]
    assert out.max() == template.max()  # set to the brightest other voxel
    away = np.ones(template.shape, bool)
    away[idx] = False
    assert np.abs(normalize01(out) - normalize01(template))[away].max() < 1e-4
    # without the step the normalised brain would be almost all zero
    assert (normalize01(hot) > 0.05).mean() < 0.001 < (normalize01(out) > 0.05).mean()


def test_a_clipped_image_is_flagged_saturated(template):
    clipped = np.minimum(template, np.percentile(template[template > 0], 90))
    flag = saturation_flag(clipped)
    assert flag is not None and flag["kind"] == "saturated" and "% of the image's foreground" in flag["message"]
    as_uint8 = np.round(255 * template / template.max())  # an 8-bit copy without clipping is not
    assert saturation_flag(as_uint8) is None


def test_extreme_ranges_stay_finite(template):
    """A T1 stored over float32's whole range, its background at -3e38: shifted and scaled, finite."""
    data = (template.astype(np.float64) / template.max() * 6e38 - 3e38).astype(np.float32)
    out, notes = conform_intensities(data)
    assert np.isfinite(out).all() and out.min() >= 0 and "scaled by" in notes[0]
    assert np.abs(normalize01(out) - normalize01(template)).max() < 1e-3


def test_the_undershoot_of_a_spline_is_clamped_not_taken_for_an_offset(template):
    """A skull-stripped brain resampled with a cubic spline: values just below 0 around the brain,
    its background 0: set to 0, no shift."""
    from scipy import ndimage

    resampled = ndimage.zoom(template[::2, ::2, ::2], 2, order=3).astype(np.float32)
    assert resampled.min() < 0
    out, notes = conform_intensities(resampled)
    assert len(notes) == 1 and "below 0" in notes[0] and "offset" not in notes[0]
    assert out.min() == 0 and np.array_equal(out[resampled > 0], resampled[resampled > 0])


def test_no_copy_of_an_ordinary_fortran_ordered_image(template):
    """NIfTI arrays are Fortran-ordered: checking one must not copy it (a 512^3 input is 512 MiB)."""
    import tracemalloc

    image = np.asfortranarray(template)
    tracemalloc.start()
    try:
        out, _ = conform_intensities(image)
        saturation_flag(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out is image
    assert peak < 0.7 * image.nbytes  # a boolean mask or two (1 byte a voxel) and samples, no float copy
    shifted, _ = conform_intensities(np.asfortranarray(template - np.float32(100)))
    assert shifted.flags.f_contiguous  # a changed image keeps its memory order


def test_a_brain_standardised_inside_its_mask_keeps_its_zero_background(template):
    """A skull-stripped brain z-scored inside its mask (background exactly 0, half the brain below
    0): the brain is shifted up, the background stays 0, and the stages see the original's contrast."""
    brain = template > 0
    z = np.where(brain, (template - template[brain].mean()) / template[brain].std(), 0).astype(np.float32)
    out, notes = conform_intensities(z)
    assert len(notes) == 1 and "standardised inside its mask" in notes[0]
    assert (out[~brain] == 0).all() and out.min() == 0
    assert np.corrcoef(normalize01(out)[brain], normalize01(template)[brain])[0, 1] > 0.999
