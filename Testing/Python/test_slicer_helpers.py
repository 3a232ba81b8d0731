"""Shared fixtures and helpers of the Slicer-side tests (``test_slicer_*.py``).

The Slicer module's Qt-free parts are tested against ``slicer-core`` (PyPI): a real MRML scene
with the application logic, the colour logic's default nodes and the volumes, segmentations,
markups and tables logics, installed as ``slicer.mrmlScene`` / ``slicer.modules`` the way
Slicer does it. ``slicer.app``, Qt, ``loadVolume``/``saveNode`` and Segment Statistics do not
exist there: the widget is tested under stand-ins for Slicer's GUI layer (``slicerstandin``,
``test_slicer_widget.py``), and only a run inside real Slicer (``BasalSegSAMTest``) checks the rest.

Other test files import what they need from here (``from test_slicer_helpers import ...``);
importing a fixture makes pytest use it in that file.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import numpy as np
import pytest

try:  # slicer-core gives real MRML; without it only the Qt- and MRML-free tests run
    import slicer
except ImportError:  # pragma: no cover
    slicer = None

#: Folder of the Slicer module (BasalSegSAM.py, BasalSegSAMLib/, Resources/, basalseg/).
MODULE_DIR = Path(__file__).resolve().parents[2] / "BasalSegSAM"


class _Module:
    """Stands in for ``slicer.modules.<name>``: only ``logic()`` is used by ``slicer.util``."""

    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


def make_scene():
    """A scene wired like Slicer's: application logic and module logics, set as ``slicer.mrmlScene``
    and ``slicer.modules``. Returns ``(scene, logics)``."""
    if slicer is None:
        pytest.skip("slicer-core (real MRML) is not installed")
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logics = {}
    for name, cls in (("Colors", slicer.vtkSlicerColorLogic), ("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("Markups", slicer.vtkSlicerMarkupsLogic), ("Tables", slicer.vtkSlicerTablesLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[name.lower()] = logic
    app.SetColorLogic(logics["colors"])
    logics["app"] = app
    return scene, logics


@pytest.fixture
def mrml_scene():
    """A fresh Slicer-like MRML scene for one test (``slicer.mrmlScene`` points at it)."""
    if slicer is None:
        pytest.skip("slicer-core (real MRML) is not installed")
    saved = {name: getattr(slicer, name) for name in ("mrmlScene", "modules") if hasattr(slicer, name)}
    scene, logics = make_scene()
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**{k: _Module(v) for k, v in logics.items() if k != "app"})
    yield scene
    scene.Clear(1)
    for name in ("mrmlScene", "modules"):
        if name in saved:
            setattr(slicer, name, saved[name])
        elif hasattr(slicer, name):
            delattr(slicer, name)


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3x3 rotation about x, y or z."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def oblique_affine(spacing=(1.0, 1.0, 2.0), origin=(31.0, 27.0, -18.0)) -> np.ndarray:
    """An IJK-to-RAS matrix that is far from identity: LPS-like flips of i and j, an oblique
    rotation (12 deg about z, 7 deg about x) and 1x1x2 mm voxels."""
    linear = rotation("x", 7.0) @ rotation("z", 12.0) @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


def add_volume(data_ijk: np.ndarray, affine: np.ndarray, name: str = "T1"):
    """A scalar volume node from an ``[i, j, k]`` array and its IJK-to-RAS matrix (Slicer's own helper)."""
    return slicer.util.addVolumeFromArray(np.ascontiguousarray(np.asarray(data_ijk).transpose(2, 1, 0)), affine, name=name)


def world(affine: np.ndarray, ijk) -> np.ndarray:
    ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
    return (np.asarray(affine, float) @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T


def blob_volume(shape=(40, 36, 20), centers=((14, 12, 8), (25, 22, 11)), radius_mm=5.0, affine=None):
    """A float32 image with bright balls around the given voxel centres (in mm of ``affine``)."""
    affine = oblique_affine() if affine is None else affine
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    pts = world(affine, np.c_[ii.ravel(), jj.ravel(), kk.ravel()])
    data = np.full(len(pts), 100.0, dtype=np.float32)
    for c in centers:
        wc = world(affine, c)[0]
        data[np.linalg.norm(pts - wc, axis=1) <= radius_mm] = 1000.0
    return data.reshape(shape)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a reaped-later zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def scene_node_ids(scene) -> set[str]:
    return {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}


# ---------------------------------------------------------------------------------------------
# the fixture itself
# ---------------------------------------------------------------------------------------------


def test_scene_fixture_gives_working_slicer_util(mrml_scene):  # noqa: F811
    node = add_volume(np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.diag([1.0, 2.0, 3.0, 1.0]))
    assert slicer.mrmlScene is mrml_scene
    assert node.GetImageData().GetDimensions() == (2, 3, 4)
    assert slicer.util.arrayFromVolume(node).shape == (4, 3, 2)
    assert mrml_scene.GetFirstNodeByClass("vtkMRMLColorTableNode") is not None  # default colour nodes


def test_oblique_affine_is_far_from_identity():
    a = oblique_affine()
    assert np.allclose(np.sqrt((a[:3, :3] ** 2).sum(axis=0)), [1, 1, 2])
    assert np.linalg.det(a[:3, :3]) > 0  # two flips: still right-handed
    assert np.abs(a[:3, :3] - np.round(a[:3, :3])).max() > 0.1  # oblique
