"""Per-slice prompts: extraction from masks and labelmaps, prompts.json reading/writing/validation."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from basalseg.errors import PromptsError, UnknownStructureError
from basalseg.prompts import (
    PROMPTS_FORMAT,
    Prompt,
    PromptSet,
    load_prompts,
    prompt_from_mask,
    prompts_from_classes,
    prompts_from_dict,
    save_prompts,
)
from basalseg.spatial import Grid, canonical_grid
from basalseg.structures import STRUCTURES, get_structure, labels_to_classes


def _grid(shape=(40, 30, 12), origin=(-20.0, -15.0, -6.0)) -> Grid:
    affine = np.eye(4)
    affine[:3, 3] = origin
    return Grid(shape, affine)


def _depth(mask2d):
    """Distance of each pixel to the background, treating outside the image as background."""
    return ndimage.distance_transform_edt(np.pad(mask2d, 1))[1:-1, 1:-1]


# ---------------------------------------------------------------------------------------------
# prompt_from_mask
# ---------------------------------------------------------------------------------------------


def test_rectangle_box_points_and_labels():
    mask = np.zeros((40, 30), bool)  # [x, y]
    mask[10:21, 5:13] = True  # x 10..20, y 5..12
    p = prompt_from_mask(mask, "left_putamen", 7)
    assert p.structure == "left_putamen" and p.slice == 7
    assert p.box == [8.0, 3.0, 22.0, 14.0]
    assert len(p.points) == 5 and p.point_labels == [1] * 5
    for x, y in p.points:
        assert float(x).is_integer() and float(y).is_integer()
        assert mask[int(x), int(y)], f"point {(x, y)} outside the mask"
    # first point: the deepest pixel, ties to the lowest index
    depth = _depth(mask)
    deepest = np.argwhere(depth == depth.max())
    assert depth[int(p.points[0][0]), int(p.points[0][1])] == depth.max()
    assert tuple(p.points[0]) == tuple(float(v) for v in deepest[0])
    # big mask: all points at least 2 px inside and spread out (distinct)
    assert all(depth[int(x), int(y)] >= 2 for x, y in p.points)
    assert len({tuple(pt) for pt in p.points}) == 5


def test_disk_first_point_is_centre_and_points_spread():
    xx, yy = np.mgrid[:64, :48]
    mask = (xx - 30) ** 2 + (yy - 20) ** 2 <= 12**2
    p = prompt_from_mask(mask, "right_thalamus", 3, box_margin=0)
    assert p.box == [18.0, 8.0, 42.0, 32.0]
    assert p.points[0] == [30.0, 20.0]
    pts = np.array(p.points)
    assert all(mask[int(x), int(y)] for x, y in pts)
    # farthest-point sampling: the later points are far from the centre and from each other
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    assert d[np.triu_indices(5, 1)].min() >= 8.0


def test_box_margin_is_clipped_at_the_edges():
    mask = np.zeros((16, 12), bool)
    mask[0:4, 9:12] = True  # touches x=0 and y=ny-1
    p = prompt_from_mask(mask, "left_caudate", 0, box_margin=3)
    assert p.box == [0.0, 6.0, 6.0, 11.0]
    mask = np.zeros((16, 12), bool)
    mask[14:16, 0:2] = True
    p = prompt_from_mask(mask, "left_caudate", 0, box_margin=5)
    assert p.box == [9.0, 0.0, 15.0, 6.0]


def test_tiny_mask_repeats_points_inside():
    mask = np.zeros((10, 10), bool)
    mask[4, 4] = mask[4, 5] = True
    p = prompt_from_mask(mask, "left_pallidum", 1)
    assert len(p.points) == 5 and all(mask[int(x), int(y)] for x, y in p.points)
    assert p.box == [2.0, 2.0, 6.0, 7.0]


def test_empty_mask_raises():
    with pytest.raises(ValueError, match="empty"):
        prompt_from_mask(np.zeros((5, 5), bool), "left_putamen", 0)


def test_deterministic():
    rng = np.random.default_rng(3)
    mask = ndimage.binary_opening(rng.random((50, 40)) > 0.35, iterations=2)
    a = prompt_from_mask(mask, "left_putamen", 2)
    b = prompt_from_mask(mask.copy(), "left_putamen", 2)
    assert a == b


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x0=st.integers(0, 30), y0=st.integers(0, 20), w=st.integers(1, 15), h=st.integers(1, 15),
    margin=st.integers(0, 4), n_points=st.integers(1, 7),
)
def test_box_is_tight_plus_margin_and_points_inside(x0, y0, w, h, margin, n_points):
    nx, ny = 36, 28
    mask = np.zeros((nx, ny), bool)
    xx, yy = np.mgrid[:nx, :ny]
    # an ellipse inside the rectangle (never empty: the centre pixel is set)
    cx, cy = x0 + (w - 1) / 2, y0 + (h - 1) / 2
    mask |= ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1.0
    mask[min(int(cx), nx - 1), min(int(cy), ny - 1)] = True
    xs, ys = np.nonzero(mask)
    p = prompt_from_mask(mask, "right_caudate", 4, n_points=n_points, box_margin=margin)
    assert p.box == [max(xs.min() - margin, 0), max(ys.min() - margin, 0),
                     min(xs.max() + margin, nx - 1), min(ys.max() + margin, ny - 1)]
    assert len(p.points) == n_points and p.point_labels == [1] * n_points
    assert all(mask[int(x), int(y)] for x, y in p.points)
    depth = _depth(mask)
    assert depth[int(p.points[0][0]), int(p.points[0][1])] == depth.max()


# ---------------------------------------------------------------------------------------------
# prompts_from_classes
# ---------------------------------------------------------------------------------------------


def test_prompts_cover_exactly_the_slices_with_enough_pixels():
    grid = _grid()
    classes = np.zeros(grid.shape, np.uint8)
    putamen = get_structure("left_putamen").class_index
    thalamus = get_structure("right_thalamus").class_index
    classes[5:10, 5:10, 2] = putamen  # 25 px
    classes[5:7, 5:7, 3] = putamen  # 4 px: exactly min_pixels
    classes[5:8, 5, 4] = putamen  # 3 px: too few
    classes[20:30, 10:20, 3:8] = thalamus
    classes[0, 0, 9] = thalamus  # 1 px stray
    ps = prompts_from_classes(classes, grid, min_pixels=4)
    got = {(p.structure, p.slice) for p in ps.prompts}
    expected = set()
    for s in STRUCTURES:
        counts = (classes == s.class_index).sum(axis=(0, 1))
        expected |= {(s.key, int(k)) for k in np.nonzero(counts >= 4)[0]}
    assert got == expected
    assert got == {("left_putamen", 2), ("left_putamen", 3)} | {("right_thalamus", k) for k in range(3, 8)}
    assert ps.slices() == [2, 3, 4, 5, 6, 7]
    assert ps.structures_found() == ["left_putamen", "right_thalamus"]
    assert [p.structure for p in ps.on_slice(3)] == ["left_putamen", "right_thalamus"]
    # each prompt's box holds its slice's mask
    for p in ps.prompts:
        mask = classes[:, :, p.slice] == p.struct.class_index
        xs, ys = np.nonzero(mask)
        assert p.box[0] <= xs.min() and p.box[2] >= xs.max() and p.box[1] <= ys.min() and p.box[3] >= ys.max()
    assert ps.validate() is ps


def test_prompts_from_classes_shape_mismatch():
    with pytest.raises(ValueError, match="does not match"):
        prompts_from_classes(np.zeros((4, 4, 4), np.uint8), _grid())


def test_prompts_from_dk_labels_on_template(dk_labels_on_template, mni_t1):
    """On the real DK labels, every structure is prompted on the axial slices it occupies."""
    grid = canonical_grid(mni_t1.shape, mni_t1.affine)
    classes = labels_to_classes(dk_labels_on_template[::-1])  # LAS -> RAS: flip i
    ps = prompts_from_classes(classes, grid)
    assert ps.structures_found() == [s.key for s in STRUCTURES]
    for s in STRUCTURES:
        counts = (classes == s.class_index).sum(axis=(0, 1))
        assert [p.slice for p in ps.for_structure(s.key)] == [int(k) for k in np.nonzero(counts >= 4)[0]]
    # left structures at x < 0 (patient's left), right ones at x > 0
    for p in ps.prompts:
        x_mid = grid.affine[0, 3] + (p.box[0] + p.box[2]) / 2
        assert (x_mid < 0) == (p.struct.hemisphere == "left")


# ---------------------------------------------------------------------------------------------
# prompts.json
# ---------------------------------------------------------------------------------------------


def _prompt_set() -> PromptSet:
    grid = _grid()
    return PromptSet(grid, [
        Prompt("left_putamen", 2, [3.0, 4.0, 10.0, 12.0], [[5.0, 6.0], [7.5, 8.25]], [1, 0]),
        Prompt("right_thalamus", 2, [20.0, 5.0, 30.0, 20.0], [[25.0, 10.0]], [1]),
        Prompt("right_thalamus", 5, [21.0, 6.0, 29.0, 19.0]),
    ], source={"generator": "test"})


def _valid_dict() -> dict:
    return _prompt_set().to_dict()


def test_json_round_trip(tmp_path):
    ps = _prompt_set()
    path = tmp_path / "prompts.json"
    save_prompts(ps, path)
    data = json.loads(path.read_text())
    assert data["format"] == PROMPTS_FORMAT and data["version"] == 1
    assert "axis_convention" in data and data["grid"]["shape"] == [40, 30, 12]
    back = load_prompts(path)
    assert back.to_dict() == ps.to_dict()
    assert back.grid.shape == ps.grid.shape and np.allclose(back.grid.affine, ps.grid.affine)
    assert back.source == {"generator": "test"}
    # no temporary files left next to it
    assert [f.name for f in tmp_path.iterdir()] == ["prompts.json"]


def test_round_trip_of_generated_prompts(tmp_path):
    grid = _grid()
    classes = np.zeros(grid.shape, np.uint8)
    classes[4:15, 3:12, 1:9] = get_structure("left_caudate").class_index
    classes[22:33, 8:25, 2:6] = get_structure("right_pallidum").class_index
    ps = prompts_from_classes(classes, grid)
    save_prompts(ps, tmp_path / "p.json")
    assert load_prompts(tmp_path / "p.json").to_dict() == ps.to_dict()


def test_point_labels_default_to_positive():
    d = _valid_dict()
    del d["prompts"][0]["point_labels"]
    ps = prompts_from_dict(d)
    p = next(p for p in ps.prompts if p.structure == "left_putamen")
    assert p.point_labels == [1, 1]


def test_structure_aliases_are_normalised():
    d = _valid_dict()
    d["prompts"][0]["structure"] = "Left-Putamen"
    ps = prompts_from_dict(d)
    assert ps.prompts[0].structure == "left_putamen"


def _bad(mutate):
    d = _valid_dict()
    mutate(d)
    return d


BAD_CASES = {
    "wrong format": (lambda d: d.update(format="something-else"), "not a BasalSegSAM prompts file"),
    "no format": (lambda d: d.pop("format"), "not a BasalSegSAM prompts file"),
    "wrong version": (lambda d: d.update(version=7), "version 7"),
    "unknown structure": (lambda d: d["prompts"][0].update(structure="left_amygdala"), "unknown structure 'left_amygdala'"),
    "slice too high": (lambda d: d["prompts"][0].update(slice=12), "outside the image"),
    "negative slice": (lambda d: d["prompts"][0].update(slice=-1), "outside the image"),
    "fractional slice": (lambda d: d["prompts"][0].update(slice=2.5), "must be an integer"),
    "box outside": (lambda d: d["prompts"][0].update(box=[3, 4, 40, 12]), "lies outside the image"),
    "box negative": (lambda d: d["prompts"][0].update(box=[-1, 4, 10, 12]), "lies outside the image"),
    "x0 > x1": (lambda d: d["prompts"][0].update(box=[10, 4, 3, 12]), "x0 > x1"),
    "y0 > y1": (lambda d: d["prompts"][0].update(box=[3, 12, 10, 4]), "y0 > y1"),
    "box with NaN": (lambda d: d["prompts"][0].update(box=[float("nan"), 4, 10, 12]), "4 finite numbers"),
    "box of 3": (lambda d: d["prompts"][0].update(box=[3, 4, 10]), "4 finite numbers"),
    "box of text": (lambda d: d["prompts"][0].update(box=["a", 4, 10, 12]), "malformed"),
    "point label 2": (lambda d: d["prompts"][0].update(point_labels=[1, 2]), "must be 1 (positive) or 0 (negative)"),
    "point label -1": (lambda d: d["prompts"][0].update(point_labels=[-1, 1]), "must be 1 (positive) or 0 (negative)"),
    "label count": (lambda d: d["prompts"][0].update(point_labels=[1]), "2 points but 1 point_labels"),
    "point outside": (lambda d: d["prompts"][0].update(points=[[5, 6], [50, 8]]), "lies outside the image"),
    "point of 3": (lambda d: d["prompts"][0].update(points=[[5, 6, 1], [7, 8]]), "must be [x, y]"),
    "duplicate": (lambda d: d["prompts"].append(copy.deepcopy(d["prompts"][0])), "second prompt for the same structure and slice"),
    "missing box": (lambda d: d["prompts"][0].pop("box"), "missing field 'box'"),
    "missing grid": (lambda d: d.pop("grid"), "missing field 'grid'"),
    "prompt not object": (lambda d: d["prompts"].append([1, 2]), "not an object"),
    "bad grid": (lambda d: d["grid"].update(shape=[40, 30]), "grid"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_invalid_prompts_raise_prompts_error(tmp_path, case):
    mutate, words = BAD_CASES[case]
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(_bad(mutate)))
    with pytest.raises(PromptsError) as info:
        load_prompts(path)
    message = str(info.value)
    assert words in message, message
    assert str(path) in message, "the file is named"
    assert "\n" not in message


def test_unknown_structure_is_its_own_error_type():
    with pytest.raises(UnknownStructureError):
        prompts_from_dict(_bad(lambda d: d["prompts"][0].update(structure="hippocampus")))


def test_malformed_json(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('{"format": "basalseg-prompts", "version": 1, "prompts": [')
    with pytest.raises(PromptsError, match="not valid JSON"):
        load_prompts(path)


def test_top_level_not_object(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(PromptsError, match="JSON object"):
        load_prompts(path)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(PromptsError, match="cannot read prompts"):
        load_prompts(tmp_path / "none.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(PromptsError):
        load_prompts(tmp_path / "bin.json")


def test_validate_in_memory_prompt_set():
    ps = _prompt_set()
    ps.prompts.append(Prompt("left_putamen", 1, [5.0, 5.0, 4.0, 9.0]))
    with pytest.raises(PromptsError, match="x0 > x1"):
        ps.validate()


def test_check_grid_refuses_prompts_for_another_grid():
    ps = _prompt_set()
    ps.check_grid(_grid())  # same grid: fine
    ps.check_grid(Grid(ps.grid.shape, ps.grid.affine + 1e-5))  # rounding noise: fine
    with pytest.raises(PromptsError, match="another image"):
        ps.check_grid(_grid(shape=(40, 30, 13)))
    with pytest.raises(PromptsError, match="another image"):
        ps.check_grid(_grid(origin=(-20.0, -15.0, -5.0)))  # same shape, shifted by 1 mm


def test_check_grid_after_json_round_trip_of_a_real_grid(tmp_path, mni_t1):
    """A real canonical grid survives JSON (affine rounded to 1e-6) and still matches."""
    grid = canonical_grid((37, 36, 19), mni_t1.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
    ps = PromptSet(grid, [Prompt("left_putamen", 3, [1.0, 2.0, 5.0, 6.0])])
    save_prompts(ps, tmp_path / "p.json")
    load_prompts(tmp_path / "p.json").check_grid(grid)
