"""The MRML bridge against real MRML (slicer-core): volumes, orientation, segmentations, tables."""

from __future__ import annotations

import numpy as np
import pytest

from test_slicer_helpers import add_volume, blob_volume, mrml_scene, oblique_affine, world  # noqa: F401

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from BasalSegSAMLib import mrmlbridge  # noqa: E402
from basalseg.outputs import volume_rows  # noqa: E402
from basalseg.structures import STRUCTURES  # noqa: E402

FS = [s.label for s in STRUCTURES]


def _labels(shape, seed=0) -> np.ndarray:
    """Blocks of every structure's label, plus a foreign label (99) that must be ignored."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.int16)
    for n, value in enumerate(FS):
        i0 = 1 + (n % 4) * (shape[0] // 5)
        j0 = 1 + (n // 4) * (shape[1] // 3)
        labels[i0 : i0 + 3 + n % 2, j0 : j0 + 4, 1 : shape[2] - 1 - n % 3] = value
    labels[rng.random(shape) < 0.01] = 99
    return labels


# ---------------------------------------------------------------------------------------------
# volumes
# ---------------------------------------------------------------------------------------------


def test_volume_from_node_keeps_voxels_and_oblique_affine(mrml_scene):
    rng = np.random.default_rng(1)
    data = rng.integers(-50, 3000, size=(7, 6, 5)).astype(np.int16)
    affine = oblique_affine()
    node = add_volume(data, affine)

    volume = mrmlbridge.volumeFromNode(node)
    assert volume.data.dtype == np.float32 and volume.shape == (7, 6, 5)
    assert np.array_equal(volume.data, data.astype(np.float32))
    assert np.allclose(volume.affine, affine)
    assert volume.voxel_volume_mm3 == pytest.approx(2.0)
    assert mrmlbridge.volumeFromNode(node, dtype=None).data.dtype == np.int16

    # independent check through Slicer's own RAS-to-IJK matrix: voxel (5, 1, 3) holds its value there
    ras = world(affine, [5, 1, 3])[0]
    m = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(m)
    ijk = [m.MultiplyPoint([*ras, 1.0])[n] for n in range(3)]
    assert np.allclose(ijk, [5, 1, 3], atol=1e-6)
    assert volume.data[5, 1, 3] == data[5, 1, 3]


def test_world_affine_applies_linear_parent_transform_and_refuses_nonlinear(mrml_scene):
    node = add_volume(np.zeros((4, 4, 4), np.float32), oblique_affine())
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    t = np.eye(4)
    t[:3, :3] = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])
    t[:3, 3] = [5, -3, 2]
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(t))
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert np.allclose(mrmlbridge.worldAffine(node), t @ oblique_affine())

    warp = mrml_scene.AddNewNodeByClass("vtkMRMLTransformNode")
    spline = vtk.vtkThinPlateSplineTransform()
    src, dst = vtk.vtkPoints(), vtk.vtkPoints()
    for p, q in (([0, 0, 0], [0, 0, 1]), ([10, 0, 0], [10, 1, 0]), ([0, 10, 0], [1, 10, 0]), ([0, 0, 10], [0, 0, 10])):
        src.InsertNextPoint(p)
        dst.InsertNextPoint(q)
    spline.SetSourceLandmarks(src)
    spline.SetTargetLandmarks(dst)
    spline.SetBasisToR()
    warp.SetAndObserveTransformToParent(spline)
    node.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(ValueError, match="non-linear"):
        mrmlbridge.volumeFromNode(node)


def test_volume_from_node_refuses_missing_input(mrml_scene):
    with pytest.raises(ValueError, match="no input volume"):
        mrmlbridge.volumeFromNode(None)
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ValueError, match="no image data"):
        mrmlbridge.volumeFromNode(empty)


def test_nifti_written_from_node_reads_back_identically_with_the_pipeline_loader(mrml_scene, tmp_path):
    from basalseg.imageio import load_volume
    from basalseg.spatial import canonical_grid

    data = blob_volume(shape=(20, 18, 10))
    node = add_volume(data, oblique_affine())
    path = tmp_path / "input.nii.gz"
    written = mrmlbridge.writeVolumeNifti(node, str(path))
    loaded = load_volume(path)
    assert np.allclose(written, oblique_affine())
    assert np.allclose(loaded.affine, oblique_affine(), atol=1e-5)
    assert np.array_equal(loaded.data, data)
    a = canonical_grid(loaded.shape, loaded.affine)
    b = canonical_grid(data.shape, mrmlbridge.volumeFromNode(node).affine)
    assert a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-4)


def test_canonical_space_of_an_oblique_node_puts_structures_at_their_ras_place(mrml_scene):
    """The pipeline's canonical mapping of a node's Volume keeps every bright ball at its RAS place."""
    from basalseg.spatial import to_canonical

    centers = ((14, 12, 8), (25, 22, 11))
    node = add_volume(blob_volume(centers=centers), oblique_affine())
    canonical, grid = to_canonical(mrmlbridge.volumeFromNode(node))
    from scipy import ndimage

    parts, n = ndimage.label(canonical > 550)
    assert n == 2
    found = world(grid.affine, ndimage.center_of_mass(canonical > 550, parts, [1, 2]))
    expected = world(oblique_affine(), centers)
    for e in expected:
        assert np.min(np.linalg.norm(found - e, axis=1)) < 0.75  # mm


# ---------------------------------------------------------------------------------------------
# segmentations
# ---------------------------------------------------------------------------------------------


def test_labels_to_segmentation_and_back_on_an_oblique_grid(mrml_scene):
    shape = (22, 17, 9)
    affine = oblique_affine()
    node = add_volume(np.zeros(shape, np.float32), affine)
    labels = _labels(shape)

    seg = mrmlbridge.labelsToSegmentation(labels, node)
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 8
    assert seg.GetName() == "T1 BasalSegSAM"
    for s in STRUCTURES:
        segmentId = segmentation.GetSegmentIdBySegmentName(s.name)
        assert segmentId, s.name
        segment = segmentation.GetSegment(segmentId)
        assert np.allclose(segment.GetColor(), s.color_float)
        tag = vtk.reference("")
        assert segment.GetTag(mrmlbridge.LABEL_TAG, tag) and str(tag) == str(s.label)
        # Slicer's own export onto the volume's grid gives exactly this structure's voxels
        kji = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segmentId, node)
        assert np.array_equal(kji.transpose(2, 1, 0) > 0, labels == s.label), s.name

    expected = np.where(np.isin(labels, FS), labels, 0)
    assert np.array_equal(mrmlbridge.labelsFromSegmentation(seg, node), expected)


def test_segment_voxels_sit_at_the_volume_voxels_world_positions(mrml_scene):
    shape = (12, 10, 6)
    affine = oblique_affine()
    node = add_volume(np.zeros(shape, np.float32), affine)
    labels = np.zeros(shape, np.int16)
    labels[7, 3, 4] = 12  # one voxel of Left-Putamen
    seg = mrmlbridge.labelsToSegmentation(labels, node)
    segmentId = seg.GetSegmentation().GetSegmentIdBySegmentName("Left-Putamen")
    image = slicer.vtkOrientedImageData()
    seg.GetBinaryLabelmapRepresentation(segmentId, image)
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    extent = image.GetExtent()
    from vtk.util import numpy_support

    dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
    kji = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    on = np.argwhere(kji.transpose(2, 1, 0) > 0) + [extent[0], extent[2], extent[4]]
    assert len(on) == 1
    ras = [m.MultiplyPoint([*on[0].astype(float), 1.0])[n] for n in range(3)]
    assert np.allclose(ras, world(affine, [7, 3, 4])[0], atol=1e-6)


def test_pipeline_canonical_labels_come_back_on_the_right_voxels(mrml_scene):
    """Labels made on the canonical grid and mapped back with the pipeline's own resampling become
    segments that cover the bright balls of the oblique input volume."""
    from basalseg.spatial import Grid, resample_to_grid, to_canonical

    centers = ((14, 12, 8), (25, 22, 11))
    data = blob_volume(centers=centers)
    node = add_volume(data, oblique_affine())
    volume = mrmlbridge.volumeFromNode(node)
    canonical, grid = to_canonical(volume)
    classes = np.where(canonical > 550, 12, 0).astype(np.int16)
    back = resample_to_grid(classes, grid.affine, Grid(volume.shape, volume.affine), order=0)
    seg = mrmlbridge.labelsToSegmentation(back, node)
    mask = mrmlbridge.labelsFromSegmentation(seg, node) == 12
    truth = data > 550
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.85


def test_existing_segments_are_never_overwritten_by_default(mrml_scene):
    shape = (10, 9, 6)
    node = add_volume(np.zeros(shape, np.float32), oblique_affine())
    old = np.zeros(shape, np.int16)
    old[1:4, 1:4, 1:3] = 12
    target = mrmlbridge.labelsToSegmentation(old, node, name="manual")
    tumorId = target.GetSegmentation().AddEmptySegment("", "Tumor", [1, 1, 0])
    before = mrmlbridge.labelsFromSegmentation(target, node)
    new = np.zeros(shape, np.int16)
    new[5:8, 5:8, 2:5] = 12

    made = mrmlbridge.labelsToSegmentation(new, node, target)  # default: a new node
    assert made is not target and made.GetID() != target.GetID()
    assert target.GetSegmentation().GetNumberOfSegments() == 9
    assert np.array_equal(mrmlbridge.labelsFromSegmentation(target, node), before)
    assert np.array_equal(mrmlbridge.labelsFromSegmentation(made, node) == 12, new == 12)

    assert mrmlbridge.findConflictingSegments(target) == [s.name for s in STRUCTURES]
    with pytest.raises(mrmlbridge.SegmentConflictError, match="Left-Putamen"):
        mrmlbridge.labelsToSegmentation(new, node, target, onConflict="error")

    replaced = mrmlbridge.labelsToSegmentation(new, node, target, onConflict="replace")
    assert replaced is target
    assert target.GetSegmentation().GetNumberOfSegments() == 9  # 8 replaced + Tumor kept
    assert target.GetSegmentation().GetSegment(tumorId) is not None
    assert np.array_equal(mrmlbridge.labelsFromSegmentation(target, node) == 12, new == 12)


def test_labels_of_another_shape_are_refused(mrml_scene):
    node = add_volume(np.zeros((5, 5, 5), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="do not match"):
        mrmlbridge.labelsToSegmentation(np.zeros((5, 5, 4), np.int16), node)


def test_seg_nrrd_written_by_slicer_storage_reads_back(mrml_scene, tmp_path):
    """The segmentation node saves as .seg.nrrd with Slicer's own storage node and loads back equal."""
    shape = (14, 11, 7)
    node = add_volume(np.zeros(shape, np.float32), oblique_affine())
    labels = _labels(shape, seed=3)
    seg = mrmlbridge.labelsToSegmentation(labels, node)
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "x.seg.nrrd"))
    assert storage.WriteData(seg)
    loaded = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    reader = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(tmp_path / "x.seg.nrrd"))
    assert reader.ReadData(loaded)
    assert loaded.GetSegmentation().GetNumberOfSegments() == 8
    assert np.array_equal(mrmlbridge.labelsFromSegmentation(loaded, node), np.where(np.isin(labels, FS), labels, 0))


# ---------------------------------------------------------------------------------------------
# volumes table
# ---------------------------------------------------------------------------------------------


def test_volumes_table_equals_the_pipelines_volume_rows(mrml_scene):
    shape = (16, 12, 8)
    node = add_volume(np.zeros(shape, np.float32), oblique_affine())
    labels = _labels(shape, seed=5)
    voxel = abs(np.linalg.det(oblique_affine()[:3, :3]))
    table = mrmlbridge.volumesToTable(labels, voxel)
    rows = mrmlbridge.tableRows(table)
    expected = volume_rows(labels, voxel)
    assert [r["structure"] for r in rows] == [r["structure"] for r in expected]
    for got, want in zip(rows, expected):
        assert got["label"] == want["label"] and got["voxels"] == want["voxels"]
        assert got["volume_mm3"] == pytest.approx(want["volume_mm3"])
        assert got["volume_ml"] == pytest.approx(want["volume_ml"])
    assert table.GetNumberOfColumns() == 5 and table.GetNumberOfRows() == 8
    assert table.GetColumnUnitLabel("volume_ml") == "mL"

    again = mrmlbridge.volumesToTable(np.zeros(shape, np.int16), voxel, tableNode=table)  # overwrite in place
    assert again is table and table.GetNumberOfColumns() == 5 and table.GetNumberOfRows() == 8
    assert all(r["voxels"] == 0 for r in mrmlbridge.tableRows(table))
    assert node.GetScene() is mrml_scene


def test_an_existing_segmentation_keeps_its_geometry_transform_and_other_segments(mrml_scene):
    """Writing into a user's segmentation that sits under its own transform on another grid:
    nothing of it moves, and the new segments land on the volume voxels' world positions."""
    shape = (12, 10, 8)
    volume = add_volume(np.zeros(shape, np.float32), oblique_affine())
    other = add_volume(np.zeros((20, 20, 12), np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]), name="other")
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = [3.0, -2.0, 1.0]
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    user = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user")
    user.CreateDefaultDisplayNodes()
    user.SetReferenceImageGeometryParameterFromVolumeNode(other)
    user.SetAndObserveTransformNodeID(transform.GetID())
    tumor = np.zeros((12, 20, 20), np.uint8)  # k, j, i of `other`
    tumor[3:6, 4:9, 5:10] = 1
    tumorId = user.GetSegmentation().AddEmptySegment("", "Tumor", [1, 1, 0])
    slicer.util.updateSegmentBinaryLabelmapFromArray(tumor, user, tumorId, other)
    geometryName = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    geometry = user.GetSegmentation().GetConversionParameter(geometryName)
    tumorBefore = slicer.util.arrayFromSegmentBinaryLabelmap(user, tumorId, other).copy()

    labels = np.zeros(shape, np.int16)
    labels[3:9, 2:8, 2:6] = 12
    out = mrmlbridge.labelsToSegmentation(labels, volume, user, onConflict="replace")
    assert out is user
    assert user.GetTransformNodeID() == transform.GetID()
    assert user.GetSegmentation().GetConversionParameter(geometryName) == geometry
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(user, tumorId, other), tumorBefore)
    back = mrmlbridge.labelsFromSegmentation(user, volume)  # read at the volume voxels' world positions
    inside = labels == 12
    # resampled onto the user's 1 mm grid and back: the block keeps its place and nearly its size
    assert (back[inside] == 12).mean() > 0.8 and (back[~inside] == 12).sum() < 0.2 * inside.sum(), \
        ((back[inside] == 12).mean(), (back[~inside] == 12).sum(), inside.sum())


def test_an_untouched_result_is_told_from_an_edited_one(mrml_scene):
    shape = (10, 9, 6)
    volume = add_volume(np.zeros(shape, np.float32), oblique_affine())
    labels = np.zeros(shape, np.int16)
    labels[1:4, 1:4, 1:3] = 12
    seg = mrmlbridge.labelsToSegmentation(labels, volume)
    assert mrmlbridge.isUntouchedResult(seg, volume)
    other = add_volume(np.zeros(shape, np.float32), oblique_affine(), name="other")
    assert not mrmlbridge.isUntouchedResult(seg, other) and not mrmlbridge.isUntouchedResult(None, volume)
    edited = labels.copy()
    edited[6:8, 6:8, 3:5] = 12  # as if painted in Segment Editor
    segmentId = seg.GetSegmentation().GetSegmentIdBySegmentName("Left-Putamen")
    slicer.util.updateSegmentBinaryLabelmapFromArray((edited == 12).transpose(2, 1, 0).astype(np.uint8), seg,
                                                     segmentId, volume)
    assert not mrmlbridge.isUntouchedResult(seg, volume)
