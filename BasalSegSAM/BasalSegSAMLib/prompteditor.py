"""The module's interactive prompt editor: one axial slice of the prompts as Markups.

Geometry and node tags are those of :mod:`.promptmarkups` (canonical grid, boxes as
``vtkMRMLMarkupsROINode``, points as control points in world RAS). The editor shows the prompts
of the **current slice** only; per structure it has one ROI node and two point lists, one for
positive and one for negative points, so negative points have their own colour and glyph
(:data:`NEGATIVE_COLOR`, a cross) instead of differing only by a ``-`` label.

What keeps editing from going wrong:

* :meth:`PromptMarkupsEditor.setActiveStructure`: only the chosen structure's nodes are
  interactive (unlocked, ROI handles on); the others are locked, handles off, drawn fainter.
* :meth:`PromptMarkupsEditor.syncFromMarkups` maps a point by where it really is: a point placed
  in another view (another slice) joins the prompt of **its own** slice; one outside the grid is
  dropped. The :class:`SyncReport` says what changed so the widget can tell the user.
* :meth:`PromptMarkupsEditor.isEdited` compares a prompt with the generated (or loaded) one, so
  the table can mark edits, and :class:`PromptHistory` keeps snapshots for Undo.
* Every node is kept out of saved scenes (``SetSaveWithScene(False)``): the prompts live as
  ``prompts.json`` text in the parameter node and the nodes are rebuilt from it.

MRML and numpy only (no Qt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

from basalseg.structures import STRUCTURES, get_structure

from .promptmarkups import (
    EDITOR_ATTRIBUTE, NEGATIVE, POSITIVE, PRESENT_ATTRIBUTE, _autoBox, _clipPoint, _pointsOf, _setPoint, _styleNode,
    boxFromRoi, pixelFromRas, rasFromPixel, removeWithDisplayNodes, setRoiFromBox,
)

if TYPE_CHECKING:  # pragma: no cover
    from basalseg.prompts import Prompt, PromptSet

__all__ = ["PromptMarkupsEditor", "PromptHistory", "SyncReport", "SIGN_ATTRIBUTE", "NEGATIVE_COLOR"]

#: Attribute of an editor point list: ``"positive"`` or ``"negative"``.
SIGN_ATTRIBUTE = "BasalSegSAM.Sign"
#: Colour of every negative point (no structure has it: FreeSurfer's are green, blues and magenta).
NEGATIVE_COLOR = (1.0, 0.85, 0.0)
#: Opacity of the boxes and points of structures other than the active one.
INACTIVE_OPACITY = 0.45


@dataclass
class SyncReport:
    """What :meth:`PromptMarkupsEditor.syncFromMarkups` changed (truthy when anything did).

    Attributes:
        changed: ``(structure, slice)`` of every prompt that was edited, added or removed.
        moved: ``(structure, slice)`` of prompts that received points placed off the current slice.
        dropped: number of points placed outside the prompt grid (not kept).
    """

    changed: list = field(default_factory=list)
    moved: list = field(default_factory=list)
    dropped: int = 0

    def __bool__(self) -> bool:
        return bool(self.changed or self.dropped)


class PromptHistory:
    """Snapshots of a prompt set (its ``prompts.json`` dict) for Undo, newest last."""

    def __init__(self, depth: int = 50):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self._stack: list[dict] = []

    def push(self, snapshot: dict) -> None:
        self._stack.append(snapshot)
        del self._stack[:-self.depth]

    def pop(self) -> Optional[dict]:
        return self._stack.pop() if self._stack else None

    def clear(self) -> None:
        self._stack.clear()

    def __len__(self) -> int:
        return len(self._stack)


def _signature(prompt: "Prompt") -> dict:
    return prompt.to_dict()


class PromptMarkupsEditor:
    """Shows one slice's prompts as Markups and reads edits back (see module docstring).

    Args:
        promptSet: the prompts to edit (edited in place).
        scene: the MRML scene (default ``slicer.mrmlScene``).
        namePrefix: node name prefix.
    """

    def __init__(self, promptSet: "PromptSet", scene=None, namePrefix: str = "BasalSegSAM"):
        if scene is None:
            import slicer

            scene = slicer.mrmlScene
        self.scene = scene
        self.promptSet = promptSet
        self.namePrefix = namePrefix
        self.currentSlice: Optional[int] = None
        self.activeStructure: Optional[str] = None
        self.visible = True
        self.updating = False
        self._boxIds: dict[str, str] = {}
        self._pointIds: dict[tuple[str, bool], str] = {}
        self._reference: dict[tuple[str, int], dict] = {}
        self.markReference()

    # -- reference (what was generated or loaded) -----------------------------------------------
    def markReference(self) -> None:
        """Take the prompts as they are now as the unedited ones (after Generate or Load)."""
        self._reference = {(p.structure, int(p.slice)): _signature(p) for p in self.promptSet.prompts}

    def isEdited(self, prompt: "Prompt") -> bool:
        """True when ``prompt`` differs from (or is missing in) the generated prompts."""
        return self._reference.get((prompt.structure, int(prompt.slice))) != _signature(prompt)

    def editedCount(self) -> int:
        """Prompts edited or added, plus generated prompts that were deleted."""
        now = {(p.structure, int(p.slice)) for p in self.promptSet.prompts}
        return sum(1 for p in self.promptSet.prompts if self.isEdited(p)) + len(set(self._reference) - now)

    def snapshot(self) -> dict:
        """The prompt set as a ``prompts.json`` dict (for :class:`PromptHistory`)."""
        return self.promptSet.to_dict()

    def restore(self, snapshot: dict) -> None:
        """Put a snapshot back (Undo), keeping the reference and the current slice."""
        from basalseg.prompts import prompts_from_dict

        self.promptSet.prompts[:] = prompts_from_dict(snapshot, "undo").prompts
        self.refresh()

    # -- nodes ----------------------------------------------------------------------------------
    def _get(self, nodeId: Optional[str]):
        return self.scene.GetNodeByID(nodeId) if nodeId else None

    def _prepare(self, node, key: str) -> None:
        node.SetAttribute(EDITOR_ATTRIBUTE, "1")
        node.SetSaveWithScene(False)  # rebuilt from the parameter node's prompts.json
        for n in range(node.GetNumberOfDisplayNodes()):
            display = node.GetNthDisplayNode(n)
            if display is not None:
                display.SetSaveWithScene(False)
        self._applyInteraction(node, key)

    def boxNode(self, key: str, create: bool = True):
        """The ROI node of a structure (made on first use)."""
        key = get_structure(key).key
        node = self._get(self._boxIds.get(key))
        if node is None and create:
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"{self.namePrefix} box {get_structure(key).name}")
            _styleNode(node, key, "promptBox")
            node.SetAttribute(PRESENT_ATTRIBUTE, "0")
            self._boxIds[key] = node.GetID()
            self._prepare(node, key)
            self._setVisible(node, False)
        return node

    def pointsNode(self, key: str, positive: bool = True, create: bool = True):
        """The positive or negative point list of a structure (made on first use)."""
        key = get_structure(key).key
        node = self._get(self._pointIds.get((key, bool(positive))))
        if node is None and create:
            sign = POSITIVE if positive else NEGATIVE
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                                f"{self.namePrefix} {sign} points {get_structure(key).name}")
            _styleNode(node, key, "promptPoints")
            node.SetAttribute(SIGN_ATTRIBUTE, sign)
            if hasattr(node, "SetMarkupLabelFormat"):
                node.SetMarkupLabelFormat("+" if positive else "-")  # a placed point is labelled by its sign
            display = node.GetDisplayNode()
            if display is not None and not positive:
                display.SetSelectedColor(*NEGATIVE_COLOR)
                display.SetColor(*NEGATIVE_COLOR)
                if hasattr(display, "SetGlyphTypeFromString"):
                    display.SetGlyphTypeFromString("Cross2D")
            self._pointIds[(key, bool(positive))] = node.GetID()
            self._prepare(node, key)
        return node

    def _pointNodes(self, key: str) -> list:
        return [(n, positive) for positive in (True, False)
                if (n := self.pointsNode(key, positive, create=False)) is not None]

    def nodes(self) -> list:
        """Every node the editor made that is still in the scene."""
        out = [self._get(i) for i in self._boxIds.values()] + [self._get(i) for i in self._pointIds.values()]
        return [n for n in out if n is not None]

    def removeNodes(self) -> None:
        """Remove the editor's nodes from the scene (the prompt set is kept)."""
        self.updating = True
        try:
            for node in self.nodes():
                removeWithDisplayNodes(node)
        finally:
            self.updating = False
        self._boxIds.clear()
        self._pointIds.clear()

    @staticmethod
    def removeStaleNodes(scene) -> int:
        """Remove editor nodes no editor owns any more (e.g. from a scene saved by an older
        version). Returns how many were removed."""
        stale = []
        for className in ("vtkMRMLMarkupsROINode", "vtkMRMLMarkupsFiducialNode"):
            collection = scene.GetNodesByClass(className)
            try:
                for n in range(collection.GetNumberOfItems()):
                    node = collection.GetItemAsObject(n)
                    if node.GetAttribute(EDITOR_ATTRIBUTE) == "1":
                        stale.append(node)
            finally:
                collection.UnRegister(None)  # GetNodesByClass hands over a reference of its own
        for node in stale:
            removeWithDisplayNodes(node)
        return len(stale)

    def _setVisible(self, node, visible: bool) -> None:
        display = node.GetDisplayNode()
        if display is not None:
            display.SetVisibility(bool(visible) and self.visible)

    # -- which structure is editable -----------------------------------------------------------
    def _applyInteraction(self, node, key: str) -> None:
        editable = self.visible and key == self.activeStructure
        node.SetLocked(not editable)
        display = node.GetDisplayNode()
        if display is None:
            return
        if hasattr(display, "SetHandlesInteractive"):
            display.SetHandlesInteractive(editable and node.IsA("vtkMRMLMarkupsROINode"))
        display.SetOpacity(1.0 if editable or self.activeStructure is None else INACTIVE_OPACITY)

    def setActiveStructure(self, key: Optional[str]) -> None:
        """Make only ``key``'s box and points editable (None: none is)."""
        self.activeStructure = None if key is None else get_structure(key).key
        for s in STRUCTURES:
            for node in [self.boxNode(s.key, create=False)] + [n for n, _ in self._pointNodes(s.key)]:
                if node is not None:
                    self._applyInteraction(node, s.key)

    def setShown(self, shown: bool) -> None:
        """Hide (and lock) every node, e.g. while the module is not the current one; or show again."""
        self.visible = bool(shown)
        self.refresh()
        self.setActiveStructure(self.activeStructure)

    # -- slices -------------------------------------------------------------------------------
    def sliceFromRas(self, ras) -> Optional[int]:
        """Canonical slice index of a world position; None when it lies outside the grid."""
        _, _, kFloat = pixelFromRas(ras, self.promptSet.world_grid().affine)
        k = int(np.floor(kFloat + 0.5))
        return k if 0 <= k < self.promptSet.world_grid().shape[2] else None

    def sliceRas(self, k: int) -> np.ndarray:
        """World RAS of the centre of slice ``k`` (to move a slice view there)."""
        nx, ny, _ = self.promptSet.world_grid().shape
        return rasFromPixel((nx - 1) / 2.0, (ny - 1) / 2.0, k, self.promptSet.world_grid().affine)

    def sliceOffsetMm(self, k: int) -> float:
        """The axial slice's S coordinate in mm: what Slicer's Red slice offset shows there."""
        return float(self.sliceRas(k)[2])

    def neighbourSlice(self, step: int) -> Optional[int]:
        """The next (``step`` > 0) or previous prompted slice from the current one, else None."""
        slices = self.promptSet.slices()
        if not slices:
            return None
        here = self.currentSlice
        if here is None:
            return slices[0] if step > 0 else slices[-1]
        after = [k for k in slices if (k > here if step > 0 else k < here)]
        return (min(after) if step > 0 else max(after)) if after else None

    def _prompt(self, key: str, k: int):
        return next((p for p in self.promptSet.prompts if p.structure == key and p.slice == k), None)

    def showSlice(self, k: Optional[int]) -> None:
        """Show slice ``k``'s prompts (None hides every box and point)."""
        self.updating = True
        try:
            self.currentSlice = None if k is None else int(k)
            grid = self.promptSet.world_grid()
            for s in STRUCTURES:
                prompt = None if k is None else self._prompt(s.key, int(k))
                roi = self.boxNode(s.key, create=prompt is not None)
                if roi is not None:
                    if prompt is not None:
                        setRoiFromBox(roi, prompt.box, prompt.slice, grid)
                    roi.SetAttribute(PRESENT_ATTRIBUTE, "1" if prompt is not None else "0")
                    self._setVisible(roi, prompt is not None)
                for positive in (True, False):
                    wanted = [] if prompt is None else [xy for xy, lab in zip(prompt.points, prompt.point_labels)
                                                        if bool(lab) == positive]
                    node = self.pointsNode(s.key, positive, create=bool(wanted))
                    if node is None:
                        continue
                    wasModifying = node.StartModify()
                    node.RemoveAllControlPoints()
                    for x, y in wanted:
                        _setPoint(node, rasFromPixel(x, y, prompt.slice, grid.affine), positive)
                    node.EndModify(wasModifying)
                    self._setVisible(node, True)
        finally:
            self.updating = False

    def refresh(self) -> None:
        """Show the current slice again (after the prompt set changed)."""
        self.showSlice(self.currentSlice)

    def setPromptSet(self, promptSet: "PromptSet") -> None:
        """Edit another prompt set (e.g. freshly generated, which becomes the reference)."""
        self.promptSet = promptSet
        self.markReference()
        self.refresh()

    # -- reading edits back --------------------------------------------------------------------
    def syncFromMarkups(self) -> SyncReport:
        """Read the current slice's nodes back into the prompt set (see module docstring)."""
        from basalseg.prompts import Prompt

        report = SyncReport()
        k = self.currentSlice
        if k is None:
            return report
        grid = self.promptSet.world_grid()
        elsewhere: dict[tuple[str, int], list] = {}
        for s in STRUCTURES:
            old = self._prompt(s.key, k)
            roi = self.boxNode(s.key, create=False)
            points, labels = [], []
            for node, positive in self._pointNodes(s.key):
                for x, y, kFloat, label in _pointsOf(node, grid, defaultPositive=positive):
                    kk = int(np.floor(kFloat + 0.5))
                    if kk == k:
                        points.append(_clipPoint(x, y, grid))
                        labels.append(label)
                    elif 0 <= kk < grid.shape[2]:
                        elsewhere.setdefault((s.key, kk), []).append((_clipPoint(x, y, grid), label))
                    else:
                        report.dropped += 1
            present = roi is not None and roi.GetAttribute(PRESENT_ATTRIBUTE) == "1"
            box = boxFromRoi(roi, grid)[0] if present else (_autoBox(points, grid) if points else None)
            if box is None:
                if old is not None:  # its box node was deleted
                    self.promptSet.prompts.remove(old)
                    report.changed.append((s.key, k))
                continue
            new = Prompt(s.key, k, box, points, labels)
            if old is None or old.to_dict() != new.to_dict():
                if old is not None:
                    self.promptSet.prompts.remove(old)
                self.promptSet.prompts.append(new)
                report.changed.append((s.key, k))
            self._showPrompt(new)  # an auto box appears; a ROI dragged off its slice snaps back
        for (key, kk), items in elsewhere.items():
            target = self._prompt(key, kk)
            if target is None:
                pts = [p for p, _ in items]
                self.promptSet.prompts.append(Prompt(key, kk, _autoBox(pts, grid), pts, [lab for _, lab in items]))
            else:
                for p, lab in items:
                    target.points.append(p)
                    target.point_labels.append(lab)
            report.changed.append((key, kk))
            report.moved.append((key, kk))
        if report:
            self.promptSet.validate()
        if report.moved or report.dropped:
            self.refresh()  # the moved points leave this slice's nodes
        return report

    def _showPrompt(self, prompt: "Prompt") -> None:
        self.updating = True
        try:
            roi = self.boxNode(prompt.structure)
            setRoiFromBox(roi, prompt.box, prompt.slice, self.promptSet.world_grid())
            roi.SetAttribute(PRESENT_ATTRIBUTE, "1")
            self._setVisible(roi, True)
        finally:
            self.updating = False

    # -- programmatic edits --------------------------------------------------------------------
    def addBox(self, key: str, k: Optional[int] = None, box: Optional[list] = None) -> "Prompt":
        """Add (or replace) a structure's box on slice ``k`` (default: the current slice).

        Without ``box``, the structure's box on the nearest slice is copied; without any, a
        20x20-pixel box at the centre of the slice is used.
        """
        from basalseg.prompts import Prompt

        key = get_structure(key).key
        k = self.currentSlice if k is None else int(k)
        if k is None:
            raise ValueError("no current slice: show a slice first or pass k")
        grid = self.promptSet.world_grid()
        if box is None:
            others = self.promptSet.for_structure(key)
            if others:
                box = list(min(others, key=lambda p: abs(p.slice - k)).box)
            else:
                cx, cy = (grid.shape[0] - 1) / 2.0, (grid.shape[1] - 1) / 2.0
                box = [max(cx - 10, 0.0), max(cy - 10, 0.0), min(cx + 10, grid.shape[0] - 1.0), min(cy + 10, grid.shape[1] - 1.0)]
        old = self._prompt(key, k)
        prompt = Prompt(key, k, [float(v) for v in box], list(old.points) if old else [], list(old.point_labels) if old else [])
        if old is not None:
            self.promptSet.prompts.remove(old)
        self.promptSet.prompts.append(prompt)
        self.promptSet.validate()
        if k == self.currentSlice:
            self.refresh()
        return prompt

    def deleteBox(self, key: str, k: Optional[int] = None) -> bool:
        """Delete a structure's prompt (box and points) on slice ``k`` (default: current)."""
        key = get_structure(key).key
        k = self.currentSlice if k is None else int(k)
        old = None if k is None else self._prompt(key, k)
        if old is None:
            return False
        self.promptSet.prompts.remove(old)
        if k == self.currentSlice:
            self.refresh()
        return True

    def addPoint(self, key: str, ras, positive: bool = True) -> SyncReport:
        """Add a point at world ``ras`` to a structure's prompt (on the slice where it lies; a box
        is made around it when the structure has none there)."""
        if self.currentSlice is None:
            raise ValueError("no current slice")
        self.updating = True
        try:
            _setPoint(self.pointsNode(key, positive), ras, positive)
        finally:
            self.updating = False
        return self.syncFromMarkups()
