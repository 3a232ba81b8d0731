"""Prompts as Markups: a ROI box per structure and slice, positive/negative points.

Geometry, stated once (prompt axes are those of ``basalseg.prompts``):

* A prompt lives on the **canonical grid** (``PromptSet.grid``): voxel ``[i, j, k]``, axial slice
  ``k``, ``x = i`` and ``y = j`` in voxel units; ``grid.affine`` maps ``(i, j, k, 1)`` to world RAS mm.
  Markups are in world RAS (the nodes made here are never under a transform), so a position goes
  through ``grid.affine`` and nothing else.
* A **box** ``[x0, y0, x1, y1]`` (inclusive pixel centres) becomes a ``vtkMRMLMarkupsROINode``
  that covers those pixels edge to edge: centre ``((x0 + x1) / 2, (y0 + y1) / 2, k)``, size
  ``(x1 - x0 + 1, y1 - y0 + 1, 1)`` voxels times the grid spacing, axes along the grid's axes.
  Back: ``x0 = cx - (sx - 1) / 2``, ``x1 = cx + (sx - 1) / 2`` (``sx`` in voxels), slice
  ``k = round(cz)``. The round trip is exact to float precision; boxes are clipped to the grid.
* A **point** ``[x, y]`` on slice ``k`` is the control point at ``grid.affine @ (x, y, k, 1)``.
  Its sign is stored in the control point's description (``"positive"`` / ``"negative"``; an
  empty description, e.g. a point just placed by the user, counts as positive) and shown as its
  label (``+`` / ``-``).
* Nodes carry attributes: ``BasalSegSAM.Role`` (``promptBox`` / ``promptPoints``),
  ``BasalSegSAM.Structure`` (the structure key) and, for a per-prompt box, ``BasalSegSAM.Slice``.

Two ways to use them:

* :func:`promptsToMarkups` / :func:`promptsFromMarkups`: one ROI per prompt and one point list per
  structure, for the whole prompt set (export, scripting, tests).
* :class:`PromptMarkupsEditor`: the module's interactive editor: one ROI and one point list per
  structure showing the prompts of the **current slice** only (the slice the Red view shows);
  :meth:`PromptMarkupsEditor.syncFromMarkups` reads the user's edits back into the prompt set.

MRML and numpy only (no Qt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np
import slicer
import vtk

from basalseg.structures import STRUCTURES, get_structure

if TYPE_CHECKING:  # pragma: no cover
    from basalseg.prompts import Prompt, PromptSet
    from basalseg.spatial import Grid

__all__ = [
    "roiGeometryFromBox",
    "boxFromRoiGeometry",
    "rasFromPixel",
    "pixelFromRas",
    "setRoiFromBox",
    "boxFromRoi",
    "promptsToMarkups",
    "promptsFromMarkups",
    "PromptMarkupNodes",
    "PromptMarkupsEditor",
    "removeWithDisplayNodes",
    "promptSetToJson",
    "promptSetFromJson",
    "ROLE_ATTRIBUTE",
    "STRUCTURE_ATTRIBUTE",
    "SLICE_ATTRIBUTE",
    "EDITOR_ATTRIBUTE",
    "POSITIVE",
    "NEGATIVE",
]

ROLE_ATTRIBUTE = "BasalSegSAM.Role"
STRUCTURE_ATTRIBUTE = "BasalSegSAM.Structure"
SLICE_ATTRIBUTE = "BasalSegSAM.Slice"
PRESENT_ATTRIBUTE = "BasalSegSAM.Present"
#: Set ("1") on the per-slice editor's nodes, so stale ones (e.g. from a reloaded scene) can be found.
EDITOR_ATTRIBUTE = "BasalSegSAM.Editor"
POSITIVE, NEGATIVE = "positive", "negative"
#: Margin (pixels) of the box made around points that were placed for a structure with no box.
AUTO_BOX_MARGIN = 5


# ---------------------------------------------------------------------------------------------
# geometry (numpy only)
# ---------------------------------------------------------------------------------------------


def _spacingAndDirections(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.sqrt((linear**2).sum(axis=0))
    return spacing, linear / spacing


def roiGeometryFromBox(box, k: float, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROI ``(center_ras, size_mm, directions)`` covering a box on slice ``k`` (see module docstring).

    ``directions`` is 3x3 with the grid's unit axis vectors as columns.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    spacing, directions = _spacingAndDirections(affine)
    centerVoxel = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0, float(k), 1.0])
    center = (np.asarray(affine, dtype=np.float64) @ centerVoxel)[:3]
    size = np.array([x1 - x0 + 1.0, y1 - y0 + 1.0, 1.0]) * spacing
    return center, size, directions


def boxFromRoiGeometry(center, size, affine: np.ndarray, shape: Optional[tuple[int, int, int]] = None
                       ) -> tuple[list[float], float]:
    """Inverse of :func:`roiGeometryFromBox`: ``(box, k_float)``.

    A ROI thinner than one pixel gives ``x0 == x1`` at its centre. With ``shape``, the box is
    clipped to the slice (``0..nx-1``, ``0..ny-1``).
    """
    spacing, _ = _spacingAndDirections(affine)
    voxel = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.array([*map(float, center), 1.0])
    half = np.maximum(np.asarray(size, dtype=np.float64)[:2] / spacing[:2] - 1.0, 0.0) / 2.0
    box = [voxel[0] - half[0], voxel[1] - half[1], voxel[0] + half[0], voxel[1] + half[1]]
    if shape is not None:
        nx, ny = shape[0], shape[1]
        box = [min(max(box[0], 0.0), nx - 1.0), min(max(box[1], 0.0), ny - 1.0),
               min(max(box[2], 0.0), nx - 1.0), min(max(box[3], 0.0), ny - 1.0)]
    return [float(v) for v in box], float(voxel[2])


def rasFromPixel(x: float, y: float, k: float, affine: np.ndarray) -> np.ndarray:
    """World RAS of pixel ``(x, y)`` on slice ``k`` of the grid ``affine``."""
    return (np.asarray(affine, dtype=np.float64) @ np.array([x, y, k, 1.0], dtype=np.float64))[:3]


def pixelFromRas(ras, affine: np.ndarray) -> tuple[float, float, float]:
    """``(x, y, k_float)`` of a world RAS position on the grid ``affine``."""
    voxel = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.array([*map(float, ras), 1.0])
    return float(voxel[0]), float(voxel[1]), float(voxel[2])


# ---------------------------------------------------------------------------------------------
# single nodes
# ---------------------------------------------------------------------------------------------


def _matrix(directions: np.ndarray, center: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(directions[r, c]))
        matrix.SetElement(r, 3, float(center[r]))
    return matrix


def setRoiFromBox(roiNode, box, k: float, grid: "Grid") -> None:
    """Place ``roiNode`` on a box of slice ``k`` (see module docstring)."""
    center, size, directions = roiGeometryFromBox(box, k, grid.affine)
    wasModifying = roiNode.StartModify()
    try:
        roiNode.SetAndObserveObjectToNodeMatrix(_matrix(directions, center))
        roiNode.SetSize(*size)
    finally:
        roiNode.EndModify(wasModifying)


def boxFromRoi(roiNode, grid: "Grid", clip: bool = True) -> tuple[list[float], float]:
    """``(box, k_float)`` of a ROI node on ``grid`` (clipped to the slice when ``clip``)."""
    center = np.array(roiNode.GetCenter(), dtype=np.float64)
    size = np.array(roiNode.GetSize(), dtype=np.float64)
    return boxFromRoiGeometry(center, size, grid.affine, tuple(grid.shape) if clip else None)


def _styleNode(node, structureKey: str, role: str) -> None:
    structure = get_structure(structureKey)
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.SetAttribute(STRUCTURE_ATTRIBUTE, structure.key)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is None:  # no display node class registered (bare scene)
        return
    color = structure.color_float
    display.SetSelectedColor(*color)
    display.SetColor(*color)
    if role == "promptBox":
        for setter, value in (("SetRotationHandleVisibility", False), ("SetFillOpacity", 0.08), ("SetOpacity", 1.0)):
            if hasattr(display, setter):
                getattr(display, setter)(value)
    else:
        for setter, value in (("SetTextScale", 3.0), ("SetGlyphScale", 2.0), ("SetPointLabelsVisibility", True)):
            if hasattr(display, setter):
                getattr(display, setter)(value)


def removeWithDisplayNodes(node) -> None:
    """Remove a displayable node and its display and storage nodes from its scene."""
    scene = node.GetScene()
    if scene is None:
        return
    owned = [node.GetNthDisplayNode(n) for n in range(node.GetNumberOfDisplayNodes())]
    owned += [node.GetNthStorageNode(n) for n in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for other in owned:
        if other is not None and other.GetScene() is not None:
            scene.RemoveNode(other)


def _setPoint(pointsNode, ras, positive: bool) -> int:
    index = pointsNode.AddControlPoint(vtk.vtkVector3d(*map(float, ras)), "+" if positive else "-")
    pointsNode.SetNthControlPointDescription(index, POSITIVE if positive else NEGATIVE)
    return index


def _pointsOf(pointsNode, grid: "Grid") -> list[tuple[float, float, float, int]]:
    """``(x, y, k_float, label)`` of every defined control point (label 1 positive, 0 negative)."""
    out = []
    position = [0.0, 0.0, 0.0]
    for n in range(pointsNode.GetNumberOfControlPoints()):
        if hasattr(pointsNode, "GetNthControlPointPositionStatus") and \
                pointsNode.GetNthControlPointPositionStatus(n) != pointsNode.PositionDefined:
            continue  # being placed, or skipped
        pointsNode.GetNthControlPointPositionWorld(n, position)
        x, y, kf = pixelFromRas(position, grid.affine)
        description = (pointsNode.GetNthControlPointDescription(n) or "").strip().lower()
        label = 0 if description == NEGATIVE or (not description and pointsNode.GetNthControlPointLabel(n) == "-") else 1
        out.append((x, y, kf, label))
    return out


def _clipPoint(x: float, y: float, grid: "Grid") -> list[float]:
    return [min(max(float(x), 0.0), grid.shape[0] - 1.0), min(max(float(y), 0.0), grid.shape[1] - 1.0)]


def _autoBox(points: list[list[float]], grid: "Grid", margin: int = AUTO_BOX_MARGIN) -> list[float]:
    xy = np.asarray(points, dtype=np.float64)
    return [max(float(xy[:, 0].min()) - margin, 0.0), max(float(xy[:, 1].min()) - margin, 0.0),
            min(float(xy[:, 0].max()) + margin, grid.shape[0] - 1.0), min(float(xy[:, 1].max()) + margin, grid.shape[1] - 1.0)]


def _sliceIndex(kFloat: float, grid: "Grid") -> int:
    return int(min(max(int(np.floor(kFloat + 0.5)), 0), grid.shape[2] - 1))


# ---------------------------------------------------------------------------------------------
# whole prompt sets, one ROI per prompt
# ---------------------------------------------------------------------------------------------


@dataclass
class PromptMarkupNodes:
    """The nodes of :func:`promptsToMarkups`: ``boxes[(structure, k)]`` and ``points[structure]``."""

    boxes: dict = field(default_factory=dict)
    points: dict = field(default_factory=dict)

    def allNodes(self) -> list:
        return list(self.boxes.values()) + list(self.points.values())

    def remove(self) -> None:
        """Remove every node from its scene."""
        for node in self.allNodes():
            removeWithDisplayNodes(node)
        self.boxes.clear()
        self.points.clear()


def promptsToMarkups(promptSet: "PromptSet", scene=None, namePrefix: str = "BasalSegSAM") -> PromptMarkupNodes:
    """One ``vtkMRMLMarkupsROINode`` per prompt and one ``vtkMRMLMarkupsFiducialNode`` per structure
    (holding the points of all its slices), coloured per structure, added to ``scene``."""
    scene = scene or slicer.mrmlScene
    nodes = PromptMarkupNodes()
    for prompt in sorted(promptSet.prompts, key=lambda p: (p.struct.class_index, p.slice)):
        structure = prompt.struct
        roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"{namePrefix} {structure.name} k{prompt.slice}")
        _styleNode(roi, structure.key, "promptBox")
        roi.SetAttribute(SLICE_ATTRIBUTE, str(int(prompt.slice)))
        setRoiFromBox(roi, prompt.box, prompt.slice, promptSet.grid)
        nodes.boxes[(structure.key, int(prompt.slice))] = roi
        if prompt.points:
            points = nodes.points.get(structure.key)
            if points is None:
                points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{namePrefix} {structure.name} points")
                _styleNode(points, structure.key, "promptPoints")
                nodes.points[structure.key] = points
            for (x, y), label in zip(prompt.points, prompt.point_labels):
                _setPoint(points, rasFromPixel(x, y, prompt.slice, promptSet.grid.affine), bool(label))
    return nodes


def promptsFromMarkups(nodes: "PromptMarkupNodes | Iterable", grid: "Grid", source: Optional[dict] = None) -> "PromptSet":
    """Read prompts back from ROI and point nodes (any made by :func:`promptsToMarkups`, or tagged alike).

    A box's slice is the ROI centre's slice; a point joins the prompt of its structure on its
    own slice, and points on a slice without a box for that structure get a box around them
    (``AUTO_BOX_MARGIN`` pixels). The result is validated.
    """
    from basalseg.prompts import Prompt, PromptSet

    nodeList = nodes.allNodes() if isinstance(nodes, PromptMarkupNodes) else list(nodes)
    prompts: dict[tuple[str, int], Prompt] = {}
    for node in nodeList:
        if node.GetAttribute(ROLE_ATTRIBUTE) != "promptBox":
            continue
        key = get_structure(node.GetAttribute(STRUCTURE_ATTRIBUTE)).key
        box, kFloat = boxFromRoi(node, grid)
        k = _sliceIndex(kFloat, grid)
        prompts[(key, k)] = Prompt(key, k, box, [], [])
    pending: dict[tuple[str, int], list] = {}
    for node in nodeList:
        if node.GetAttribute(ROLE_ATTRIBUTE) != "promptPoints":
            continue
        key = get_structure(node.GetAttribute(STRUCTURE_ATTRIBUTE)).key
        for x, y, kFloat, label in _pointsOf(node, grid):
            k = _sliceIndex(kFloat, grid)
            target = prompts.get((key, k))
            if target is None:
                pending.setdefault((key, k), []).append((_clipPoint(x, y, grid), label))
            else:
                target.points.append(_clipPoint(x, y, grid))
                target.point_labels.append(label)
    for (key, k), items in pending.items():
        points = [p for p, _ in items]
        prompts[(key, k)] = Prompt(key, k, _autoBox(points, grid), points, [lab for _, lab in items])
    return PromptSet(grid=grid, prompts=list(prompts.values()), source=dict(source or {})).validate()


# ---------------------------------------------------------------------------------------------
# JSON in the parameter node
# ---------------------------------------------------------------------------------------------


def promptSetToJson(promptSet: "PromptSet") -> str:
    """``prompts.json`` text of a prompt set (what the parameter node stores)."""
    return json.dumps(promptSet.to_dict(), indent=1)


def promptSetFromJson(text: str, name: str = "prompts") -> Optional["PromptSet"]:
    """Parse and validate ``prompts.json`` text; None for empty text.

    Raises:
        basalseg.errors.PromptsError: malformed text (the message names the problem).
    """
    from basalseg.errors import PromptsError
    from basalseg.prompts import prompts_from_dict

    if not text or not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptsError(f"{name}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    return prompts_from_dict(data, name)


# ---------------------------------------------------------------------------------------------
# the interactive, per-slice editor
# ---------------------------------------------------------------------------------------------


class PromptMarkupsEditor:
    """Shows one slice's prompts as Markups and reads edits back.

    Per structure there is one ROI node (its box on the current slice; hidden when the structure
    has no box there) and one point list (its points on the current slice). The prompt set is
    the truth; the nodes are a view of one slice of it:

    * :meth:`showSlice` puts slice ``k``'s prompts into the nodes.
    * :meth:`syncFromMarkups` reads the nodes back into the prompt set for the current slice: a
      moved or resized box, added, moved or deleted points. The slice of an edited prompt stays
      the current slice (a box dragged along the slice normal snaps back). Points placed for a
      structure with no box get a box around them; a box node deleted from the scene deletes
      that prompt.
    * :meth:`addBox`, :meth:`deleteBox`, :meth:`addPoint` edit programmatically.

    While the editor itself changes nodes, :attr:`updating` is True, so observers (the widget)
    can ignore those events.

    Args:
        promptSet: the prompts to edit (edited in place).
        scene: the MRML scene (default ``slicer.mrmlScene``).
        namePrefix: node name prefix.
    """

    def __init__(self, promptSet: "PromptSet", scene=None, namePrefix: str = "BasalSegSAM"):
        self.scene = scene or slicer.mrmlScene
        self.promptSet = promptSet
        self.namePrefix = namePrefix
        self.currentSlice: Optional[int] = None
        self.updating = False
        self._boxIds: dict[str, str] = {}
        self._pointIds: dict[str, str] = {}

    # -- nodes --------------------------------------------------------------------------------
    def _get(self, ids: dict, key: str):
        nodeId = ids.get(key)
        node = self.scene.GetNodeByID(nodeId) if nodeId else None
        return node

    def boxNode(self, key: str, create: bool = True):
        """The ROI node of a structure (made on first use)."""
        key = get_structure(key).key
        node = self._get(self._boxIds, key)
        if node is None and create:
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"{self.namePrefix} box {get_structure(key).name}")
            _styleNode(node, key, "promptBox")
            node.SetAttribute(EDITOR_ATTRIBUTE, "1")
            node.SetAttribute(PRESENT_ATTRIBUTE, "0")
            self._setVisible(node, False)
            self._boxIds[key] = node.GetID()
        return node

    def pointsNode(self, key: str, create: bool = True):
        """The point list of a structure (made on first use)."""
        key = get_structure(key).key
        node = self._get(self._pointIds, key)
        if node is None and create:
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{self.namePrefix} points {get_structure(key).name}")
            _styleNode(node, key, "promptPoints")
            node.SetAttribute(EDITOR_ATTRIBUTE, "1")
            self._pointIds[key] = node.GetID()
        return node

    def nodes(self) -> list:
        """Every node the editor made that is still in the scene."""
        out = [self._get(self._boxIds, k) for k in self._boxIds] + [self._get(self._pointIds, k) for k in self._pointIds]
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
        """Remove editor nodes no editor owns any more (e.g. saved with a scene: the editor is
        rebuilt from the prompts.json text in the parameter node). Returns how many were removed."""
        stale = []
        for className in ("vtkMRMLMarkupsROINode", "vtkMRMLMarkupsFiducialNode"):
            nodes = scene.GetNodesByClass(className)
            for n in range(nodes.GetNumberOfItems()):
                node = nodes.GetItemAsObject(n)
                if node.GetAttribute(EDITOR_ATTRIBUTE) == "1":
                    stale.append(node)
        for node in stale:
            removeWithDisplayNodes(node)
        return len(stale)

    @staticmethod
    def _setVisible(node, visible: bool) -> None:
        display = node.GetDisplayNode()
        if display is not None:
            display.SetVisibility(bool(visible))

    # -- slices -------------------------------------------------------------------------------
    def sliceFromRas(self, ras) -> Optional[int]:
        """Canonical slice index of a world position; None when it lies outside the grid."""
        _, _, kFloat = pixelFromRas(ras, self.promptSet.grid.affine)
        k = int(np.floor(kFloat + 0.5))
        return k if 0 <= k < self.promptSet.grid.shape[2] else None

    def sliceRas(self, k: int) -> np.ndarray:
        """World RAS of the centre of slice ``k`` (to move a slice view there)."""
        nx, ny, _ = self.promptSet.grid.shape
        return rasFromPixel((nx - 1) / 2.0, (ny - 1) / 2.0, k, self.promptSet.grid.affine)

    def _prompt(self, key: str, k: int):
        return next((p for p in self.promptSet.prompts if p.structure == key and p.slice == k), None)

    def showSlice(self, k: Optional[int]) -> None:
        """Show slice ``k``'s prompts (None hides every box and point)."""
        self.updating = True
        try:
            self.currentSlice = None if k is None else int(k)
            for s in STRUCTURES:
                prompt = None if k is None else self._prompt(s.key, int(k))
                roi = self.boxNode(s.key, create=prompt is not None)
                if roi is not None:
                    if prompt is not None:
                        setRoiFromBox(roi, prompt.box, prompt.slice, self.promptSet.grid)
                    roi.SetAttribute(PRESENT_ATTRIBUTE, "1" if prompt is not None else "0")
                    self._setVisible(roi, prompt is not None)
                points = self.pointsNode(s.key, create=bool(prompt is not None and prompt.points))
                if points is not None:
                    wasModifying = points.StartModify()
                    points.RemoveAllControlPoints()
                    if prompt is not None:
                        for (x, y), label in zip(prompt.points, prompt.point_labels):
                            _setPoint(points, rasFromPixel(x, y, prompt.slice, self.promptSet.grid.affine), bool(label))
                    points.EndModify(wasModifying)
        finally:
            self.updating = False

    def refresh(self) -> None:
        """Show the current slice again (after the prompt set changed)."""
        self.showSlice(self.currentSlice)

    def setPromptSet(self, promptSet: "PromptSet") -> None:
        """Edit another prompt set (e.g. freshly generated), keeping the current slice."""
        self.promptSet = promptSet
        self.refresh()

    # -- reading edits back --------------------------------------------------------------------
    def syncFromMarkups(self) -> bool:
        """Read the current slice's nodes back into the prompt set; True when anything changed."""
        from basalseg.prompts import Prompt

        k = self.currentSlice
        if k is None:
            return False
        grid = self.promptSet.grid
        changed = False
        for s in STRUCTURES:
            old = self._prompt(s.key, k)
            roi = self.boxNode(s.key, create=False)
            pointsNode = self.pointsNode(s.key, create=False)
            points, labels = [], []
            if pointsNode is not None:
                for x, y, _, label in _pointsOf(pointsNode, grid):
                    points.append(_clipPoint(x, y, grid))
                    labels.append(label)
            present = roi is not None and roi.GetAttribute(PRESENT_ATTRIBUTE) == "1"
            if present:
                box, _ = boxFromRoi(roi, grid)
            elif points:
                box = _autoBox(points, grid)
            else:
                box = None
            if box is None:
                if old is not None:  # its box node was deleted
                    self.promptSet.prompts.remove(old)
                    changed = True
                continue
            new = Prompt(s.key, k, box, points, labels)
            if old is None or old.to_dict() != new.to_dict():
                if old is not None:
                    self.promptSet.prompts.remove(old)
                self.promptSet.prompts.append(new)
                changed = True
            self._showPrompt(new)  # an auto box appears; a ROI dragged off its slice snaps back
        if changed:
            self.promptSet.validate()
        return changed

    def _showPrompt(self, prompt: "Prompt") -> None:
        self.updating = True
        try:
            roi = self.boxNode(prompt.structure)
            setRoiFromBox(roi, prompt.box, prompt.slice, self.promptSet.grid)
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
        grid = self.promptSet.grid
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

    def addPoint(self, key: str, ras, positive: bool = True) -> None:
        """Add a point at world ``ras`` to a structure's prompt on the current slice (a box is made
        around it when the structure has none there)."""
        if self.currentSlice is None:
            raise ValueError("no current slice")
        self.updating = True
        try:
            _setPoint(self.pointsNode(key), ras, positive)
        finally:
            self.updating = False
        self.syncFromMarkups()

    def labelNewPoints(self, key: str, positive: bool) -> None:
        """Give points that have no sign yet (just placed by the user) the sign ``positive``."""
        node = self.pointsNode(key, create=False)
        if node is None:
            return
        self.updating = True
        try:
            for n in range(node.GetNumberOfControlPoints()):
                if not (node.GetNthControlPointDescription(n) or "").strip():
                    node.SetNthControlPointDescription(n, POSITIVE if positive else NEGATIVE)
                    node.SetNthControlPointLabel(n, "+" if positive else "-")
        finally:
            self.updating = False
