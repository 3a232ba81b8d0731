"""The signed-distance-map channel: sign, boundary value, saturation, band, and the cropped
computation against a direct whole-array formula (scipy's exact EDT)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from basalseg.sdm import DEFAULT_BAND, sdm_channel, sdm_channels, signed_distance


def _sphere(shape=(64, 64, 64), centre=(32, 32, 32), radius=20.0):
    zz = np.indices(shape).astype(float)
    r = np.sqrt(sum((zz[a] - centre[a]) ** 2 for a in range(3)))
    return r <= radius


def _direct(mask, band, spacing=None):
    """SDM by the module docstring's definition, computed on the whole array with scipy."""
    mask = np.asarray(mask, bool)
    spacing = spacing or (1.0,) * mask.ndim
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    half = 0.5 * min(spacing)
    d = np.where(mask, -(inside - half), outside - half)
    t = band / 6.0
    val = 1.0 / (1.0 + np.exp(np.clip(d / t, -60, 60)))
    return np.where(d < -band, 1.0, np.where(d > band, 0.0, val))


@pytest.fixture(scope="module")
def sphere():
    return _sphere()


def test_inside_above_half_outside_below(sphere):
    s = sdm_channel(sphere, band=10.0)
    assert s.dtype == np.float32 and s.shape == sphere.shape
    assert (s >= 0).all() and (s <= 1).all()
    assert (s[sphere] > 0.5).all()
    assert (s[~sphere] < 0.5).all()


def test_boundary_voxels_are_near_half_and_symmetric(sphere):
    band = 10.0
    s = sdm_channel(sphere, band=band)
    # voxels face-adjacent to the boundary sit at d = -0.5 (inside) and +0.5 (outside)
    inner_edge = sphere & ~ndimage.binary_erosion(sphere)
    outer_edge = ndimage.binary_dilation(sphere) & ~sphere
    bound = 1.0 / (1.0 + np.exp(-0.5 * 6.0 / band)) - 0.5  # sigmoid(0.5 / T) - 0.5
    assert 0 < bound < 0.1
    np.testing.assert_allclose(s[inner_edge], 0.5 + bound, atol=1e-5)
    np.testing.assert_allclose(s[outer_edge], 0.5 - bound, atol=1e-5)
    line = s[:, 32, 32]
    last_in = int(np.nonzero(sphere[:, 32, 32])[0].max())
    assert line[last_in] + line[last_in + 1] == pytest.approx(1.0, abs=1e-5)


def test_exactly_one_deep_inside_and_zero_far_outside(sphere):
    band = 5.0
    s = sdm_channel(sphere, band=band)
    d = signed_distance(sphere)
    assert (s[d < -band] == 1.0).all() and (d < -band).sum() > 1000
    assert (s[d > band] == 0.0).all() and (d > band).sum() > 1000
    assert s[32, 32, 32] == 1.0 and s[0, 0, 0] == 0.0
    # inside the band, strictly between
    within = np.abs(d) < band - 0.5
    assert ((s[within] > 0.0) & (s[within] < 1.0)).all()


def test_monotone_along_a_line_through_the_sphere(sphere):
    s = sdm_channel(sphere, band=8.0)
    line = s[32:, 32, 32]  # centre outwards
    assert (np.diff(line) <= 0).all()
    d = signed_distance(sphere)[32:, 32, 32]
    moving = np.abs(d) <= 8.0
    assert (np.diff(line)[moving[:-1] & moving[1:]] < 0).all(), "strictly decreasing across the band"
    back = s[:33, 32, 32]  # outwards on the other side
    assert (np.diff(back) >= 0).all()


def test_larger_band_widens_the_transition(sphere):
    def width(band):
        s = sdm_channel(sphere, band=band)
        return int(((s > 0.05) & (s < 0.95)).sum())

    w3, w6, w12 = width(3.0), width(6.0), width(12.0)
    assert w3 < w6 < w12
    line3 = sdm_channel(sphere, band=3.0)[32:, 32, 32]
    line12 = sdm_channel(sphere, band=12.0)[32:, 32, 32]
    assert (line12[:20] <= line3[:20] + 1e-6).all()  # inside: slower rise to 1
    assert (line12[21:] >= line3[21:] - 1e-6).all()  # outside: slower fall to 0


def test_empty_and_full_masks():
    empty = sdm_channel(np.zeros((10, 12, 14), bool))
    assert empty.shape == (10, 12, 14) and empty.dtype == np.float32 and not empty.any()
    full = sdm_channel(np.ones((10, 12, 14), bool))
    assert (full == 1.0).all()
    assert np.isposinf(signed_distance(np.zeros((3, 3, 3), bool))).all()
    assert np.isneginf(signed_distance(np.ones((3, 3, 3), bool))).all()


@pytest.mark.parametrize("band", [0.0, -1.0, float("nan")])
def test_band_must_be_positive(band):
    with pytest.raises(ValueError, match="band"):
        sdm_channel(np.ones((4, 4, 4), bool), band=band)


def test_signed_distance_values_on_a_cube():
    mask = np.zeros((20, 20, 20), bool)
    mask[5:15, 5:15, 5:15] = True
    d = signed_distance(mask)
    assert d[5, 10, 10] == pytest.approx(-0.5) and d[4, 10, 10] == pytest.approx(0.5)
    assert d[9, 10, 10] == pytest.approx(-4.5)  # 5 voxels to the nearest outside voxel
    assert d[0, 10, 10] == pytest.approx(4.5)
    assert d[4, 4, 10] == pytest.approx(np.sqrt(2) - 0.5, abs=1e-5)


def _blobs(seed, shape, touch_edge=False):
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.52
    mask = ndimage.binary_opening(mask)
    if touch_edge:
        mask[:4, :6, :5] = True
        mask[-3:, 10:20, -2:] = True
    return mask


@pytest.mark.parametrize("band", [2.5, DEFAULT_BAND, 17.0])
@pytest.mark.parametrize("case", ["small blob", "random blobs", "touching the edges"])
def test_cropped_computation_equals_the_whole_array_formula(case, band):
    shape = (48, 56, 40)
    if case == "small blob":
        mask = _sphere(shape, centre=(30, 20, 25), radius=6.0)
    else:
        mask = _blobs(7, shape, touch_edge=case == "touching the edges")
    assert mask.any() and not mask.all()
    got = sdm_channel(mask, band=band)
    expected = _direct(mask, band)
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)


def test_cropped_computation_anisotropic_spacing():
    mask = _sphere((40, 40, 30), centre=(20, 18, 15), radius=7.0)
    spacing = (1.0, 1.0, 2.0)
    np.testing.assert_allclose(sdm_channel(mask, band=6.0, spacing=spacing), _direct(mask, 6.0, spacing),
                               atol=2e-6, rtol=0)


def test_cropped_computation_sub_millimetre_spacing():
    mask = _sphere((60, 60, 60), centre=(30, 30, 30), radius=8.0)
    spacing = (0.5, 0.5, 0.5)
    np.testing.assert_allclose(sdm_channel(mask, band=4.0, spacing=spacing), _direct(mask, 4.0, spacing),
                               atol=1e-5, rtol=0)


def test_sdm_channels_stacks_per_structure():
    masks = np.zeros((8, 30, 30, 20), bool)
    masks[0, 5:12, 5:12, 5:10] = True
    masks[3, 15:25, 10:20, 8:15] = True
    out = sdm_channels(masks, band=4.0)
    assert out.shape == masks.shape and out.dtype == np.float32
    for c in range(8):
        np.testing.assert_array_equal(out[c], sdm_channel(masks[c], band=4.0))
    assert not out[1].any()
