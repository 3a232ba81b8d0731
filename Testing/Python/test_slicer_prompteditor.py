"""The per-slice prompt editor against real MRML (slicer-core): what a user's edits do."""

from __future__ import annotations

import numpy as np
import pytest

from test_slicer_helpers import mrml_scene, oblique_affine, scene_node_ids  # noqa: F401

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from BasalSegSAMLib import promptmarkups as pm  # noqa: E402
from BasalSegSAMLib.prompteditor import NEGATIVE_COLOR, PromptHistory, PromptMarkupsEditor  # noqa: E402
from basalseg.prompts import Prompt, PromptSet  # noqa: E402
from basalseg.spatial import canonical_grid  # noqa: E402


def _prompts() -> PromptSet:
    grid = canonical_grid((40, 36, 20), oblique_affine())
    return PromptSet(grid=grid, prompts=[
        Prompt("left_putamen", 5, [10, 12, 18, 20], [[14, 16], [11, 13]], [1, 0]),
        Prompt("left_putamen", 7, [11, 12, 19, 21], [[15, 16]], [1]),
        Prompt("right_thalamus", 5, [22, 10, 30, 17], [], []),
        Prompt("left_caudate", 9, [5, 5, 9, 9], [], []),
    ]).validate()


def _prompt(ps, key, k):
    return next((p for p in ps.prompts if p.structure == key and p.slice == k), None)


def test_editor_shows_one_slice_and_reads_edits_back(mrml_scene):
    ps = _prompts()
    start_ids = scene_node_ids(mrml_scene)
    editor = PromptMarkupsEditor(ps, mrml_scene)
    editor.showSlice(5)
    put, thal = editor.boxNode("left_putamen"), editor.boxNode("right_thalamus")
    assert put.GetDisplayNode().GetVisibility() and thal.GetDisplayNode().GetVisibility()
    assert editor.boxNode("left_caudate", create=False) is None  # never needed yet
    assert np.allclose(pm.boxFromRoi(put, ps.grid)[0], [10, 12, 18, 20])
    positive, negative = editor.pointsNode("left_putamen", True), editor.pointsNode("left_putamen", False)
    assert positive.GetNumberOfControlPoints() == 1 and negative.GetNumberOfControlPoints() == 1
    assert not editor.syncFromMarkups()  # nothing edited
    assert editor.editedCount() == 0

    # the user drags the putamen box 3 mm to the right (R = +x = +i here) and 0.8 mm up
    c = list(put.GetCenter())
    put.SetCenter(c[0] + 3.0, c[1], c[2] + 0.8)
    report = editor.syncFromMarkups()
    assert report and report.changed == [("left_putamen", 5)] and report.moved == []
    moved = _prompt(ps, "left_putamen", 5)
    assert np.allclose(moved.box, [13, 12, 21, 20]) and moved.points == [[14, 16], [11, 13]]
    assert put.GetCenter()[2] == pytest.approx(c[2])  # snapped back onto its slice
    assert editor.isEdited(moved) and not editor.isEdited(_prompt(ps, "right_thalamus", 5))
    assert editor.editedCount() == 1

    # a point placed (no sign of its own) in the thalamus's negative list is negative
    editor.pointsNode("right_thalamus", False).AddControlPoint(vtk.vtkVector3d(*pm.rasFromPixel(25, 12, 5, ps.grid.affine)), "")
    editor.syncFromMarkups()
    thalamus = _prompt(ps, "right_thalamus", 5)
    assert thalamus.points == [[25.0, 12.0]] and thalamus.point_labels == [0]
    assert editor.pointsNode("right_thalamus", False).GetNthControlPointLabel(0) == "-"  # labelled by its sign

    # slice 7 shows the other putamen prompt; the thalamus box hides
    editor.showSlice(7)
    assert not thal.GetDisplayNode().GetVisibility()
    assert np.allclose(pm.boxFromRoi(put, ps.grid)[0], [11, 12, 19, 21])
    assert editor.pointsNode("right_thalamus", False).GetNumberOfControlPoints() == 0

    added = editor.addBox("left_caudate")  # copied from the nearest slice of that structure
    assert added.slice == 7 and added.box == [5, 5, 9, 9]
    assert editor.deleteBox("left_putamen") is True and not put.GetDisplayNode().GetVisibility()
    report = editor.addPoint("right_putamen", pm.rasFromPixel(30, 25, 7, ps.grid.affine), positive=True)
    auto = _prompt(ps, "right_putamen", 7)
    assert auto.box == [25.0, 20.0, 35.0, 30.0] and auto.point_labels == [1] and report.changed

    pm.removeWithDisplayNodes(editor.boxNode("left_caudate"))  # as the Data module deletes it
    editor.syncFromMarkups()
    assert _prompt(ps, "left_caudate", 7) is None
    ps.validate()
    editor.removeNodes()
    assert scene_node_ids(mrml_scene) == start_ids


def test_only_the_chosen_structure_is_editable_and_negative_points_stand_out(mrml_scene):
    ps = _prompts()
    editor = PromptMarkupsEditor(ps, mrml_scene)
    editor.showSlice(5)
    editor.setActiveStructure("right_thalamus")
    put, thal = editor.boxNode("left_putamen"), editor.boxNode("right_thalamus")
    assert put.GetLocked() and not put.GetDisplayNode().GetHandlesInteractive()
    assert not thal.GetLocked() and thal.GetDisplayNode().GetHandlesInteractive()
    assert editor.pointsNode("left_putamen", True).GetLocked() and editor.pointsNode("left_putamen", False).GetLocked()
    assert put.GetDisplayNode().GetOpacity() < thal.GetDisplayNode().GetOpacity()
    unlocked = [n for n in editor.nodes() if not n.GetLocked()]
    assert unlocked == [thal]  # the thalamus has no points on slice 5: one box, nothing else

    editor.setActiveStructure("left_putamen")
    assert thal.GetLocked() and not put.GetLocked()
    negative = editor.pointsNode("left_putamen", False).GetDisplayNode()
    positive = editor.pointsNode("left_putamen", True).GetDisplayNode()
    assert np.allclose(negative.GetColor(), NEGATIVE_COLOR) and not np.allclose(positive.GetColor(), NEGATIVE_COLOR)
    assert negative.GetGlyphTypeAsString() != positive.GetGlyphTypeAsString()
    editor.showSlice(7)  # nodes made later follow the active structure too
    assert all(n.GetLocked() == (n.GetAttribute(pm.STRUCTURE_ATTRIBUTE) != "left_putamen") for n in editor.nodes())

    editor.setShown(False)  # leaving the module: nothing visible, nothing interactive
    assert all(n.GetLocked() and not n.GetDisplayNode().GetVisibility() for n in editor.nodes())
    editor.setShown(True)
    assert put.GetDisplayNode().GetVisibility() and not put.GetLocked()


def test_a_point_placed_in_another_view_joins_the_prompt_of_its_own_slice(mrml_scene):
    ps = _prompts()
    editor = PromptMarkupsEditor(ps, mrml_scene)
    editor.showSlice(5)
    node = editor.pointsNode("left_putamen", True)
    # placed in a sagittal view at the height of slice 8 (no putamen prompt there), and one at slice 7
    node.AddControlPoint(vtk.vtkVector3d(*pm.rasFromPixel(16, 15, 8, ps.grid.affine)), "")
    node.AddControlPoint(vtk.vtkVector3d(*pm.rasFromPixel(12, 14, 7.2, ps.grid.affine)), "")
    node.AddControlPoint(vtk.vtkVector3d(*pm.rasFromPixel(12, 14, ps.grid.shape[2] + 4, ps.grid.affine)), "")  # above the grid
    report = editor.syncFromMarkups()
    assert sorted(report.moved) == [("left_putamen", 7), ("left_putamen", 8)] and report.dropped == 1
    assert _prompt(ps, "left_putamen", 5).points == [[14, 16], [11, 13]]  # not flattened onto slice 5
    new = _prompt(ps, "left_putamen", 8)
    assert new.points == [[16.0, 15.0]] and new.point_labels == [1] and new.box == [11.0, 10.0, 21.0, 20.0]
    assert _prompt(ps, "left_putamen", 7).points == [[15, 16], [12.0, 14.0]]
    assert node.GetNumberOfControlPoints() == 1  # only slice 5's own positive point is left on view


def test_undo_restores_the_prompts_before_an_accidental_drag(mrml_scene):
    ps = _prompts()
    editor = PromptMarkupsEditor(ps, mrml_scene)
    history = PromptHistory(depth=2)
    editor.showSlice(5)
    before = editor.snapshot()
    put = editor.boxNode("left_putamen")
    c = list(put.GetCenter())
    put.SetCenter(c[0] + 6.0, c[1], c[2])
    if editor.syncFromMarkups():
        history.push(before)
    assert editor.editedCount() == 1 and len(history) == 1
    editor.restore(history.pop())
    assert editor.editedCount() == 0 and np.allclose(_prompt(ps, "left_putamen", 5).box, [10, 12, 18, 20])
    assert np.allclose(pm.boxFromRoi(put, ps.grid)[0], [10, 12, 18, 20])  # the view shows it too
    for n in range(4):
        history.push({"n": n})
    assert len(history) == 2 and history.pop() == {"n": 3}
    with pytest.raises(ValueError, match="depth"):
        PromptHistory(depth=0)


def test_editor_nodes_stay_out_of_saved_scenes_and_prompted_slices_step(mrml_scene):
    ps = _prompts()
    editor = PromptMarkupsEditor(ps, mrml_scene)
    editor.showSlice(5)
    assert editor.nodes() and all(not n.GetSaveWithScene() and not n.GetDisplayNode().GetSaveWithScene()
                                  for n in editor.nodes())
    assert editor.neighbourSlice(+1) == 7 and editor.neighbourSlice(-1) is None
    editor.showSlice(7)
    assert editor.neighbourSlice(+1) == 9 and editor.neighbourSlice(-1) == 5
    editor.showSlice(None)
    assert editor.neighbourSlice(+1) == 5 and editor.neighbourSlice(-1) == 9
    assert editor.sliceOffsetMm(6) == pytest.approx(ps.grid.affine[2, 3] + 6 * ps.grid.affine[2, 2])


def test_editor_slice_lookup_follows_the_grid(mrml_scene):
    ps = _prompts()
    editor = PromptMarkupsEditor(ps, mrml_scene)
    for k in (0, 5, ps.grid.shape[2] - 1):
        ras = editor.sliceRas(k)
        assert editor.sliceFromRas(ras) == k
        assert editor.sliceFromRas(ras + np.array([0, 0, 0.49])) == k
    assert editor.sliceFromRas(editor.sliceRas(0) - np.array([0, 0, 3.0])) is None
    editor.showSlice(None)
    assert all(not n.GetDisplayNode().GetVisibility() for n in editor.nodes() if n.IsA("vtkMRMLMarkupsROINode"))
    with pytest.raises(ValueError, match="current slice"):
        editor.addBox("left_putamen")


def test_stale_editor_nodes_are_removed_and_the_node_collection_released(mrml_scene):
    ps = _prompts()
    old = PromptMarkupsEditor(ps, mrml_scene)
    old.showSlice(5)
    other = pm.promptsToMarkups(ps, mrml_scene)  # per-prompt nodes are not the editor's
    assert len(old.nodes()) == 4  # two boxes and the putamen's positive and negative points

    collections = []

    class Spy:  # the scene, recording the collections GetNodesByClass hands out
        def __getattr__(self, name):
            return getattr(mrml_scene, name)

        def GetNodesByClass(self, className):
            collection = mrml_scene.GetNodesByClass(className)
            collections.append(collection)
            return collection

    assert PromptMarkupsEditor.removeStaleNodes(Spy()) == 4
    assert len(collections) == 2 and all(c.GetReferenceCount() == 1 for c in collections)  # only Python's
    assert old.nodes() == [] and all(n.GetScene() is mrml_scene for n in other.allNodes())


def test_a_localised_images_prompts_are_shown_in_the_heads_pose(mrml_scene):
    """Prompts of a whole head that was localised (``source.localisation``) live on the brain
    template's grid; the editor places them in the head's world through ``template_to_input``
    (the anatomy they were made on), reads edits back onto the template grid, and a view in the
    template's axial plane (turned with the head) is recognised as showing their slices."""
    import json

    angle = np.deg2rad(20.0)
    transform = np.eye(4)
    transform[:3, :3] = [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    transform[:3, 3] = [15.0, -40.0, 110.0]
    grid = canonical_grid((40, 36, 20), np.eye(4))
    ps = PromptSet(grid=grid, prompts=[Prompt("left_putamen", 5, [10, 12, 18, 20], [[14, 16]], [1])],
                   source={"localisation": {"applied": True, "template_to_input": transform.tolist()}}).validate()
    editor = PromptMarkupsEditor(ps, mrml_scene)
    editor.showSlice(5)
    roi = editor.boxNode("left_putamen")
    centre = transform @ grid.affine @ np.array([14.0, 16.0, 5.0, 1.0])
    assert np.allclose(roi.GetCenter(), centre[:3], atol=1e-6)  # in the head, not at the template position
    point = editor.pointsNode("left_putamen", True).GetNthControlPointPosition(0)
    assert np.allclose(point, (transform @ grid.affine @ np.array([14.0, 16.0, 5.0, 1.0]))[:3], atol=1e-6)
    assert editor.sliceFromRas(centre[:3]) == 5 and editor.sliceFromRas((grid.affine @ [14, 16, 5, 1])[:3]) != 5
    assert not editor.syncFromMarkups()  # placed and read back: nothing changed

    # the user drags the box 2 mm along the template's x axis (turned with the head)
    roi.SetCenter(*(np.array(roi.GetCenter()) + 2.0 * transform[:3, 0]))
    report = editor.syncFromMarkups()
    assert report and report.changed == [("left_putamen", 5)]
    assert np.allclose(ps.prompts[0].box, [12, 12, 20, 20])
    written = json.loads(pm.promptSetToJson(ps))
    assert written["grid"] == grid.to_dict() and written["source"]["localisation"]["applied"]

    sliceToRas = np.eye(4)
    sliceToRas[:3, :3] = transform[:3, :3]  # the template's axial plane in the head's pose
    assert pm.viewShowsGridSlices(sliceToRas, ps.world_grid().affine)
    assert not pm.viewShowsGridSlices(np.eye(4), ps.world_grid().affine)  # the scanner's axial plane is not
