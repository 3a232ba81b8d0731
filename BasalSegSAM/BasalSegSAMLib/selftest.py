"""``BasalSegSAMTest``: the module's self-test inside real 3D Slicer.

Run it in Slicer (Developer mode: Reload and Test, or ``ctest`` of an extension build with
``slicer_add_python_unittest``). ``BasalSegSAM.py`` imports the class, so Slicer finds it in the
module's namespace as usual. The pytest suite (``Testing/Python/test_slicer_*.py``) covers the
Qt-free parts against real MRML and the widget under stand-ins for Slicer's GUI; this test checks
what only a real Slicer has: PythonQt, the real ``.ui`` loader and parameter node wrapper,
``PythonSlicer`` as the child's interpreter, slice views and Markups interaction.
"""

import logging
import time

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from . import dependencies
from .parameters import RunOptions, defaultThreads

__all__ = ["BasalSegSAMTest"]


class BasalSegSAMTest(ScriptedLoadableModuleTest):
    """Tests inside real Slicer (Developer mode: Reload and Test, or the generic module tests).

    The Qt-free parts are also tested outside Slicer with pytest (Testing/Python/test_slicer_*.py);
    these tests check what only a real Slicer has: the module's import with Qt, the widget, the
    parameter node wrapper, PythonSlicer as the child's interpreter, and node display.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_bridgeOrientation()
        self.setUp()
        self.test_promptMarkupsRoundTrip()
        self.setUp()
        self.test_processRunnerCancel()
        self.setUp()
        self.test_generatePromptsThroughProcessRunner()
        self.setUp()
        self.test_widgetSetsUp()

    def _sampleVolume(self):
        """MRHead from Sample Data when it can be downloaded, else a synthetic head-like volume."""
        try:
            import SampleData

            return SampleData.downloadSample("MRHead")
        except Exception as exc:  # offline
            logging.info(f"Sample data not available ({exc}); using a synthetic volume")
            import numpy as np

            shape = (96, 112, 80)
            ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
            r = np.sqrt(((ii - 48) / 40.0) ** 2 + ((jj - 56) / 50.0) ** 2 + ((kk - 40) / 36.0) ** 2)
            data = np.where(r < 1, 300.0 + 50 * np.cos(ii / 4.0), 0.0).astype(np.float32)
            affine = np.diag([-1.5, -1.5, 1.5, 1.0])
            return slicer.util.addVolumeFromArray(data.transpose(2, 1, 0).copy(), affine, name="synthetic T1")

    def test_bridgeOrientation(self):
        import numpy as np

        from BasalSegSAMLib import mrmlbridge

        self.delayDisplay("MRML bridge on an oblique, anisotropic volume")
        a = np.deg2rad(10.0)
        affine = np.eye(4)
        affine[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([-1.0, -1.0, 2.0])
        affine[:3, 3] = [20.0, 10.0, -5.0]
        labels = np.zeros((20, 18, 10), np.int16)
        labels[4:9, 5:9, 3:6] = 12
        labels[11:16, 5:10, 2:7] = 50
        volume = slicer.util.addVolumeFromArray(np.zeros(labels.shape[::-1], np.float32), affine, name="oblique")
        self.assertTrue(np.allclose(mrmlbridge.volumeFromNode(volume).affine, affine))
        segmentation = mrmlbridge.labelsToSegmentation(labels, volume)
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 8)
        self.assertTrue(np.array_equal(mrmlbridge.labelsFromSegmentation(segmentation, volume), labels))
        again = mrmlbridge.labelsToSegmentation(labels, volume, segmentation)
        self.assertNotEqual(again.GetID(), segmentation.GetID())  # never overwritten by default
        self.delayDisplay("Bridge test passed")

    def test_promptMarkupsRoundTrip(self):
        import numpy as np

        from basalseg.prompts import Prompt, PromptSet
        from basalseg.spatial import Grid

        from BasalSegSAMLib import promptmarkups

        self.delayDisplay("Prompts <-> Markups")
        affine = np.eye(4)
        affine[:3, 3] = [-40.0, -30.0, -20.0]
        prompts = PromptSet(grid=Grid((80, 70, 40), affine), prompts=[
            Prompt("left_putamen", 20, [10.5, 12.0, 20.25, 30.0], [[15.0, 20.0], [12.0, 14.0]], [1, 0]),
            Prompt("right_thalamus", 21, [40.0, 30.0, 55.0, 44.0], [], [])]).validate()
        nodes = promptmarkups.promptsToMarkups(prompts)
        back = promptmarkups.promptsFromMarkups(nodes, prompts.grid)
        for a, b in zip(sorted(prompts.prompts, key=lambda p: p.structure), sorted(back.prompts, key=lambda p: p.structure)):
            self.assertEqual((a.structure, a.slice), (b.structure, b.slice))
            self.assertTrue(np.allclose(a.box, b.box, atol=1e-3))
        self.delayDisplay("Markups test passed")

    def test_processRunnerCancel(self):
        import sys

        from BasalSegSAMLib.jobs import pythonExecutable
        from BasalSegSAMLib.processrunner import ProcessRunner

        self.delayDisplay("Background process: progress and cancel")
        script = ("import json, time\n"
                  "print(json.dumps({'event': 'progress', 'stage': 'foundation', 'fraction': 0.5, 'overall': 0.5}), flush=True)\n"
                  "time.sleep(60)\n")
        runner = ProcessRunner(terminateTimeout=2.0)
        runner.start([pythonExecutable() or sys.executable, "-c", script])
        deadline = time.time() + 30
        while runner.overall < 0.5 and time.time() < deadline:
            runner.poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertAlmostEqual(runner.overall, 0.5)
        before = slicer.mrmlScene.GetNumberOfNodes()
        runner.cancel()
        self.assertEqual(runner.wait(timeout=15), "cancelled")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("Process runner test passed")

    def test_generatePromptsThroughProcessRunner(self):
        if dependencies.torchVersion() is None or dependencies.missingRequirements():
            self.delayDisplay("Dependencies are not installed; skipping the prompt-generation test")
            return
        from BasalSegSAMLib.prompteditor import PromptMarkupsEditor

        self.delayDisplay("Generating prompts in a background process")
        volume = self._sampleVolume()
        from BasalSegSAM import BasalSegSAMLogic

        logic = BasalSegSAMLogic()
        prompts = logic.generatePrompts(volume, RunOptions(device="cpu", threads=defaultThreads()), timeout=900)
        self.assertEqual(len(prompts.grid.shape), 3)
        editor = PromptMarkupsEditor(prompts)
        if prompts.prompts:
            editor.showSlice(prompts.slices()[0])
            self.assertGreater(len(editor.nodes()), 0)
            self.assertIsNotNone(slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLMarkupsROINode"))
        editor.removeNodes()
        self.delayDisplay(f"Prompt generation test passed ({len(prompts.prompts)} prompts)")

    def test_widgetSetsUp(self):
        self.delayDisplay("Widget")
        widget = slicer.modules.basalsegsam.widgetRepresentation().self()
        import numpy as np

        volume = slicer.util.addVolumeFromArray(np.zeros((8, 8, 8), np.float32), name="w")
        widget._parameterNode.inputVolume = volume
        self.assertEqual(widget.ui.inputVolumeSelector.currentNode(), volume)
        widget._parameterNode.foundation = "sam2"
        self.assertEqual(widget.ui.foundationComboBox.currentText, "sam2")
        self.assertTrue(widget.ui.sam2CheckpointLineEdit.enabled)
        self.assertFalse(widget.ui.cancelButton.enabled)
        widget._parameterNode.foundation = "litemedsam"

        # prompts in the editor: table rows, boxes on the Red view's slice, locking, edits, undo
        from basalseg.prompts import Prompt, PromptSet
        from basalseg.spatial import canonical_grid

        from BasalSegSAMLib import mrmlbridge

        v = mrmlbridge.volumeFromNode(volume)
        grid = canonical_grid(v.shape, v.affine)
        prompts = PromptSet(grid=grid, prompts=[Prompt("left_putamen", 3, [1, 1, 4, 5], [[2, 2]], [1]),
                                                Prompt("right_caudate", 3, [3, 2, 6, 6], [], [])]).validate()
        redNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        redNode.SetOrientation("Sagittal")
        widget.prompts.setPrompts(prompts, volume)
        self.assertEqual(redNode.GetOrientation(), "Axial")  # set back to axial for editing
        self.assertEqual(widget.ui.promptsTable.rowCount, 2)
        widget.prompts.jumpToSlice(3)
        editor = widget.prompts.editor
        self.assertEqual(editor.currentSlice, 3)
        self.assertEqual(len([n for n in editor.nodes() if n.IsA("vtkMRMLMarkupsROINode")]), 2)
        widget.ui.structureComboBox.setCurrentIndex(widget.ui.structureComboBox.findData("left_putamen"))
        self.assertFalse(editor.boxNode("left_putamen").GetLocked())
        self.assertTrue(editor.boxNode("right_caudate").GetLocked())
        widget.prompts.onDeleteBox()
        self.assertEqual(widget.ui.promptsTable.rowCount, 1)
        self.assertNotIn("left_putamen", widget._parameterNode.promptsJson)
        widget.prompts.onUndo()
        self.assertEqual(widget.ui.promptsTable.rowCount, 2)
        widget.exit()
        self.assertFalse(editor.boxNode("left_putamen").GetDisplayNode().GetVisibility())
        widget.enter()
        widget.prompts.discard()
        self.delayDisplay("Widget test passed")
