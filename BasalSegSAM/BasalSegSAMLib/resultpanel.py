"""The widget's Segmentation and Results sections: where a result goes, its table, export.

Used by ``BasalSegSAMWidget`` only (imports Qt and Slicer). The rules a clinician relies on:

* A result never silently replaces segments the user made or edited. When the chosen output
  segmentation already has segments with the structures' names, the user is asked (Replace /
  New segmentation / Cancel), **unless** those segments are exactly this module's last,
  unedited result for the same volume (:func:`.mrmlbridge.isUntouchedResult`): rerunning
  Segment then updates that result in place and the status line says so.
* An existing segmentation keeps its parent transform and geometry (see :mod:`.mrmlbridge`).
* Every segmentation has its own volumes table (named after it); the table view follows the
  segmentation chosen as output.
* Export file names come from the volume's name made valid on every system
  (:func:`.logic.exportFileName`).
"""

from __future__ import annotations

import os
from typing import Callable

import qt
import slicer
from slicer.i18n import tr as _

from . import mrmlbridge
from .logic import EXPORT_FORMATS, exportFileName

__all__ = ["ResultPanel", "askReplaceOrNew"]


def _nodeId(node):
    return node.GetID() if node is not None else None


def askReplaceOrNew(target, conflicts: list[str]):
    """Ask whether to replace the conflicting segments: ``"replace"``, ``"new"`` or None (cancel)."""
    box = qt.QMessageBox(slicer.util.mainWindow())
    box.setWindowTitle("BasalSegSAM")
    box.setIcon(qt.QMessageBox.Question)
    box.setText(_("'{name}' already has segments {segments}.\n\nReplace those segments with the new result, or put "
                  "the result in a new segmentation?").format(name=target.GetName(), segments=", ".join(conflicts)))
    replaceButton = box.addButton(_("Replace segments"), qt.QMessageBox.DestructiveRole)
    newButton = box.addButton(_("New segmentation"), qt.QMessageBox.AcceptRole)
    box.addButton(qt.QMessageBox.Cancel)
    box.setDefaultButton(newButton)
    box.exec_()
    if box.clickedButton() == replaceButton:
        return "replace"
    if box.clickedButton() == newButton:
        return "new"
    return None


class ResultPanel:
    """Segmentation output, volumes table and export.

    Args:
        ui: the widget's ``ui``.
        logic: the module logic (``BasalSegSAMLib.logic.SegmentationLogic``).
        parameterNode: returns the current parameter node (or None).
        showStatus: ``(text, error=False)``.
    """

    def __init__(self, ui, logic, parameterNode: Callable[[], object], showStatus: Callable[..., None]):
        self.ui = ui
        self.logic = logic
        self._parameterNode = parameterNode
        self._showStatus = showStatus

    def setup(self) -> None:
        self.ui.updateVolumesButton.clicked.connect(self.onUpdateVolumes)
        self.ui.exportSegNrrdButton.clicked.connect(lambda: self.onExport("seg.nrrd"))
        self.ui.exportNiftiButton.clicked.connect(lambda: self.onExport("nifti"))
        self.ui.exportCsvButton.clicked.connect(lambda: self.onExport("csv"))

    def updateButtons(self, enabled: bool) -> None:
        p = self._parameterNode()
        hasResult = p is not None and p.outputSegmentation is not None and p.inputVolume is not None
        for button in (self.ui.exportSegNrrdButton, self.ui.exportNiftiButton, self.ui.exportCsvButton,
                       self.ui.updateVolumesButton):
            button.setEnabled(hasResult and enabled)

    def followOutput(self) -> None:
        """Show the volumes table of the segmentation chosen as output (each has its own)."""
        p = self._parameterNode()
        if p is None:
            return
        table = self.logic.volumesTableFor(p.outputSegmentation) if p.outputSegmentation is not None else None
        # compare IDs, not Python wrappers: setting the parameter calls this again
        if _nodeId(table) != _nodeId(p.volumesTable):
            p.volumesTable = table
        if _nodeId(self.ui.volumesTableView.mrmlTableNode()) != _nodeId(table):
            self.ui.volumesTableView.setMRMLTableNode(table)

    def apply(self, result, volume, cacheMessage: str = "") -> bool:
        """Put a successful segment result into the scene; False when the user cancelled."""
        p = self._parameterNode()
        target = p.outputSegmentation
        onConflict = "new"
        note = ""
        conflicts = mrmlbridge.findConflictingSegments(target)
        if conflicts:
            if mrmlbridge.isUntouchedResult(target, volume):
                onConflict = "replace"
                note = _("The previous, unedited result in '{name}' was updated.").format(name=target.GetName())
            else:
                onConflict = askReplaceOrNew(target, conflicts)
                if onConflict is None:
                    self._showStatus(_("The result was discarded; nothing was changed."))
                    return False
        segmentation, table = self.logic.applySegmentResult(result, volume, target, onConflict)
        with slicer.util.NodeModify(p.parameterNode):
            p.outputSegmentation = segmentation
            p.volumesTable = table
        self.ui.volumesTableView.setMRMLTableNode(table)
        self.ui.resultsCollapsibleButton.setCollapsed(False)
        slicer.util.setSliceViewerLayers(background=volume)
        missing = [r["structure"] for r in result.volumeRows if r["voxels"] == 0]
        message = _("Done: '{name}'.").format(name=segmentation.GetName())
        for extra in (note, cacheMessage):
            if extra:
                message += " " + extra
        if missing:
            message += " " + _("Empty: {names}.").format(names=", ".join(missing))
        for flag in (result.provenance or {}).get("qc_flags") or []:  # e.g. partial_coverage
            if isinstance(flag, dict) and flag.get("message") and flag.get("kind") != "missing":  # listed above
                message += " " + _("QC {flag}: {message}").format(flag=flag.get("kind", ""), message=flag["message"])
        self._showStatus(message)
        return True

    def onUpdateVolumes(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not compute the volumes."), waitCursor=True):
            p = self._parameterNode()
            p.volumesTable = self.logic.updateVolumesTable(p.outputSegmentation, p.inputVolume)
            self.ui.volumesTableView.setMRMLTableNode(p.volumesTable)

    def onExport(self, fmt: str) -> None:
        p = self._parameterNode()
        suffix = EXPORT_FORMATS[fmt]
        filters = {"seg.nrrd": _("Slicer segmentation (*.seg.nrrd)"), "nifti": _("NIfTI labelmap (*.nii.gz *.nii)"),
                   "csv": _("Volumes (*.csv)")}[fmt]
        default = os.path.join(os.path.expanduser("~"), exportFileName(p.inputVolume.GetName(), fmt))
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Export"), default, filters)
        if not path:
            return
        overwrite = True  # the file dialog asked before choosing an existing file
        if not path.lower().endswith(suffix) and not (fmt == "nifti" and path.lower().endswith(".nii")):
            path += suffix  # a name the dialog did not see: ask here if it exists
            if os.path.exists(path):
                overwrite = slicer.util.confirmYesNoDisplay(
                    _("{path} already exists. Replace it?").format(path=path), windowTitle=_("Export"))
                if not overwrite:
                    return
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            written = self.logic.export(p.outputSegmentation, p.inputVolume, path, fmt, overwrite=overwrite)
            self._showStatus(_("Wrote {path}").format(path=written))
