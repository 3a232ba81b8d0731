"""Reading inputs (NIfTI, NRRD) and the canonical-space round trip, on real template data."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from conftest import FLIP_XY, dice, reindex, reindex_affine, sample_linear, world_of, write_nifti, write_nrrd_lps

from basalseg.errors import InputImageError
from basalseg.imageio import LPS_TO_RAS, Volume, check_volume, load_volume
from basalseg.spatial import Grid, bounding_box, canonical_grid, crop_slices, resample_to_grid, to_canonical

# ---------------------------------------------------------------------------------------------
# imageio: good files
# ---------------------------------------------------------------------------------------------


def test_lps_to_ras_constant():
    assert np.array_equal(LPS_TO_RAS, FLIP_XY)


def test_nifti_read_keeps_data_and_affine(mni_t1):
    vol = load_volume(mni_t1.path)
    assert vol.shape == (182, 218, 182)
    assert vol.data.dtype == np.float32
    assert np.array_equal(vol.data, mni_t1.data)
    assert np.allclose(vol.affine, mni_t1.affine)
    assert np.allclose(vol.spacing, 1.0) and vol.voxel_volume_mm3 == pytest.approx(1.0)
    assert vol.meta["format"] == "nifti" and vol.path == str(mni_t1.path)


def test_nrrd_lps_reads_as_ras_and_matches_nifti_copy(bg_crop_1mm, tmp_path):
    """An LPS NRRD and a NIfTI copy of the same image put every voxel at the same RAS point."""
    # an oblique-ish, anisotropic RAS affine so no axis is trivially symmetric
    affine = bg_crop_1mm.affine @ np.diag([1.0, 1.2, 2.5, 1.0])
    affine[:3, 3] += [3.25, -7.5, 11.0]
    data = bg_crop_1mm.data.astype(np.int16)
    lps = write_nrrd_lps(tmp_path / "t1.nrrd", data, affine)
    write_nifti(tmp_path / "t1.nii.gz", data, affine)

    v_nrrd = load_volume(tmp_path / "t1.nrrd")
    v_nii = load_volume(tmp_path / "t1.nii.gz")
    assert v_nrrd.meta["format"] == "nrrd"
    assert np.array_equal(v_nrrd.data, v_nii.data)
    assert np.allclose(v_nrrd.affine, v_nii.affine, atol=1e-5)
    # the voxel -> world map itself: RAS x = -LPS x, RAS y = -LPS y, z unchanged
    ijk = np.array([[0, 0, 0], [10, 20, 5], [73, 71, 37]])
    w_lps = world_of(lps, ijk)
    w_ras = world_of(v_nrrd.affine, ijk)
    assert np.allclose(w_ras, w_lps * [-1, -1, 1], atol=1e-5)
    assert np.allclose(w_ras, world_of(v_nii.affine, ijk), atol=1e-5)
    assert np.allclose(v_nrrd.spacing, [1.0, 1.2, 2.5])


def test_nrrd_in_ras_space_is_not_flipped(bg_crop_1mm, tmp_path):
    import nrrd

    affine = bg_crop_1mm.affine
    header = {"space": "right-anterior-superior", "space directions": affine[:3, :3].T,
              "space origin": affine[:3, 3], "kinds": ["domain"] * 3}
    nrrd.write(str(tmp_path / "ras.nrrd"), bg_crop_1mm.data, header)
    vol = load_volume(tmp_path / "ras.nrrd")
    assert np.allclose(vol.affine, affine)
    assert np.array_equal(vol.data, bg_crop_1mm.data)


def test_nrrd_unsupported_space_is_refused(bg_crop_1mm, tmp_path):
    import nrrd

    header = {"space": "scanner-xyz", "space directions": np.eye(3), "space origin": np.zeros(3)}
    nrrd.write(str(tmp_path / "scan.nrrd"), bg_crop_1mm.data, header)
    with pytest.raises(InputImageError, match="not supported"):
        load_volume(tmp_path / "scan.nrrd")


def test_4d_with_single_volume_is_squeezed(bg_crop_1mm, tmp_path):
    write_nifti(tmp_path / "one.nii.gz", bg_crop_1mm.data[..., None], bg_crop_1mm.affine)
    vol = load_volume(tmp_path / "one.nii.gz")
    assert vol.shape == bg_crop_1mm.shape


# ---------------------------------------------------------------------------------------------
# imageio: bad files, each with a message naming the problem
# ---------------------------------------------------------------------------------------------


def _expect_input_error(path, *words):
    with pytest.raises(InputImageError) as info:
        load_volume(path)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    assert str(path) in message or path.name in message, f"file not named in {message!r}"
    return message


def test_2d_image(tmp_path):
    rng = np.random.default_rng(0)
    path = write_nifti(tmp_path / "flat.nii.gz", rng.random((32, 32)).astype(np.float32), np.eye(4))
    _expect_input_error(path, "2D", "3D")


def test_single_slice_image(tmp_path):
    rng = np.random.default_rng(0)
    path = write_nifti(tmp_path / "slice.nii.gz", rng.random((32, 32, 1)).astype(np.float32), np.eye(4))
    _expect_input_error(path, "single slice")


def test_4d_series(bg_crop_1mm, tmp_path):
    series = np.stack([bg_crop_1mm.data, bg_crop_1mm.data * 2, bg_crop_1mm.data + 1], axis=-1)
    path = write_nifti(tmp_path / "series.nii.gz", series, bg_crop_1mm.affine)
    _expect_input_error(path, "4D", "3 volumes")


def test_4d_nrrd_with_a_list_axis(bg_crop_1mm, tmp_path):
    import nrrd

    series = np.stack([bg_crop_1mm.data, bg_crop_1mm.data + 1.0])  # channel axis first, as Slicer writes
    directions = np.vstack([np.full(3, np.nan), np.diag([-1.0, -1.0, 1.0])])
    header = {"space": "left-posterior-superior", "space directions": directions, "space origin": np.zeros(3),
              "kinds": ["list", "domain", "domain", "domain"]}
    nrrd.write(str(tmp_path / "two.nrrd"), series, header)
    _expect_input_error(tmp_path / "two.nrrd", "4D", "2 volumes")


def test_all_zero(tmp_path):
    path = write_nifti(tmp_path / "zero.nii.gz", np.zeros((8, 9, 10), np.int16), np.eye(4))
    _expect_input_error(path, "empty")


def test_constant(tmp_path):
    path = write_nifti(tmp_path / "const.nii.gz", np.full((8, 9, 10), 7.5, np.float32), np.eye(4))
    msg = _expect_input_error(path, "constant")
    assert "7.5" in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bg_crop_1mm, tmp_path, bad):
    data = bg_crop_1mm.data.copy()
    data[3, 4, 5] = bad
    data[10, 11, 12] = bad
    path = write_nifti(tmp_path / "bad.nii.gz", data, bg_crop_1mm.affine)
    msg = _expect_input_error(path, "NaN or infinite")
    assert "2 voxels" in msg


def test_check_volume_refuses_singular_affine(bg_crop_1mm):
    affine = bg_crop_1mm.affine.copy()
    affine[:3, 2] = 0.0
    with pytest.raises(InputImageError, match="singular"):
        check_volume(Volume(bg_crop_1mm.data, affine))


def test_truncated_nii_gz(mni_t1_path, tmp_path):
    raw = mni_t1_path.read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    _expect_input_error(path, "unreadable")


def test_truncated_uncompressed_nii_message_is_one_line(bg_crop_1mm, tmp_path):
    full = write_nifti(tmp_path / "full.nii", bg_crop_1mm.data, bg_crop_1mm.affine)
    raw = full.read_bytes()
    path = tmp_path / "cut.nii"
    path.write_bytes(raw[: len(raw) // 2])
    msg = _expect_input_error(path, "unreadable")
    assert "\n" not in msg


def test_text_file_named_nii_gz(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not an image\n" * 20)
    _expect_input_error(path, "not a gzip file")


def test_gzipped_text_named_nii_gz(tmp_path):
    path = tmp_path / "notes2.nii.gz"
    path.write_bytes(gzip.compress(b"still not an image\n" * 40))
    _expect_input_error(path, "unreadable")


def test_text_file_named_nrrd(tmp_path):
    path = tmp_path / "notes.nrrd"
    path.write_text("hello\n" * 20)
    _expect_input_error(path, "unreadable NRRD")


def test_missing_file(tmp_path):
    _expect_input_error(tmp_path / "nope.nii.gz", "no such file")


def test_folder_instead_of_file(tmp_path):
    folder = tmp_path / "dir.nii.gz"
    folder.mkdir()
    _expect_input_error(folder, "folder")


@pytest.mark.parametrize("name", ["t1.png", "t1.mha", "t1"])
def test_unsupported_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00" * 64)
    _expect_input_error(path, "unsupported file type")


# ---------------------------------------------------------------------------------------------
# spatial: the canonical grid
# ---------------------------------------------------------------------------------------------


def _is_ras_1mm(grid: Grid, spacing=1.0) -> bool:
    rot = grid.affine[:3, :3]
    return np.allclose(rot, np.diag([spacing] * 3)) and np.allclose(grid.affine[3], [0, 0, 0, 1])


def test_canonical_grid_of_template(mni_t1):
    grid = canonical_grid(mni_t1.shape, mni_t1.affine)
    assert _is_ras_1mm(grid)
    assert grid.shape == (182, 218, 182)
    # first voxel = lowest RAS corner of the input's voxel centres: x = 90 - 181 = -91
    assert np.allclose(grid.affine[:3, 3], [-91, -126, -72])
    # a known world point: the anterior commissure region (0, 0, 0) is canonical voxel (91, 126, 72)
    ijk = np.linalg.inv(grid.affine) @ [0.0, 0.0, 0.0, 1.0]
    assert np.allclose(ijk[:3], [91, 126, 72])


@pytest.mark.parametrize("spacing", [1.0, 2.0])
def test_canonical_grid_covers_oblique_input(spacing):
    affine = _rotation_z(20.0) @ np.diag([0.9, 1.1, 3.0, 1.0])
    affine[:3, 3] = [-40.0, 12.5, 7.0]
    shape = (50, 60, 20)
    grid = canonical_grid(shape, affine, spacing)
    assert _is_ras_1mm(grid, spacing)
    assert np.allclose(grid.spacing, spacing)
    corners = np.array([[a, b, c] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)])
    in_grid = world_of(np.linalg.inv(grid.affine), world_of(affine, corners))
    # starts on the lowest voxel centre; the last canonical voxel centre is within one voxel of
    # the highest input voxel centre (the extent is a whole number of canonical voxels)
    assert (in_grid > -1e-6).all()
    assert np.allclose(in_grid.min(axis=0), 0, atol=1e-6)
    top = in_grid.max(axis=0)
    assert (top >= np.array(grid.shape) - 1 - 1e-6).all() and (top < np.array(grid.shape)).all()


def test_grid_dict_round_trip():
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-91.5, 3.25, 0.125]
    grid = Grid((5, 6, 7), affine)
    back = Grid.from_dict(grid.to_dict())
    assert back.shape == grid.shape and np.allclose(back.affine, grid.affine)


# ---------------------------------------------------------------------------------------------
# spatial: to canonical and back, exact for permutations and flips
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ras_block(bg_crop_1mm, dk_sampler):
    """A real RAS 1 mm block (T1 and DK labels); the canonical grid of any re-indexing of it."""
    perm, flips = (0, 1, 2), (True, False, False)  # LAS -> RAS
    data = reindex(bg_crop_1mm.data, perm, flips)
    affine = bg_crop_1mm.affine @ reindex_affine(bg_crop_1mm.shape, perm, flips)
    labels = dk_sampler(data.shape, affine)
    assert np.allclose(affine[:3, :3], np.eye(3))
    assert len(np.unique(labels)) >= 7
    return data, labels, affine


ORIENTATIONS = {
    "RAS": ((0, 1, 2), (False, False, False)),
    "LPS": ((0, 1, 2), (True, True, False)),
    "LAS": ((0, 1, 2), (True, False, False)),
    "LIA": ((0, 2, 1), (True, True, False)),  # FreeSurfer's conformed orientation
    "SPR": ((2, 1, 0), (False, True, False)),
    "IRP": ((2, 0, 1), (True, False, True)),
}


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_round_trip_is_exact_for_axis_permutations_and_flips(ras_block, name):
    data, labels, affine = ras_block
    perm, flips = ORIENTATIONS[name]
    in_data = reindex(data, perm, flips)
    in_labels = reindex(labels, perm, flips)
    in_affine = affine @ reindex_affine(data.shape, perm, flips)
    vol = Volume(in_data, in_affine)

    canon, grid = to_canonical(vol)
    assert _is_ras_1mm(grid)
    assert grid.shape == data.shape and np.allclose(grid.affine, affine)
    assert np.array_equal(canon, data), "canonical image must be the RAS block, voxel for voxel"
    assert canon.dtype == np.float32

    back = resample_to_grid(labels, grid.affine, Grid(vol.shape, vol.affine), order=0)
    assert back.dtype == labels.dtype
    assert np.array_equal(back, in_labels)


def test_known_world_point_lands_on_the_right_canonical_voxel(ras_block):
    data, _, affine = ras_block
    perm, flips = ORIENTATIONS["LPS"]
    in_data = reindex(data, perm, flips)
    in_affine = affine @ reindex_affine(data.shape, perm, flips)
    canon, grid = to_canonical(Volume(in_data, in_affine))
    rng = np.random.default_rng(1)
    for ijk in rng.integers(0, np.array(in_data.shape), size=(20, 3)):
        world = world_of(in_affine, ijk)[0]
        c = np.linalg.inv(grid.affine) @ np.r_[world, 1.0]
        assert np.allclose(c[:3], np.round(c[:3]))
        c = tuple(int(v) for v in np.round(c[:3]))
        assert canon[c] == in_data[tuple(ijk)]
        # canonical axes point R, A, S
        assert np.allclose(world_of(grid.affine, [c[0] + 1, c[1], c[2]])[0] - world, [1, 0, 0])


def test_lps_nrrd_file_round_trip(ras_block, tmp_path):
    """Through a real LPS NRRD file: the canonical image equals the RAS block."""
    data, labels, affine = ras_block
    perm, flips = ORIENTATIONS["LPS"]
    in_data = reindex(data, perm, flips)
    in_affine = affine @ reindex_affine(data.shape, perm, flips)
    write_nrrd_lps(tmp_path / "lps.nrrd", in_data, in_affine)
    vol = load_volume(tmp_path / "lps.nrrd")
    canon, grid = to_canonical(vol)
    assert np.array_equal(canon, data)
    back = resample_to_grid(labels, grid.affine, Grid(vol.shape, vol.affine), order=0)
    assert np.array_equal(back, reindex(labels, perm, flips))


# ---------------------------------------------------------------------------------------------
# spatial: oblique and anisotropic inputs (interpolated, close)
# ---------------------------------------------------------------------------------------------


def _rotation_z(deg):
    r = np.eye(4)
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    r[:2, :2] = [[c, -s], [s, c]]
    return r


def _rotation_x(deg):
    r = np.eye(4)
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    r[1:3, 1:3] = [[c, -s], [s, c]]
    return r


CENTRE = np.array([-22.0, 2.0, 3.0])  # left putamen region, mm


def _sphere_on_grid(shape, affine, centre=CENTRE, radius=9.0):
    ijk = np.indices(shape).reshape(3, -1).T
    world = world_of(affine, ijk)
    return (np.linalg.norm(world - centre, axis=1) <= radius).reshape(shape)


def _input_grid(kind):
    """An input grid (shape, RAS affine) around the basal ganglia: oblique or 1x1x3 mm."""
    if kind == "oblique":
        rot = _rotation_z(20.0) @ _rotation_x(-12.0)
        spacing = np.diag([1.0, 1.0, 1.0, 1.0])
        shape = (60, 56, 44)
    else:
        rot = np.eye(4)
        spacing = np.diag([1.0, 1.0, 3.0, 1.0])
        shape = (70, 64, 16)
    affine = rot @ spacing
    # centre the grid on CENTRE + (20, 0, 0) so both putamina fit
    centre_vox = (np.array(shape) - 1) / 2.0
    affine[:3, 3] = CENTRE + [20.0, 0.0, 0.0] - affine[:3, :3] @ centre_vox
    return shape, affine


@pytest.mark.parametrize("kind", ["oblique", "anisotropic"])
def test_round_trip_of_labels_oblique_and_anisotropic(mni_t1, kind):
    shape, affine = _input_grid(kind)
    t1 = sample_linear(mni_t1.data, mni_t1.affine, shape, affine)
    sphere = _sphere_on_grid(shape, affine)
    assert sphere.sum() > 200
    labels = np.where(sphere, 12, 0).astype(np.int16)

    canon_t1, grid = to_canonical(Volume(t1, affine))
    assert _is_ras_1mm(grid)
    # canonical labels by nearest neighbour, then back to the input grid
    canon_labels = resample_to_grid(labels, affine, grid, order=0)
    assert canon_labels.dtype == np.int16 and set(np.unique(canon_labels)) <= {0, 12}
    back = resample_to_grid(canon_labels, grid.affine, Grid(shape, affine), order=0)
    assert back.shape == shape
    assert dice(back == 12, sphere) > 0.9

    # the canonical labels sit where the sphere is in the world (not merely self-consistent)
    idx = np.argwhere(canon_labels == 12)
    centroid = world_of(grid.affine, idx).mean(axis=0)
    assert np.linalg.norm(centroid - CENTRE) < 1.0
    assert dice(canon_labels == 12, _sphere_on_grid(grid.shape, grid.affine)) > 0.85

    # and the canonical T1 matches the template sampled at the canonical voxel centres
    expected = sample_linear(mni_t1.data, mni_t1.affine, grid.shape, grid.affine)
    inside = (canon_t1 > 0) & (expected > 0)
    inside &= np.pad(np.ones(np.array(grid.shape) - 8, bool), 4)
    r = np.corrcoef(canon_t1[inside], expected[inside])[0, 1]
    assert r > 0.9, f"canonical T1 does not match the template where it should (r={r:.3f})"


def test_round_trip_anisotropic_labels_on_input_voxel_centres_are_exact(mni_t1):
    """1x1x3 mm input: its voxel centres are canonical voxel centres, so nearest neighbour is exact."""
    shape, affine = _input_grid("anisotropic")
    sphere = _sphere_on_grid(shape, affine)
    grid = canonical_grid(shape, affine)
    assert grid.shape[2] == (shape[2] - 1) * 3 + 1
    canon = resample_to_grid(sphere.astype(np.uint8), affine, grid, order=0)
    back = resample_to_grid(canon, grid.affine, Grid(shape, affine), order=0)
    assert np.array_equal(back.astype(bool), sphere)


def test_resample_linear_returns_float32_and_cval(bg_crop_1mm):
    data = bg_crop_1mm.data.astype(np.int16)
    shifted = bg_crop_1mm.affine.copy()
    shifted[:3, 3] += [500.0, 0, 0]  # entirely outside the source
    out = resample_to_grid(data, bg_crop_1mm.affine, Grid(data.shape, shifted), order=1, cval=-3.0)
    assert out.dtype == np.float32 and np.all(out == -3.0)


# ---------------------------------------------------------------------------------------------
# spatial: small helpers
# ---------------------------------------------------------------------------------------------


def test_bounding_box():
    mask = np.zeros((20, 30, 40), bool)
    mask[5:8, 10:12, 0:3] = True
    assert bounding_box(mask) == (slice(5, 8), slice(10, 12), slice(0, 3))
    assert bounding_box(mask, 2) == (slice(3, 10), slice(8, 14), slice(0, 5))
    assert bounding_box(mask, (0, 100, 1)) == (slice(5, 8), slice(0, 30), slice(0, 4))
    assert bounding_box(np.zeros((3, 3, 3), bool)) is None


def test_crop_slices_stays_inside():
    assert crop_slices(np.array([2, 50, 98]), (10, 10, 10), (100, 100, 100)) == (
        slice(0, 10), slice(45, 55), slice(90, 100))
    assert crop_slices(np.array([5]), (20,), (8,)) == (slice(0, 8),)
