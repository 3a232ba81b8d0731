"""The widget's Prompts section: the editor on the Red view, the prompt table, Undo, navigation.

Used by ``BasalSegSAMWidget`` only; imports Qt (``qt``) and Slicer, so it runs inside Slicer or
under the stand-ins of the tests (``Testing/Python/slicerstandin``), never in the background
child. The prompts themselves live in the parameter node as ``prompts.json`` text
(``promptsJson``, and ``generatedPromptsJson`` for the unedited ones that edits are compared
with); the Markups nodes are rebuilt from it and never saved with the scene.

What the user sees and can do:

* The Red view is where prompts are edited. It must be **axial** (the prompts are axial slices
  of the 1 mm canonical grid): when it is not, it is set to axial and the user is told so.
* Only the structure chosen in the structure selector is editable; the others are locked.
* Every Markups edit is read back once it settles (``SYNC_DELAY_MSEC``), shown in the status
  line ("Edited ... Undo reverts it") and marked *edited* in the table; Undo steps back.
* Previous/next buttons step through the prompted slices exactly (on 3-5 mm scans scrolling the
  Red view skips most of them). The table shows each slice's position in mm (the Red view's
  slice offset, S) and highlights the rows of the slice on view.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.util import VTKObservationMixin

from .prompteditor import PromptHistory, PromptMarkupsEditor
from .promptmarkups import promptSetFromJson, promptSetToJson, slicePlaneOfGrid, viewShowsGridSlices

__all__ = ["PromptPanel", "RED_SLICE_NODE_ID"]

RED_SLICE_NODE_ID = "vtkMRMLSliceNodeRed"
#: Background of the table rows of the slice on view.
CURRENT_ROW_COLOR = (255, 236, 150)


class PromptPanel(VTKObservationMixin):
    """The Prompts section of the module panel.

    Args:
        ui: the widget's ``ui`` (child widgets of ``BasalSegSAM.ui``).
        parameterNode: returns the current ``BasalSegSAMParameterNode`` (or None).
        showStatus: ``(text, error=False)`` shows a line in the panel's status label.
    """

    SYNC_DELAY_MSEC = 300
    #: Markups events that may carry an edit (ROI resizing only sends ModifiedEvent).
    MARKUPS_EVENTS = ("PointEndInteractionEvent", "PointRemovedEvent", "PointModifiedEvent", "PointPositionDefinedEvent")

    def __init__(self, ui, parameterNode: Callable[[], object], showStatus: Callable[..., None]):
        VTKObservationMixin.__init__(self)
        self.ui = ui
        self._parameterNode = parameterNode
        self._showStatus = showStatus
        self.editor: Optional[PromptMarkupsEditor] = None
        self.history = PromptHistory()
        self._observed: set[str] = set()
        self._sliceNode = None
        self._busy = False

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        from basalseg.structures import STRUCTURES

        combo = self.ui.structureComboBox
        combo.clear()
        for s in STRUCTURES:
            combo.addItem(_(s.title), s.key)
        table = self.ui.promptsTable
        table.setColumnCount(5)
        table.setHorizontalHeaderLabels([_("Structure"), _("Slice (S mm)"), _("Box x0,y0,x1,y1"), _("+/-"), _("Edited")])
        table.horizontalHeader().setStretchLastSection(True)
        table.cellClicked.connect(self.onRowClicked)
        combo.currentIndexChanged.connect(self.onStructureChanged)
        self.ui.addBoxButton.clicked.connect(self.onAddBox)
        self.ui.deleteBoxButton.clicked.connect(self.onDeleteBox)
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.ui.addPositivePointButton.clicked.connect(lambda: self.onPlacePoint(True))
        self.ui.addNegativePointButton.clicked.connect(lambda: self.onPlacePoint(False))
        self.ui.previousSliceButton.clicked.connect(lambda: self.stepSlice(-1))
        self.ui.nextSliceButton.clicked.connect(lambda: self.stepSlice(+1))
        self.syncTimer = qt.QTimer()
        self.syncTimer.setSingleShot(True)
        self.syncTimer.setInterval(self.SYNC_DELAY_MSEC)
        self.syncTimer.timeout.connect(self.sync)

    def cleanup(self) -> None:
        self.syncTimer.stop()
        self.discard()
        self.removeObservers()

    # -- state ----------------------------------------------------------------------------------
    @property
    def hasPrompts(self) -> bool:
        return self.editor is not None

    def editedCount(self) -> int:
        self.sync()
        return 0 if self.editor is None else self.editor.editedCount()

    def selectedStructure(self) -> str:
        combo = self.ui.structureComboBox
        return str(combo.itemData(combo.currentIndex))

    def updateButtons(self, enabled: bool) -> None:
        has = self.editor is not None and enabled
        for button in (self.ui.addBoxButton, self.ui.deleteBoxButton, self.ui.addPositivePointButton,
                       self.ui.addNegativePointButton, self.ui.savePromptsButton, self.ui.clearPromptsButton,
                       self.ui.previousSliceButton, self.ui.nextSliceButton):
            button.setEnabled(has)
        self.ui.undoButton.setEnabled(has and len(self.history) > 0)

    # -- prompts in and out ---------------------------------------------------------------------
    def setPrompts(self, prompts, volume) -> None:
        """New prompts (generated or loaded): they become the unedited reference; Undo starts afresh."""
        self.history.clear()
        if self.editor is not None:
            self.editor.setPromptSet(prompts)
        else:
            self._makeEditor(prompts)
        p = self._parameterNode()
        with slicer.util.NodeModify(p.parameterNode):
            p.promptsVolume = volume
            p.promptsJson = promptSetToJson(prompts)
            p.generatedPromptsJson = p.promptsJson
        self.refreshTable()

    def loadFromParameterNode(self) -> None:
        """Rebuild the editor from the parameter node (e.g. after a scene was loaded)."""
        p = self._parameterNode()
        if self.editor is not None or p is None or not p.promptsJson or not self.promptsBelongToInput():
            self.refreshTable()
            return
        try:
            prompts = promptSetFromJson(p.promptsJson, "saved prompts")
            reference = promptSetFromJson(p.generatedPromptsJson, "generated prompts") if p.generatedPromptsJson else None
        except Exception as exc:
            self._showStatus(_("The saved prompts could not be read ({error}).").format(error=exc), error=True)
            return
        self._makeEditor(reference or prompts)
        if reference is not None:
            self.editor.promptSet.prompts[:] = prompts.prompts
            self.editor.refresh()
        self.refreshTable()

    def promptsBelongToInput(self) -> bool:
        p = self._parameterNode()
        return p is not None and p.promptsVolume is not None and p.inputVolume is not None \
            and p.promptsVolume.GetID() == p.inputVolume.GetID()

    def _makeEditor(self, prompts) -> None:
        PromptMarkupsEditor.removeStaleNodes(slicer.mrmlScene)  # e.g. from a scene of an older version
        self.editor = PromptMarkupsEditor(prompts, slicer.mrmlScene)
        self.editor.setActiveStructure(self.selectedStructure())
        self.observeRedSlice()
        self.ensureAxial()
        self.onRedSliceModified()
        self._observeMarkups()

    def discard(self) -> None:
        """Remove the editor's nodes (the prompts stay in the parameter node)."""
        self.forget()
        if self.editor is not None:
            self.editor.removeNodes()
        self.editor = None
        self.history.clear()
        self.refreshTable()

    def forget(self) -> None:
        """Stop observing Markups (their nodes go with a closing scene)."""
        self.removeObservers(method=self.onMarkupsEdited)
        self._observed.clear()

    def setShown(self, shown: bool) -> None:
        """Show the prompts (module entered) or hide and lock them (module left)."""
        if self.editor is not None:
            self.sync()
            self.editor.setShown(shown)

    # -- Markups edits --------------------------------------------------------------------------
    def _observeMarkups(self) -> None:
        if self.editor is None:
            return
        for node in self.editor.nodes():
            if node.GetID() in self._observed:
                continue
            for name in self.MARKUPS_EVENTS:
                self.addObserver(node, getattr(slicer.vtkMRMLMarkupsNode, name), self.onMarkupsEdited)
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.onMarkupsEdited)
            self._observed.add(node.GetID())

    def onMarkupsEdited(self, caller, event) -> None:
        if self.editor is None or self.editor.updating:
            return
        self.syncTimer.start()  # restarts: one sync after the edit settles

    def sync(self) -> None:
        """Read Markups edits into the prompts and the parameter node, and tell the user."""
        if self.editor is None or self._busy:
            return
        self._busy = True
        try:
            before = self.editor.snapshot()
            try:
                report = self.editor.syncFromMarkups()
            except Exception as exc:  # an invalid edit: show it, keep the last valid prompts
                self._showStatus(_("That prompt edit was not accepted: {error}").format(error=exc), error=True)
                self.editor.refresh()
                return
            if report:
                self.history.push(before)
                self._store()
                self._showStatus(self._describe(report))
            self._observeMarkups()
        finally:
            self._busy = False

    def _describe(self, report) -> str:
        from basalseg.structures import get_structure

        where = ", ".join(f"{_(get_structure(key).title)} {self._sliceText(k)}" for key, k in report.changed)
        text = _("Edited: {where}. Undo reverts it.").format(where=where) if where else ""
        if report.moved:
            text += " " + _("Points placed off the Red view's slice were added to the slice where they lie.")
        if report.dropped:
            text += " " + _("{n} point(s) outside the prompt grid were not kept.").format(n=report.dropped)
        return text.strip()

    def _store(self) -> None:
        self._parameterNode().promptsJson = promptSetToJson(self.editor.promptSet)
        self.refreshTable()

    def onUndo(self) -> None:
        snapshot = self.history.pop()
        if snapshot is None or self.editor is None:
            return
        self.editor.restore(snapshot)
        self._store()
        self._observeMarkups()
        self._showStatus(_("Undone."))

    def onStructureChanged(self, index: int = 0) -> None:
        if self.editor is not None:
            self.sync()
            self.editor.setActiveStructure(self.selectedStructure())

    def _programmatic(self, edit: Callable[[], object]) -> None:
        self.sync()
        before = self.editor.snapshot()
        result = edit()
        if self.editor.snapshot() != before:
            self.history.push(before)
        self._store()
        self._observeMarkups()
        return result

    def onAddBox(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not add the box."), waitCursor=False):
            self._programmatic(lambda: self.editor.addBox(self.selectedStructure()))

    def onDeleteBox(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not delete the box."), waitCursor=False):
            if not self._programmatic(lambda: self.editor.deleteBox(self.selectedStructure())):
                self._showStatus(_("That structure has no box on this slice."))

    def onPlacePoint(self, positive: bool) -> None:
        if self.editor is None or self.editor.currentSlice is None:
            self._showStatus(_("Scroll the Red view onto a slice of the prompt grid first."), error=True)
            return
        self.sync()
        node = self.editor.pointsNode(self.selectedStructure(), positive)
        self.editor.setActiveStructure(self.selectedStructure())
        self._observeMarkups()
        markupsLogic = slicer.modules.markups.logic()
        markupsLogic.SetActiveList(node)
        markupsLogic.StartPlaceMode(False)
        sign = _("positive") if positive else _("negative")
        self._showStatus(_("Click in the Red view to place a {sign} point.").format(sign=sign))

    # -- the Red view ---------------------------------------------------------------------------
    def observeRedSlice(self) -> None:
        sliceNode = slicer.mrmlScene.GetNodeByID(RED_SLICE_NODE_ID)
        if sliceNode is not None and sliceNode is not self._sliceNode:
            if self._sliceNode is not None:
                self.removeObserver(self._sliceNode, vtk.vtkCommand.ModifiedEvent, self.onRedSliceModified)
            self.addObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onRedSliceModified)
            self._sliceNode = sliceNode

    def _localisedGrid(self):
        """The world grid of a localised image's prompts (template grid in the head's pose), else None."""
        if self.editor is None or self.editor.promptSet.template_to_input() is None:
            return None
        return self.editor.promptSet.world_grid()

    def _viewOnPromptSlices(self) -> bool:
        grid = self._localisedGrid()
        if grid is None:
            return self._sliceNode.GetOrientation() == "Axial"
        m = self._sliceNode.GetSliceToRAS()
        return viewShowsGridSlices([[m.GetElement(r, c) for c in range(4)] for r in range(4)], grid.affine)

    def ensureAxial(self) -> None:
        """Set the Red view to axial when it is not (prompts are axial slices). For a localised
        image's prompts (a whole head registered to the brain template) the Red view is set to the
        template's axial plane in the head's pose, the plane those prompts' slices lie in."""
        if self._sliceNode is None or self._viewOnPromptSlices():
            return
        grid = self._localisedGrid()
        if grid is not None:
            normal, transverse = slicePlaneOfGrid(grid.affine)
            centre = self._sliceNode.GetSliceToRAS()
            self._sliceNode.SetSliceToRASByNTP(*normal, *transverse, *[centre.GetElement(r, 3) for r in range(3)], 0)
            self._showStatus(_("The Red view now shows the prompts' slices: the brain-aligned axial plane of this "
                               "whole-head image (it was localised to the brain template)."))
            return
        previous = self._sliceNode.GetOrientation()
        self._sliceNode.SetOrientation("Axial")
        self._showStatus(_("The Red view was {previous}; it is now axial, as the prompts are.").format(previous=previous))

    def onRedSliceModified(self, caller=None, event=None) -> None:
        if self.editor is None or self._sliceNode is None:
            return
        if not self._viewOnPromptSlices():
            k = None  # an oblique or other view shows no prompt slice
        else:
            sliceToRas = self._sliceNode.GetSliceToRAS()
            k = self.editor.sliceFromRas([sliceToRas.GetElement(r, 3) for r in range(3)])
        if k != self.editor.currentSlice:
            self.sync()  # keep edits of the slice we leave
            self.editor.showSlice(k)
            self._observeMarkups()
            self.refreshTable()

    def jumpToSlice(self, k: int) -> None:
        if self.editor is None or self._sliceNode is None:
            return
        self.ensureAxial()
        ras = self.editor.sliceRas(k)
        self._sliceNode.JumpSliceByOffsetting(float(ras[0]), float(ras[1]), float(ras[2]))
        self.onRedSliceModified()

    def stepSlice(self, step: int) -> None:
        if self.editor is None:
            return
        k = self.editor.neighbourSlice(step)
        if k is None:
            self._showStatus(_("No prompted slice further in that direction."))
            return
        self.jumpToSlice(k)

    # -- the table ------------------------------------------------------------------------------
    def _sliceText(self, k: int) -> str:
        return f"{k} (S {self.editor.sliceOffsetMm(k):.1f})"

    def summary(self) -> str:
        if self.editor is None:
            return _("No prompts yet: click Generate prompts, or Load prompts.json.")
        ps = self.editor.promptSet
        k = self.editor.currentSlice
        here = [] if k is None else [_(p.struct.title) for p in ps.on_slice(k)]
        if k is None:
            where = _("outside the prompt grid (or not axial)")
        else:
            where = _("slice {slice}: {names}").format(slice=self._sliceText(k),
                                                      names=", ".join(here) if here else _("no boxes"))
        text = _("{n} prompts on {m} slices; Red view at {where}.").format(n=len(ps.prompts), m=len(ps.slices()), where=where)
        edited = self.editor.editedCount()
        if edited:
            text += " " + _("{n} edited.").format(n=edited)
        return text

    def refreshTable(self) -> None:
        table = self.ui.promptsTable
        table.setRowCount(0)
        if self.editor is not None:
            prompts = sorted(self.editor.promptSet.prompts, key=lambda p: (p.slice, p.struct.class_index))
            table.setRowCount(len(prompts))
            current = self.editor.currentSlice
            highlight = qt.QBrush(qt.QColor(*CURRENT_ROW_COLOR))
            scrollTo = None
            for row, p in enumerate(prompts):
                positives = sum(1 for v in p.point_labels if v == 1)
                cells = [_(p.struct.title), self._sliceText(p.slice), ",".join(f"{v:g}" for v in p.box),
                         f"{positives} / {len(p.point_labels) - positives}", _("edited") if self.editor.isEdited(p) else ""]
                for column, text in enumerate(cells):
                    item = qt.QTableWidgetItem(text)
                    item.setData(qt.Qt.UserRole, f"{p.structure}|{p.slice}")
                    if p.slice == current:
                        item.setBackground(highlight)
                    table.setItem(row, column, item)
                if p.slice == current and scrollTo is None:
                    scrollTo = table.item(row, 0)
            table.resizeColumnsToContents()
            if scrollTo is not None:
                table.scrollToItem(scrollTo)
        self.ui.promptsSummaryLabel.setText(self.summary())

    def onRowClicked(self, row: int, column: int) -> None:
        item = self.ui.promptsTable.item(row, 0)
        if item is None or self.editor is None:
            return
        key, k = str(item.data(qt.Qt.UserRole)).split("|")
        index = self.ui.structureComboBox.findData(key)
        if index >= 0:
            self.ui.structureComboBox.setCurrentIndex(index)
        self.jumpToSlice(int(k))
        logging.debug("BasalSegSAM: row %d -> %s slice %s", row, key, k)
