"""basalseg.intensity.conform_intensities and saturation_flag on real templates and altered copies."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from basalseg.data.atlas import template_path
from basalseg.intensity import OUTLIER_FACTOR, conform_intensities, normalize01, saturation_flag


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
    assert out.max() == template[template <= OUTLIER_FACTOR * template.max()].max()  # the brightest other voxel
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


def test_extreme_ranges_stay_finite():
    data = np.random.default_rng(1).uniform(-3e38, 3e38, (40, 40, 40)).astype(np.float32)
    out, notes = conform_intensities(data)
    assert np.isfinite(out).all() and out.min() >= 0 and "scaled by" in notes[0]
