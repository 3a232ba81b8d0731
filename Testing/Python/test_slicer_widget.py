"""The module's widget, driven through a whole session: the real .ui rendered offscreen (PySide6)
behind stand-ins for Slicer's GUI layer (``slicerstandin``), real MRML (slicer-core), the real
background runner with a small stand-in for the pipeline (same files, same JSON lines).

Screenshots of each step go to ``tmp_path`` (or ``$BASALSEG_SCREENSHOTS`` when set); the
extension's screenshot ``Resources/Screenshots/1.png`` is made this way.

What only a run inside Slicer shows (``BasalSegSAMTest``): Slicer's look, Markups drawn in the
slice views, dragging handles with the mouse, PythonQt itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PySide6", reason="PySide6 renders the widget offscreen (dev extra)")
slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from test_slicer_helpers import add_volume, blob_volume, oblique_affine  # noqa: E402

#: the stand-in for the pipeline (its docstring says how it behaves)
FAKE = Path(__file__).with_name("fake_basalseg.py")


@pytest.fixture
def session(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from slicerstandin import StandIn

    standIn = StandIn(str(tmp_path / "slicer-temp")).install()
    volume = add_volume(blob_volume(centers=((12, 12, 9), (28, 22, 11))), oblique_affine(), name="3: T1")
    import BasalSegSAM

    widget = BasalSegSAM.BasalSegSAMWidget()
    widget.setup()
    widget.enter()
    monkeypatch.setenv("FAKE_STRUCTURES", "two")  # two blobs: left putamen, right caudate
    widget.logic.commandPrefix = lambda kind: [sys.executable, str(FAKE), kind]
    widget.logic.tempRoot = str(tmp_path / "jobs")
    widget.parent.resize(470, 1080)
    widget.parent.show()
    shots = Path(os.environ.get("BASALSEG_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)

    def shoot(name):
        standIn.processEvents(0.05)
        path = shots / f"{name}.png"
        assert widget.parent.grab().save(str(path)), path
        return path

    yield standIn, widget, volume, shoot
    widget.cleanup()
    standIn.uninstall()


def _finish(standIn, widget, timeout=90):
    assert standIn.waitFor(lambda: widget.job is None, timeout), widget.ui.statusLabel.text


def _column(table, column):
    return [table.item(r, column).text() if table.item(r, column) else "" for r in range(table.rowCount)]


def test_a_whole_session_in_the_widget(session, tmp_path):
    standIn, widget, volume, shoot = session
    ui, p = widget.ui, widget._parameterNode
    red = standIn.sliceNode("Red")
    red.SetOrientation("Sagittal")  # the user had the Red view sagittal

    # loaded: the volume is the input; the button state follows
    assert ui.inputVolumeSelector.currentNode() is volume and p.inputVolume is volume
    assert ui.generatePromptsButton.enabled and ui.segmentButton.enabled and not ui.cancelButton.enabled
    assert not ui.undoButton.enabled and not ui.exportCsvButton.enabled
    shoot("01_loaded")

    # Generate prompts: background job, then the Markups, the table, the input as background
    ui.generatePromptsButton.click()
    assert ui.cancelButton.enabled and not ui.generatePromptsButton.enabled
    _finish(standIn, widget)
    editor = widget.prompts.editor
    assert editor is not None and ui.promptsTable.rowCount == len(editor.promptSet.prompts) > 4
    assert {pr.structure for pr in editor.promptSet.prompts} == {"left_putamen", "right_caudate"}
    assert standIn.layers[-1]["background"] is volume
    assert standIn.compositeNode("Red").GetBackgroundVolumeID() == volume.GetID()
    assert red.GetOrientation() == "Axial"  # set back to axial, and said so
    slices = editor.promptSet.slices()
    assert editor.currentSlice == slices[len(slices) // 2]
    assert all(not n.GetSaveWithScene() for n in editor.nodes())
    sliceTexts = _column(ui.promptsTable, 1)
    here = f"{editor.currentSlice} (S {editor.sliceOffsetMm(editor.currentSlice):.1f})"
    assert here in sliceTexts and ui.promptsTable.horizontalHeaderItem(1).text() == "Slice (S mm)"
    highlighted = [r for r in range(ui.promptsTable.rowCount)
                   if ui.promptsTable.item(r, 0).background().color().getRgb()[:3] == (255, 236, 150)]
    assert highlighted and all(sliceTexts[r] == here for r in highlighted)
    assert sum(t == here for t in sliceTexts) == len(highlighted)
    assert "Red view at slice" in ui.promptsSummaryLabel.text
    shoot("02_prompts")

    # choose a structure: only its nodes are editable
    ui.structureComboBox.setCurrentIndex(ui.structureComboBox.findData("left_putamen"))
    onSlice = {pr.structure for pr in editor.promptSet.on_slice(editor.currentSlice)}
    assert "left_putamen" in onSlice
    for node in editor.nodes():
        mine = node.GetAttribute("BasalSegSAM.Structure") == "left_putamen"
        assert node.GetLocked() is not mine, node.GetName()

    # an accidental drag of the box: read back after it settles, shown, marked, undoable
    box = editor.boxNode("left_putamen")
    before = p.promptsJson
    center = list(box.GetCenter())
    box.SetCenter(center[0] + 4.0, center[1], center[2])
    assert standIn.waitFor(lambda: p.promptsJson != before, 5)
    assert "Edited: Left putamen" in ui.statusLabel.text and "Undo" in ui.statusLabel.text
    assert "edited" in _column(ui.promptsTable, 4) and ui.undoButton.enabled
    assert "1 edited" in ui.promptsSummaryLabel.text
    shoot("03_edited")
    ui.undoButton.click()
    assert p.promptsJson == before and "edited" not in _column(ui.promptsTable, 4)
    box.SetCenter(center[0] + 2.0, center[1], center[2])  # an edit that stays
    assert standIn.waitFor(lambda: p.promptsJson != before, 5)

    # step through the prompted slices exactly
    k0 = editor.currentSlice
    ui.nextSliceButton.click()
    assert editor.currentSlice == min(k for k in slices if k > k0)
    ui.previousSliceButton.click()
    assert editor.currentSlice == k0
    assert red.GetSliceOffset() == pytest.approx(editor.sliceOffsetMm(k0))

    # a negative point: its own list (own colour), placed by the user in another view, two slices up
    ui.addNegativePointButton.click()
    negative = editor.pointsNode("left_putamen", positive=False)
    assert slicer.modules.markups.logic().GetActiveListID() == negative.GetID(), (ui.statusLabel.text, ui.addNegativePointButton.enabled)
    target = k0 + 2
    negative.AddControlPoint(vtk.vtkVector3d(*editor.sliceRas(target)), "")
    assert standIn.waitFor(lambda: any(pr.slice == target and 0 in pr.point_labels
                                       for pr in editor.promptSet.for_structure("left_putamen")), 5)
    assert "added to the slice where they lie" in ui.statusLabel.text

    # Generate prompts again: asked first; No keeps the edits
    standIn.confirmations.append(False)
    edited = p.promptsJson
    ui.generatePromptsButton.click()
    assert standIn.messages[-1][0] == "confirm" and "You edited" in standIn.messages[-1][1]
    assert widget.job is None and p.promptsJson == edited

    # Segment: a new segmentation with its own table, shown in 3D
    ui.segmentButton.click()
    _finish(standIn, widget)
    seg = p.outputSegmentation
    assert seg is not None and seg.GetSegmentation().GetNumberOfSegments() == 8
    assert ui.outputSegmentationSelector.currentNode() is seg
    table = widget.logic.volumesTableFor(seg)
    assert table is p.volumesTable and ui.volumesTableView.mrmlTableNode() is table
    assert table.GetName() == f"{seg.GetName()} volumes" and ui.volumesTableView.rowCount == 8
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")
    assert "Done" in ui.statusLabel.text and ui.exportCsvButton.enabled
    shoot("04_segmented")

    # Segment again into the untouched result: updated in place, no question, no pile-up
    ui.segmentButton.click()
    _finish(standIn, widget)
    assert p.outputSegmentation is seg and "unedited result" in ui.statusLabel.text
    assert len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == 1
    assert len(slicer.util.getNodesByClass("vtkMRMLTableNode")) == 1

    # the user edits a segment; a rerun now asks; "New segmentation" keeps both, each with its table
    putamen = seg.GetSegmentation().GetSegmentIdBySegmentName("Left-Putamen")
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8),
                                                     seg, putamen, volume)
    standIn.answerQuestion("New segmentation")
    ui.segmentButton.click()
    _finish(standIn, widget)
    assert any(kind == "messagebox" and "already has segments" in text for kind, text in standIn.asked)
    second = p.outputSegmentation
    assert second is not seg and widget.logic.volumesTableFor(second) is not table
    assert ui.volumesTableView.mrmlTableNode() is widget.logic.volumesTableFor(second)
    ui.outputSegmentationSelector.setCurrentNode(seg)  # choosing the first shows its own table again
    assert ui.volumesTableView.mrmlTableNode() is table

    # Export: a default name valid on Windows, the file written
    out = tmp_path / "export.seg.nrrd"
    standIn.answerFile(str(out))
    ui.exportSegNrrdButton.click()
    default = next(text for kind, text in standIn.asked if kind == "file-default")
    assert Path(default).name == "3_ T1_basalseg.seg.nrrd"
    assert out.is_file() and out.stat().st_size > 0

    # leaving the module hides and locks the prompts; coming back shows them
    widget.exit()
    assert all(n.GetLocked() and not n.GetDisplayNode().GetVisibility() for n in editor.nodes())
    widget.enter()
    assert editor.boxNode("left_putamen").GetDisplayNode().GetVisibility()
    assert not any(kind == "error" for kind, _ in standIn.messages), standIn.messages
    assert ("qSlicerAbstractCoreModule", "Segmentation") not in standIn.translated  # only the module class uses it
    assert any(text == "Undo reverts it." or "Undo reverts it" in text for _c, text in standIn.translated)


def test_install_dependencies_never_nests_shows_one_error_and_offers_a_restart(session, monkeypatch):
    standIn, widget, volume, shoot = session
    from BasalSegSAMLib import dependencies

    ui = widget.ui
    state = {"missing": True, "clicks": 0}
    monkeypatch.setattr(dependencies, "missingRequirements",
                        lambda *a, **k: [(dependencies.Requirement("monai", ">=1.3", "monai>=1.3"), "1.2")]
                        if state["missing"] else [])
    widget.dependencies.refresh()
    assert not widget.dependencies.ready and not ui.generatePromptsButton.enabled
    assert "monai>=1.3 (have 1.2)" in ui.dependenciesLabel.text

    def install(pipInstall, torchInstaller, log):
        state["clicks"] += 1
        assert not ui.installDependenciesButton.enabled  # disabled while installing
        widget.dependencies.onInstall()  # a click that arrives meanwhile: ignored
        raise dependencies.DependencyError("pip could not install monai>=1.3: no network")

    monkeypatch.setattr(dependencies, "installDependencies", install)
    standIn.confirmations.append(True)
    ui.installDependenciesButton.click()
    assert state["clicks"] == 1
    errors = [text for kind, text in standIn.messages if kind == "error"]
    assert len(errors) == 1 and "no network" in errors[0]
    assert ui.installDependenciesButton.enabled

    def installOk(pipInstall, torchInstaller, log):
        state["missing"] = False
        return dependencies.InstallReport(["monai>=1.3"], restartNeeded=True)

    monkeypatch.setattr(dependencies, "installDependencies", installOk)
    standIn.confirmations += [True, True]  # install? restart now?
    ui.installDependenciesButton.click()
    assert standIn.restarts == 1 and "Restart Slicer" in ui.dependenciesLabel.text
    assert not ui.generatePromptsButton.enabled  # not before the restart


def test_the_self_test_for_real_slicer_runs_under_the_stand_ins(session):
    """BasalSegSAMTest is meant for a run inside Slicer; here it runs against the stand-ins, which
    catches a broken self-test (a renamed method, a wrong import) before anyone starts Slicer.
    Left out: the prompt generation through the real pipeline (test_slicer_e2e does that)."""
    standIn, widget, volume, shoot = session
    standIn.registerWidget(widget)
    from BasalSegSAMLib.selftest import BasalSegSAMTest

    test = BasalSegSAMTest()
    for name in ("test_bridgeOrientation", "test_promptMarkupsRoundTrip", "test_processRunnerCancel",
                 "test_widgetSetsUp"):
        test.setUp()
        getattr(test, name)()
    assert {"test_bridgeOrientation", "test_promptMarkupsRoundTrip", "test_processRunnerCancel",
            "test_generatePromptsThroughProcessRunner", "test_widgetSetsUp"} <= set(dir(test))


def test_rows_prompt_files_clear_cancel_and_a_failed_run(session, tmp_path, monkeypatch):
    standIn, widget, volume, shoot = session
    ui, p = widget.ui, widget._parameterNode
    # the test-time augmentation box: on by default, bound both ways, rendered as --no-mirror-tta when off
    assert ui.mirrorTtaCheckBox.checked and p.mirrorTta is True and "--no-mirror-tta" not in widget._options().segmentArgs()
    ui.mirrorTtaCheckBox.setChecked(False)
    assert p.mirrorTta is False and widget._options().segmentArgs()[-1] == "--no-mirror-tta"
    p.mirrorTta = True
    assert ui.mirrorTtaCheckBox.checked
    ui.generatePromptsButton.click()
    _finish(standIn, widget)
    editor = widget.prompts.editor

    # a table row shows its structure and slice
    last = ui.promptsTable.rowCount - 1
    structure, k = str(ui.promptsTable.item(last, 0).data(0x0100)).split("|")  # Qt.UserRole
    widget.prompts.onRowClicked(last, 1)
    assert editor.currentSlice == int(k) and widget.prompts.selectedStructure() == structure

    # save, clear (asked), load back: the same prompts
    saved = tmp_path / "prompts.json"
    standIn.answerFile(str(saved))
    ui.savePromptsButton.click()
    assert saved.is_file()
    standIn.confirmations.append(True)
    ui.clearPromptsButton.click()
    assert widget.prompts.editor is None and p.promptsJson == "" and ui.promptsTable.rowCount == 0
    standIn.answerFile(str(saved))
    ui.loadPromptsButton.click()
    assert widget.prompts.editor is not None and len(widget.prompts.editor.promptSet.prompts) == len(editor.promptSet.prompts)
    assert widget.prompts.editor.editedCount() == 0

    # a failed run: one error, nothing added; a cancelled run: nothing added
    before = {n.GetID() for n in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")}
    monkeypatch.setenv("FAKE_MODE", "error")
    ui.segmentButton.click()
    _finish(standIn, widget)
    errors = [text for kind, text in standIn.messages if kind == "error"]
    assert len(errors) == 1 and "none of the 8 structures" in errors[0] and "Failed" in ui.statusLabel.text
    monkeypatch.setenv("FAKE_MODE", "hang")
    ui.segmentButton.click()
    assert standIn.waitFor(lambda: widget.job is not None and widget.job.overall >= 0.3, 30)
    ui.cancelButton.click()
    _finish(standIn, widget, timeout=30)
    assert "Cancelled" in ui.statusLabel.text and ui.segmentButton.enabled
    assert {n.GetID() for n in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")} == before
