"""Prompts <-> Markups against real MRML: exact round trips, RAS placement (the editor: test_slicer_prompteditor.py)."""

from __future__ import annotations

import numpy as np
import pytest

from test_slicer_helpers import (  # noqa: F401
    add_volume, blob_volume, mrml_scene, oblique_affine, rotation, scene_node_ids, world,
)

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from BasalSegSAMLib import mrmlbridge, promptmarkups as pm  # noqa: E402
from basalseg.errors import PromptsError  # noqa: E402
from basalseg.prompts import Prompt, PromptSet  # noqa: E402
from basalseg.spatial import Grid, canonical_grid, to_canonical  # noqa: E402
from basalseg.structures import STRUCTURES  # noqa: E402


def _canonical_grid() -> Grid:
    return canonical_grid((40, 36, 20), oblique_affine())


def _rotated_grid() -> Grid:
    """Not a canonical grid (those are axis aligned), but the conversion goes through any affine."""
    affine = np.eye(4)
    affine[:3, :3] = rotation("z", 23.0) @ rotation("y", -9.0) @ np.diag([0.8, 1.1, 1.7])
    affine[:3, 3] = [-12.5, 40.0, 3.25]
    return Grid((50, 45, 30), affine)


def _prompt_set(grid: Grid, seed: int = 0) -> PromptSet:
    rng = np.random.default_rng(seed)
    nx, ny, nz = grid.shape
    prompts = []
    for s in STRUCTURES:
        for k in rng.choice(nz, size=3, replace=False):
            x0, y0 = rng.uniform(0, nx / 2), rng.uniform(0, ny / 2)
            box = [round(x0, 3), round(y0, 3), round(x0 + rng.uniform(0, nx / 2 - 1), 3), round(y0 + rng.uniform(0, ny / 2 - 1), 3)]
            n = int(rng.integers(0, 5))
            points = [[round(rng.uniform(box[0], box[2]), 3), round(rng.uniform(box[1], box[3]), 3)] for _ in range(n)]
            labels = [int(v) for v in rng.integers(0, 2, size=n)]
            prompts.append(Prompt(s.key, int(k), box, points, labels))
    return PromptSet(grid=grid, prompts=prompts).validate()


def _canon(ps: PromptSet) -> list:
    """Prompts as sorted dicts; points sorted per prompt (a point list does not keep prompt order)."""
    out = []
    for p in sorted(ps.prompts, key=lambda p: (p.structure, p.slice)):
        d = p.to_dict()
        pairs = sorted(zip(map(tuple, d["points"]), d["point_labels"]))
        d["points"], d["point_labels"] = [list(a) for a, _ in pairs], [b for _, b in pairs]
        out.append(d)
    return out


def _assert_same(a: PromptSet, b: PromptSet, tol: float = 1e-3) -> None:
    ca, cb = _canon(a), _canon(b)
    assert [(d["structure"], d["slice"]) for d in ca] == [(d["structure"], d["slice"]) for d in cb]
    for da, db in zip(ca, cb):
        assert np.allclose(da["box"], db["box"], atol=tol), (da, db)
        assert np.allclose(np.reshape(da["points"], (-1, 2)), np.reshape(db["points"], (-1, 2)), atol=tol)
        assert da["point_labels"] == db["point_labels"]


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [_canonical_grid(), _rotated_grid()], ids=["canonical", "rotated"])
def test_box_roi_geometry_round_trip_is_exact(grid):
    rng = np.random.default_rng(2)
    for _ in range(50):
        x0, y0 = rng.uniform(0, 20, size=2)
        box = [x0, y0, x0 + rng.uniform(0, 15), y0 + rng.uniform(0, 15)]
        k = int(rng.integers(0, grid.shape[2]))
        center, size, directions = pm.roiGeometryFromBox(box, k, grid.affine)
        back, kf = pm.boxFromRoiGeometry(center, size, grid.affine)
        assert np.allclose(back, box, atol=1e-9) and kf == pytest.approx(k, abs=1e-9)
        assert np.allclose(directions.T @ directions, np.eye(3), atol=1e-12)
        x, y, kk = pm.pixelFromRas(pm.rasFromPixel(box[0], box[1], k, grid.affine), grid.affine)
        assert np.allclose([x, y, kk], [box[0], box[1], k], atol=1e-9)


def test_roi_covers_the_box_pixels_edge_to_edge(mrml_scene):
    grid = Grid((30, 30, 10), np.diag([1.0, 1.0, 1.0, 1.0]))
    roi = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    pm.setRoiFromBox(roi, [3, 5, 7, 6], 4, grid)
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    assert np.allclose(bounds, [2.5, 7.5, 4.5, 6.5, 3.5, 4.5])
    box, kf = pm.boxFromRoi(roi, grid)
    assert np.allclose(box, [3, 5, 7, 6]) and kf == pytest.approx(4)
    roi.SetSize(0.2, 0.2, 1.0)  # thinner than a pixel: a point box at the centre
    box, _ = pm.boxFromRoi(roi, grid)
    assert box[0] == box[2] == pytest.approx(5.0) and box[1] == box[3] == pytest.approx(5.5)
    roi.SetCenter(-40.0, 5.0, 4.0)  # dragged off the image: clipped
    box, _ = pm.boxFromRoi(roi, grid)
    assert box[0] == 0.0 and box[2] == 0.0


# ---------------------------------------------------------------------------------------------
# whole prompt sets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [_canonical_grid(), _rotated_grid()], ids=["canonical", "rotated"])
def test_prompt_set_markups_round_trip_within_1e3_voxel(mrml_scene, grid):
    prompts = _prompt_set(grid)
    assert any(0 in p.point_labels for p in prompts.prompts) and any(1 in p.point_labels for p in prompts.prompts)
    nodes = pm.promptsToMarkups(prompts, mrml_scene)
    assert len(nodes.boxes) == len(prompts.prompts)
    roi = nodes.boxes[(prompts.prompts[0].structure, prompts.prompts[0].slice)]
    assert roi.GetClassName() == "vtkMRMLMarkupsROINode"
    assert np.allclose(roi.GetDisplayNode().GetSelectedColor(), prompts.prompts[0].struct.color_float)
    points = next(iter(nodes.points.values()))
    assert points.GetClassName() == "vtkMRMLMarkupsFiducialNode"
    assert {points.GetNthControlPointDescription(n) for n in range(points.GetNumberOfControlPoints())} <= {"positive", "negative"}

    back = pm.promptsFromMarkups(nodes, grid)
    _assert_same(prompts, back)
    # through the prompts.json text kept in the parameter node, too
    _assert_same(prompts, pm.promptSetFromJson(pm.promptSetToJson(back)))

    before = mrml_scene.GetNumberOfNodes()
    nodes.remove()
    assert mrml_scene.GetNumberOfNodes() < before and not nodes.boxes


def test_points_without_a_box_get_one_and_unlabelled_points_are_positive(mrml_scene):
    grid = _canonical_grid()
    points = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.SetAttribute(pm.ROLE_ATTRIBUTE, "promptPoints")
    points.SetAttribute(pm.STRUCTURE_ATTRIBUTE, "right_caudate")
    points.AddControlPoint(vtk.vtkVector3d(*pm.rasFromPixel(20.0, 15.0, 6, grid.affine)), "")
    ps = pm.promptsFromMarkups([points], grid)
    assert len(ps.prompts) == 1
    p = ps.prompts[0]
    assert p.structure == "right_caudate" and p.slice == 6 and p.point_labels == [1]
    assert p.box == [15.0, 10.0, 25.0, 20.0]


def test_generated_boxes_and_points_land_on_the_structure_in_ras(mrml_scene):
    """Prompts extracted on the canonical grid of an oblique volume become ROIs around the ball
    where Slicer shows it, and points inside it."""
    from basalseg.prompts import prompts_from_classes

    center, radius = (20, 18, 9), 5.0
    node = add_volume(blob_volume(centers=(center,), radius_mm=radius), oblique_affine())
    canonical, grid = to_canonical(mrmlbridge.volumeFromNode(node))
    classes = np.where(canonical > 550, 3, 0).astype(np.uint8)  # class 3 = left putamen
    prompts = prompts_from_classes(classes, grid)
    ball = world(oblique_affine(), center)[0]
    nodes = pm.promptsToMarkups(prompts, mrml_scene)
    mid = min(prompts.prompts, key=lambda p: abs(world(grid.affine, [0, 0, p.slice])[0][2] - ball[2]))
    roi = nodes.boxes[("left_putamen", mid.slice)]
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    assert bounds[0] < ball[0] < bounds[1] and bounds[2] < ball[1] < bounds[3]
    assert abs(roi.GetCenter()[2] - ball[2]) <= 0.5 + 1e-6
    width = bounds[1] - bounds[0]
    assert 2 * radius - 1 <= width <= 2 * radius + 2 * 2 + 1.5  # ball diameter, 2-pixel margins each side
    pts = slicer.util.arrayFromMarkupsControlPoints(nodes.points["left_putamen"])
    assert len(pts) == 5 * len(prompts.prompts)
    assert np.all(np.linalg.norm(pts - ball, axis=1) <= radius + 1.0)


def test_malformed_prompt_json_is_refused_with_its_cause():
    with pytest.raises(PromptsError, match="not valid JSON"):
        pm.promptSetFromJson("{oops")
    with pytest.raises(PromptsError, match="format"):
        pm.promptSetFromJson('{"format": "something-else"}')
    assert pm.promptSetFromJson("  ") is None


# ---------------------------------------------------------------------------------------------
# the per-slice editor
# ---------------------------------------------------------------------------------------------


def test_the_slice_plane_of_a_sheared_grid_is_the_plane_of_its_slices():
    """A localised image's prompt grid is affine since 2026-12-07 (scaled and sheared to the head's
    brain): its slices' normal is perpendicular to their x and y axes, not the k axis itself, so
    the view set to it shows the prompt slices; an orthogonal grid's normal is its k axis."""
    sheared = np.eye(4)
    sheared[:3, :3] = [[1.05, 0.0, 0.08], [0.0, 0.97, -0.06], [0.0, 0.0, 1.1]]  # k axis leans 5 deg
    normal, transverse = pm.slicePlaneOfGrid(sheared)
    assert abs(float(normal @ sheared[:3, 0])) < 1e-12 and abs(float(normal @ sheared[:3, 1])) < 1e-12
    assert float(normal @ sheared[:3, 2]) > 0 and np.allclose(transverse, [1.0, 0.0, 0.0])
    slice_to_ras = np.eye(4)
    slice_to_ras[:3, 2] = normal
    assert pm.viewShowsGridSlices(slice_to_ras, sheared)
    flipped = np.diag([1.0, 1.0, -1.0, 1.0]) @ sheared  # an orthogonal-in-plane grid: the k axis, sign kept
    assert float(pm.slicePlaneOfGrid(flipped)[0] @ flipped[:3, 2]) > 0
    grid = _canonical_grid()
    k_axis = np.asarray(grid.affine)[:3, 2]
    assert np.allclose(pm.slicePlaneOfGrid(grid.affine)[0], k_axis / np.linalg.norm(k_axis))
