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

Here: :func:`promptsToMarkups` / :func:`promptsFromMarkups`, one ROI per prompt and one point
list per structure for the whole prompt set (export, scripting, tests). The module's interactive
per-slice editor, built on the same geometry, is :mod:`.prompteditor`.

MRML and numpy only (no Qt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np
import slicer
import vtk

from basalseg.structures import get_structure

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


def slicePlaneOfGrid(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(normal, transverse)`` unit vectors (world RAS) of the grid's slices ``k``: the normal of
    the plane spanned by the ``x`` and ``y`` axes (on the ``k`` axis's side; the ``k`` axis itself
    for an orthogonal grid, not for a sheared one) and the ``x`` (= ``i``) axis. For a canonical
    grid they are S and R (an axial view); for a localised image's prompts (``PromptSet.world_grid``)
    the template's axes in the head's pose and shape (affine since 2026-12-07)."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    normal = np.cross(linear[:, 0], linear[:, 1])
    if float(normal @ linear[:, 2]) < 0:
        normal = -normal
    transverse = linear[:, 0]
    return normal / np.linalg.norm(normal), transverse / np.linalg.norm(transverse)


def viewShowsGridSlices(sliceToRas: np.ndarray, affine: np.ndarray, tolerance: float = 1e-3) -> bool:
    """Whether a slice view (its 4x4 SliceToRAS) lies in the plane of the grid's slices ``k``."""
    normal, _ = slicePlaneOfGrid(affine)
    viewNormal = np.asarray(sliceToRas, dtype=np.float64)[:3, 2]
    viewNormal = viewNormal / np.linalg.norm(viewNormal)
    return abs(float(viewNormal @ normal)) > 1.0 - tolerance


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


def _pointsOf(pointsNode, grid: "Grid", defaultPositive: bool = True) -> list[tuple[float, float, float, int]]:
    """``(x, y, k_float, label)`` of every defined control point (label 1 positive, 0 negative).

    A point without a sign of its own (just placed) takes the node's: ``defaultPositive``."""
    out = []
    position = [0.0, 0.0, 0.0]
    for n in range(pointsNode.GetNumberOfControlPoints()):
        if hasattr(pointsNode, "GetNthControlPointPositionStatus") and \
                pointsNode.GetNthControlPointPositionStatus(n) != pointsNode.PositionDefined:
            continue  # being placed, or skipped
        pointsNode.GetNthControlPointPositionWorld(n, position)
        x, y, kf = pixelFromRas(position, grid.affine)
        description = (pointsNode.GetNthControlPointDescription(n) or "").strip().lower()
        if description in (POSITIVE, NEGATIVE):
            label = 1 if description == POSITIVE else 0
        else:
            mark = pointsNode.GetNthControlPointLabel(n)
            label = 0 if mark == "-" else 1 if mark == "+" else int(bool(defaultPositive))
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
