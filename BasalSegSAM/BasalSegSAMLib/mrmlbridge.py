"""Between MRML nodes and the pipeline's arrays: volumes, labelmaps, segmentations, tables.

Axis order, stated once (the same as ``basalseg.imageio``):

* Pipeline arrays are indexed ``[i, j, k]`` (IJK, the volume's voxel axes) with a 4x4
  ``affine`` mapping ``(i, j, k, 1)`` to **world RAS** millimetres.
* Slicer's ``slicer.util.arrayFromVolume`` gives ``[k, j, i]``; this module transposes with
  ``.transpose(2, 1, 0)`` in both directions and nowhere else.
* The affine is the volume's ``IJKToRAS`` matrix, times its parent transform's matrix to world
  when the volume sits under a **linear** transform (a non-linear one must be hardened first).
  A segmentation made here goes under the same parent transform as its volume and stores its
  labelmaps in the volume's own (node) coordinates, so it overlays the volume exactly. An
  **existing** segmentation keeps its parent transform and reference geometry (its other
  segments never move): the labels are written in its own node coordinates,
  ``inverse(segmentation parent to world) @ volume world affine``, and Slicer resamples them onto
  its geometry.

Segments are named and coloured from ``basalseg.structures`` (FreeSurfer names ``Left-Putamen``
and colours) and tagged with their FreeSurfer label value (segment tag ``BasalSegSAM.Label``).
A new segmentation node is made by default; existing segments are never overwritten unless
``onConflict="replace"`` is asked for (the widget asks the user first).

Only MRML (``slicer``, ``vtk``) and numpy are used: no Qt, so this runs with ``slicer-core``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from basalseg.imageio import Volume
from basalseg.outputs import VOLUME_COLUMNS, volume_rows
from basalseg.structures import STRUCTURES, Structure

__all__ = [
    "worldAffine",
    "volumeFromNode",
    "ijkToRasOfNode",
    "writeVolumeNifti",
    "labelsToSegmentation",
    "labelsFromSegmentation",
    "findConflictingSegments",
    "volumesToTable",
    "tableRows",
    "SegmentConflictError",
    "labelsDigest",
    "isUntouchedResult",
    "volumesTableOf",
    "LABEL_TAG",
    "TABLE_REFERENCE",
    "INPUT_REFERENCE",
    "DIGEST_ATTRIBUTE",
    "NODE_ATTRIBUTE",
]

#: Segment tag holding a segment's FreeSurfer label value.
LABEL_TAG = "BasalSegSAM.Label"
#: Node attribute set on every node this module creates (value: its role).
NODE_ATTRIBUTE = "BasalSegSAM.Role"
#: Node reference from a segmentation to its volumes table (one table per segmentation).
TABLE_REFERENCE = "BasalSegSAM.VolumesTable"
#: Node reference from a segmentation to the volume its structure segments were computed on.
INPUT_REFERENCE = "BasalSegSAM.InputVolume"
#: Attribute: sha1 of the labelmap this module last wrote into a segmentation.
DIGEST_ATTRIBUTE = "BasalSegSAM.LabelsDigest"


class SegmentConflictError(ValueError):
    """The target segmentation already has segments with the structures' names."""


# ---------------------------------------------------------------------------------------------
# volumes
# ---------------------------------------------------------------------------------------------


def _matrixToArray(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _arrayToMatrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijkToRasOfNode(volumeNode) -> np.ndarray:
    """The node's own ``IJKToRAS`` matrix (node coordinates, no parent transform), 4x4."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return _matrixToArray(matrix)


def _parentToWorld(node) -> np.ndarray:
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise ValueError(f"'{node.GetName()}' is under a non-linear transform; harden the transform first")
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return _matrixToArray(matrix)


def worldAffine(volumeNode) -> np.ndarray:
    """Voxel ``(i, j, k, 1)`` -> world RAS mm: parent transform (linear only) times ``IJKToRAS``."""
    return _parentToWorld(volumeNode) @ ijkToRasOfNode(volumeNode)


def volumeFromNode(volumeNode, dtype=np.float32) -> Volume:
    """A scalar volume node as a ``basalseg`` :class:`~basalseg.imageio.Volume`.

    Args:
        volumeNode: ``vtkMRMLScalarVolumeNode`` (or labelmap) with image data.
        dtype: array type of ``Volume.data`` (float32 for the pipeline; None keeps the node's).

    Returns:
        ``Volume`` with ``data[i, j, k]`` (a copy) and the world ``affine``.

    Raises:
        ValueError: no node, no image data, not 3D scalar, or a non-linear parent transform.
    """
    if volumeNode is None:
        raise ValueError("no input volume selected")
    if volumeNode.GetImageData() is None:
        raise ValueError(f"volume '{volumeNode.GetName()}' has no image data")
    if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{volumeNode.GetName()}' has several components per voxel; a scalar T1 volume is needed")
    kji = slicer.util.arrayFromVolume(volumeNode)
    data = np.array(kji.transpose(2, 1, 0), dtype=dtype, copy=True) if dtype is not None else np.array(kji.transpose(2, 1, 0))
    return Volume(data=data, affine=worldAffine(volumeNode), path=None,
                  meta={"format": "mrml", "node": volumeNode.GetName(), "dtype": str(kji.dtype)})


_NIFTI_DTYPES = {np.dtype(t) for t in ("uint8", "int8", "int16", "uint16", "int32", "uint32", "float32", "float64")}


def writeVolumeNifti(volumeNode, path: str) -> np.ndarray:
    """Write a volume node to NIfTI (world affine as qform and sform); return that affine.

    Voxel values keep their type when NIfTI has it, else become float32. The file is what the
    ``basalseg`` command reads in the background run, so the pipeline sees the node's voxels and
    geometry exactly.
    """
    import nibabel as nib

    volume = volumeFromNode(volumeNode, dtype=None)
    data = volume.data if volume.data.dtype in _NIFTI_DTYPES else volume.data.astype(np.float32)
    image = nib.Nifti1Image(np.ascontiguousarray(data), volume.affine)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))
    return volume.affine


# ---------------------------------------------------------------------------------------------
# segmentations
# ---------------------------------------------------------------------------------------------


def findConflictingSegments(segmentationNode) -> list[str]:
    """Names of the 8 structures that already exist as segments in ``segmentationNode``."""
    if segmentationNode is None:
        return []
    segmentation = segmentationNode.GetSegmentation()
    return [s.name for s in STRUCTURES if segmentation.GetSegmentIdBySegmentName(s.name)]


def _orientedMask(mask_ijk: np.ndarray, ijkToRas: np.ndarray):
    """A ``vtkOrientedImageData`` (uint8) holding ``mask_ijk`` on the grid ``ijkToRas``."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*mask_ijk.shape)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    scalars[:] = np.asarray(mask_ijk, dtype=np.uint8).transpose(2, 1, 0).ravel()
    image.SetImageToWorldMatrix(_arrayToMatrix(ijkToRas))
    return image


def labelsToSegmentation(labels: np.ndarray, volumeNode, segmentationNode=None, onConflict: str = "new",
                         name: Optional[str] = None, structures: tuple[Structure, ...] = STRUCTURES):
    """Put a FreeSurfer-valued labelmap into a segmentation node as 8 named, coloured segments.

    Args:
        labels: ``(I, J, K)`` labelmap on ``volumeNode``'s grid (values 10-13, 49-52; others ignored).
        volumeNode: the volume the labels were computed on (geometry and parent transform).
        segmentationNode: where to add the segments; None makes a new node.
        onConflict: what to do when ``segmentationNode`` already has segments with the
            structures' names: ``"new"`` (default) makes a new node and leaves it untouched,
            ``"replace"`` removes those segments first, ``"error"`` raises.
        name: name of a new node (default ``"<volume> BasalSegSAM"``, made unique).
        structures: the structures to write (all 8 by default; absent ones become empty segments).

    Returns:
        The segmentation node that holds the segments.

    Raises:
        ValueError: labels do not match the volume's shape. SegmentConflictError: conflict and
        ``onConflict="error"``.
    """
    if onConflict not in ("new", "replace", "error"):
        raise ValueError(f"onConflict must be 'new', 'replace' or 'error', got {onConflict!r}")
    labels = np.asarray(labels)
    dims = volumeNode.GetImageData().GetDimensions()
    if labels.shape != tuple(dims):
        raise ValueError(f"labels of shape {labels.shape} do not match volume '{volumeNode.GetName()}' {tuple(dims)}")
    scene = volumeNode.GetScene()
    conflicts = findConflictingSegments(segmentationNode)
    if conflicts:
        if onConflict == "error":
            raise SegmentConflictError(
                f"segmentation '{segmentationNode.GetName()}' already has segments {', '.join(conflicts)}")
        if onConflict == "new":
            segmentationNode = None
        else:
            for segName in conflicts:
                segmentationNode.GetSegmentation().RemoveSegment(
                    segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(segName))
    if segmentationNode is None:
        baseName = name or f"{volumeNode.GetName()} BasalSegSAM"
        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(baseName))
        segmentationNode.SetAttribute(NODE_ATTRIBUTE, "segmentation")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    elif not _referenceGeometry(segmentationNode) and segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)  # nothing there to move
    ijkToRas = _volumeInSegmentationFrame(volumeNode, segmentationNode)
    segmentation = segmentationNode.GetSegmentation()
    target = _existingGeometry(segmentationNode, ijkToRas, labels.shape)  # the grid its segments already use
    wasModifying = segmentationNode.StartModify()
    try:
        for s in structures:
            segmentId = segmentation.AddEmptySegment("", s.name, list(s.color_float))
            segment = segmentation.GetSegment(segmentId)
            segment.SetTag(LABEL_TAG, str(s.label))
            mask = labels == s.label
            if mask.any():
                image = _orientedMask(mask, ijkToRas)
                if target is not None:
                    onTarget = slicer.vtkOrientedImageData()
                    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                            image, target, onTarget, False, True):
                        raise RuntimeError(f"could not resample {s.name} onto the segmentation's grid")
                    image = onTarget
                if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId):
                    raise RuntimeError(f"could not write segment {s.name}")
    finally:
        segmentationNode.EndModify(wasModifying)
    segmentationNode.SetNodeReferenceID(INPUT_REFERENCE, volumeNode.GetID())
    segmentationNode.SetAttribute(DIGEST_ATTRIBUTE, labelsDigest(labelsFromSegmentation(segmentationNode, volumeNode)))
    return segmentationNode


def _referenceGeometry(segmentationNode) -> str:
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    return segmentationNode.GetSegmentation().GetConversionParameter(name) or ""


def _existingGeometry(segmentationNode, ijkToRas: np.ndarray, shape):
    """The grid (geometry only, no voxels) of the binary labelmaps the segmentation already
    holds, its extent grown to cover the volume ``(shape, ijkToRas)``; None when it holds none.
    Writing new segments on it keeps Slicer from resampling the shared labelmap layer, and with
    it the user's other segments, onto the new segments' grid."""
    segmentation = segmentationNode.GetSegmentation()
    labelmapName = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if segmentation.GetNumberOfSegments() == 0 or not segmentation.ContainsRepresentation(labelmapName):
        return None
    for n in range(segmentation.GetNumberOfLayers()):
        layer = segmentation.GetLayerDataObject(n)
        if layer is not None and not layer.IsEmpty():
            matrix = vtk.vtkMatrix4x4()
            layer.GetImageToWorldMatrix(matrix)
            corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                                for k in (0, shape[2] - 1)]).T
            ijk = (np.linalg.inv(_matrixToArray(matrix)) @ ijkToRas @ corners)[:3]
            extent = list(layer.GetExtent())
            for a in range(3):
                extent[2 * a] = min(extent[2 * a], int(np.floor(ijk[a].min())) - 1)
                extent[2 * a + 1] = max(extent[2 * a + 1], int(np.ceil(ijk[a].max())) + 1)
            geometry = slicer.vtkOrientedImageData()
            geometry.SetExtent(*extent)
            geometry.SetImageToWorldMatrix(matrix)
            return geometry
    return None


def _volumeInSegmentationFrame(volumeNode, segmentationNode) -> np.ndarray:
    """Voxel ``(i, j, k, 1)`` of the volume -> the segmentation node's own coordinates (both
    parent transforms must be linear). Equals ``IJKToRAS`` when both share one parent."""
    if segmentationNode.GetTransformNodeID() == volumeNode.GetTransformNodeID():
        return ijkToRasOfNode(volumeNode)
    return np.linalg.inv(_parentToWorld(segmentationNode)) @ worldAffine(volumeNode)


def labelsDigest(labels: np.ndarray) -> str:
    """sha1 of a labelmap's voxels and shape (to tell an untouched result from an edited one)."""
    import hashlib

    labels = np.ascontiguousarray(labels, dtype=np.int16)
    return hashlib.sha1(repr(labels.shape).encode() + labels.tobytes()).hexdigest()


def isUntouchedResult(segmentationNode, volumeNode) -> bool:
    """True when ``segmentationNode`` holds exactly what this module last wrote into it for
    ``volumeNode``: no structure segment was edited, added or removed since, so replacing them
    loses nothing of the user's."""
    if segmentationNode is None or volumeNode is None:
        return False
    if segmentationNode.GetNodeReferenceID(INPUT_REFERENCE) != volumeNode.GetID():
        return False
    digest = segmentationNode.GetAttribute(DIGEST_ATTRIBUTE)
    if not digest:
        return False
    try:
        return labelsDigest(labelsFromSegmentation(segmentationNode, volumeNode)) == digest
    except (ValueError, RuntimeError):
        return False


def volumesTableOf(segmentationNode):
    """The volumes table that belongs to a segmentation (None when it has none yet)."""
    if segmentationNode is None:
        return None
    return segmentationNode.GetNodeReference(TABLE_REFERENCE)


def _structureOfSegment(segment) -> Optional[Structure]:
    value = vtk.reference("")
    if segment.GetTag(LABEL_TAG, value):
        for s in STRUCTURES:
            if str(s.label) == str(value).strip():
                return s
    for s in STRUCTURES:
        if segment.GetName() == s.name:
            return s
    return None


def _onGrid(image, dims) -> np.ndarray:
    """``[i, j, k]`` array of ``dims`` holding an image resampled onto that grid, whose extent
    may be smaller (cropped to the segment) or larger (a shared layer's) than ``0..dims-1``."""
    e = image.GetExtent()
    kji = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
        e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    out = np.zeros(dims, dtype=kji.dtype)
    lo = [max(e[2 * a], 0) for a in range(3)]
    hi = [min(e[2 * a + 1], dims[a] - 1) for a in range(3)]
    if any(h < l for l, h in zip(lo, hi)):
        return out
    out[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = kji[
        lo[2] - e[4]:hi[2] - e[4] + 1, lo[1] - e[2]:hi[1] - e[2] + 1, lo[0] - e[0]:hi[0] - e[0] + 1].transpose(2, 1, 0)
    return out


def labelsFromSegmentation(segmentationNode, volumeNode) -> np.ndarray:
    """The segmentation's structure segments as one FreeSurfer-valued labelmap on the volume's grid.

    The segmentation may sit under another (linear) transform than the volume: its segments are
    read at the volume voxels' world positions. Segments are recognised by their
    ``BasalSegSAM.Label`` tag, else by their FreeSurfer name;
    other segments are ignored. Where segments overlap (after manual edits), the later structure
    in :data:`~basalseg.structures.STRUCTURES` order wins.

    Returns:
        ``(I, J, K)`` int16 labelmap.
    """
    dims = tuple(volumeNode.GetImageData().GetDimensions())
    reference = slicer.vtkOrientedImageData()
    reference.SetDimensions(*dims)
    reference.SetImageToWorldMatrix(_arrayToMatrix(_volumeInSegmentationFrame(volumeNode, segmentationNode)))
    labels = np.zeros(dims, dtype=np.int16)
    segmentation = segmentationNode.GetSegmentation()
    labelmapName = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if segmentation.GetNumberOfSegments() and not segmentation.ContainsRepresentation(labelmapName):
        segmentationNode.CreateBinaryLabelmapRepresentation()  # e.g. a segmentation loaded as surfaces
    found: dict[int, str] = {}
    for n in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(n)
        structure = _structureOfSegment(segmentation.GetSegment(segmentId))
        if structure is not None and structure.class_index not in found:
            found[structure.class_index] = segmentId
    for s in STRUCTURES:
        segmentId = found.get(s.class_index)
        if segmentId is None:
            continue
        image = slicer.vtkOrientedImageData()
        segmentationNode.GetBinaryLabelmapRepresentation(segmentId, image)
        if image.GetPointData().GetScalars() is None or image.IsEmpty():
            continue
        resampled = slicer.vtkOrientedImageData()
        if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                image, reference, resampled, False, True):
            raise RuntimeError(f"could not resample segment {s.name} onto the volume grid")
        labels[_onGrid(resampled, dims) > 0] = s.label
    return labels


# ---------------------------------------------------------------------------------------------
# volumes table
# ---------------------------------------------------------------------------------------------

_COLUMN_TYPES = {"structure": vtk.vtkStringArray, "label": vtk.vtkIntArray, "voxels": vtk.vtkIntArray,
                 "volume_mm3": vtk.vtkDoubleArray, "volume_ml": vtk.vtkDoubleArray,
                 "volume_ml_low": vtk.vtkDoubleArray, "volume_ml_high": vtk.vtkDoubleArray}
_COLUMN_UNITS = {"volume_mm3": "mm3", "volume_ml": "mL", "volume_ml_low": "mL", "volume_ml_high": "mL"}
#: the interval columns a volumes table gets when the result has them (``volumes.csv``'s).
INTERVAL_COLUMNS = ["volume_ml_low", "volume_ml_high"]
_COLUMN_DESCRIPTIONS = {
    "structure": "FreeSurfer structure name",
    "label": "FreeSurfer aseg label value",
    "voxels": "number of voxels of the structure on the input volume's grid",
    "volume_mm3": "voxels times the volume of one voxel",
    "volume_ml": "volume in millilitres (mm3 / 1000)",
    "volume_ml_low": "lower end of the 95 % volume interval (docs/UNCERTAINTY.md)",
    "volume_ml_high": "upper end of the 95 % volume interval (docs/UNCERTAINTY.md)",
}


def intervalsFromRows(rows) -> dict | None:
    """``{structure: (low, high)}`` from ``volumes.csv`` rows (:func:`BasalSegSAMLib.jobs._readRows`),
    or None when the rows carry no interval (``--no-uncertainty``, older results)."""
    out = {}
    for row in rows or []:
        low, high = row.get("volume_ml_low"), row.get("volume_ml_high")
        if low is None or high is None:
            return None
        out[row["structure"]] = (float(low), float(high))
    return out or None


def volumesToTable(labels: np.ndarray, voxelVolumeMm3: float, tableNode=None, scene=None, name: str = "BasalSegSAM volumes",
                   intervals: dict | None = None):
    """Fill a table node with one row per structure (``basalseg.outputs.volume_rows``).

    Columns: ``structure, label, voxels, volume_mm3, volume_ml``: the same numbers as the
    command line's ``volumes.csv``; with ``intervals`` (``{structure: (low, high)}`` in mL,
    :func:`intervalsFromRows`) also ``volume_ml_low, volume_ml_high``. A table recomputed from an
    edited segmentation has no interval (it belonged to the network's labels).

    Args:
        labels: FreeSurfer-valued labelmap.
        voxelVolumeMm3: volume of one voxel (|det| of the world affine).
        tableNode: table to overwrite (its old rows are replaced); None makes a new one in ``scene``.
        scene: scene for a new table (default ``slicer.mrmlScene``).
        name: name of a new table (made unique).

    Returns:
        The table node.
    """
    rows = volume_rows(labels, voxelVolumeMm3)
    columns = list(VOLUME_COLUMNS)
    if intervals:
        columns += INTERVAL_COLUMNS
        for row in rows:
            row["volume_ml_low"], row["volume_ml_high"] = intervals.get(row["structure"], (float("nan"), float("nan")))
    if tableNode is None:
        scene = scene or slicer.mrmlScene
        tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
        tableNode.SetAttribute(NODE_ATTRIBUTE, "volumes")
    wasModifying = tableNode.StartModify()
    try:
        tableNode.RemoveAllColumns()
        for column in columns:
            array = _COLUMN_TYPES[column]()
            array.SetName(column)
            for row in rows:
                array.InsertNextValue(row[column])
            tableNode.AddColumn(array)
            tableNode.SetColumnDescription(column, _COLUMN_DESCRIPTIONS[column])
            if column in _COLUMN_UNITS:
                tableNode.SetColumnUnitLabel(column, _COLUMN_UNITS[column])
    finally:
        tableNode.EndModify(wasModifying)
    return tableNode


def tableRows(tableNode) -> list[dict]:
    """A volumes table's rows as dicts with the ``volumes.csv`` columns (and the interval columns
    when the table has them) and Python types."""
    table = tableNode.GetTable()
    columns = list(VOLUME_COLUMNS) + [c for c in INTERVAL_COLUMNS if table.GetColumnByName(c) is not None]
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for column in columns:
            value = table.GetValueByName(r, column)
            if column == "structure":
                row[column] = value.ToString()
            elif column in ("label", "voxels"):
                row[column] = value.ToInt()
            else:
                row[column] = value.ToDouble()
        rows.append(row)
    return rows
