"""Tests of basalseg.data.localised: training cohorts put through the inference's brain localisation (issue 11)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from basalseg.data import atlas
from basalseg.imageio import Volume
from basalseg.structures import STRUCTURES
from localise_helpers import require_templates_and_simpleitk
from localise_helpers import rigid as _rigid

require_templates_and_simpleitk()

from basalseg.data.cohort import case_paths, read_cohort, write_nifti_atomic  # noqa: E402
from basalseg.data.localised import label_overlap, localise_case, localise_cohort  # noqa: E402
from basalseg.localise import _template  # noqa: E402



# each structure painted with its own intensity, so image/label misalignment shows in the image values
_PAINT = {s.label: 2.0 + 0.25 * i for i, s in enumerate(STRUCTURES)}


@pytest.fixture(scope="module")
def posed_case():
    """The MNI152 template at 2 mm (its own DK labels), the 8 structures painted, flipped to an LPS-like
    axis order, rotated 20 deg and placed 120 mm off the scanner origin."""
    mni = atlas.load_template("mni152")
    labels = atlas.load_reference_labels("mni152", "dk", full=False)
    step = np.diag([2.0, 2.0, 2.0, 1.0])
    data = np.asarray(mni.data, np.float32)[::2, ::2, ::2] / float(np.percentile(mni.data, 99))
    lab = np.asarray(labels).astype(np.int16)[::2, ::2, ::2]
    for value, intensity in _PAINT.items():
        data[lab == value] = intensity
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [(data.shape[0] - 1), (data.shape[1] - 1), 0]
    data, lab = data[::-1, ::-1].copy(), lab[::-1, ::-1].copy()
    affine = _rigid((0.0, 10.0, 20.0), (30.0, -40.0, 120.0)) @ mni.affine @ step @ flip
    return Volume(data, affine), lab


def test_localised_labels_stay_on_the_localised_image(posed_case):
    volume, labels = posed_case
    image, out_labels, record = localise_case(volume, labels)
    _, _, template_labels, grid, _, _ = _template()
    assert image.shape == grid.shape and np.allclose(image.affine, grid.affine)
    assert out_labels.shape == grid.shape and out_labels.dtype == np.int16
    # the labels came back onto the template's own labels (a 2 mm, posed copy of them) ...
    assert record["label_overlap"] > 0.75, record
    assert label_overlap(out_labels, template_labels) == pytest.approx(record["label_overlap"], abs=1e-4)
    # ... and onto the image: inside each localised structure the image has that structure's paint
    for value, intensity in _PAINT.items():
        inside = np.asarray(image.data)[out_labels == value]
        assert inside.size > 200
        # (paints 0.25 apart; the 2 mm voxels' partial volume blurs thin edges such as the caudate's)
        assert abs(float(np.median(inside)) - intensity) < 0.06, (value, np.median(inside), intensity)
        assert np.mean(np.abs(inside - intensity) < 0.13) > 0.5, (value, np.median(inside), intensity)
    assert record["ncc"] is not None and record["seconds"] > 0


def _write(root, name, volume, labels):
    image_path, label_path = case_paths(root, name)
    write_nifti_atomic(image_path, np.round(volume.data * 1000), volume.affine, dtype=np.int16)
    write_nifti_atomic(label_path, labels, volume.affine, dtype=np.int16)


def test_cohort_drops_failed_registrations_and_resumes(posed_case, tmp_path, monkeypatch):
    volume, labels = posed_case
    src = tmp_path / "src"
    _write(src, "good", volume, labels)
    noise = np.random.default_rng(3).random((90, 100, 90)).astype(np.float32)
    noise_labels = np.zeros(noise.shape, np.int16)
    noise_labels[40:50, 40:50, 40:50] = STRUCTURES[0].label  # a cohort's case must have labels
    _write(src, "noise", Volume(noise, volume.affine), noise_labels)
    out = tmp_path / "localised"
    kept = localise_cohort(src, out)
    assert [c.name for c in kept] == ["good"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 1
    records = {r["name"]: r for r in meta["basalseg_localised"]["cases"]}
    assert records["noise"]["status"] == "dropped" and "no brain found" in records["noise"]["reason"]
    assert records["good"]["status"] == "kept" and records["good"]["ncc"] > 0.3
    assert [c.name for c in read_cohort(out)] == ["good"]  # a normal cohort: training reads it unchanged
    img, lab = read_cohort(out)[0].load()
    assert img.shape == _template()[3].shape and np.asarray(img.data).max() > 1000  # int16 source -> int16 x 1000 kept
    # resumable: recorded cases are not localised again
    import basalseg.data.localised as mod

    monkeypatch.setattr(mod, "localise_case", lambda *a, **k: pytest.fail("re-localised a recorded case"))
    assert [c.name for c in localise_cohort(src, out)] == ["good"]
    # one cohort, one transform: the default (affine) is recorded, and resuming it rigidly is refused
    assert meta["basalseg_localised"]["transform"] == "affine" and records["good"]["localise_transform"] == "affine"
    assert records["good"]["transform"] in ("affine", "rigid")  # what was kept (rigid when the refinement did not help)
    with pytest.raises(ValueError, match="localised with the affine transform, not rigid"):
        localise_cohort(src, out, transform="rigid")


def test_an_interrupted_cohort_of_another_transform_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """A run stopped before its dataset.json, resumed with another transform: refused up front, not after
    the cases before the old record were localised with the new transform into the same folder."""
    import basalseg.data.localised as mod

    src, out = tmp_path / "src", tmp_path / "localised"
    small = Volume(np.ones((8, 8, 8), np.float32), np.eye(4))
    lab = np.zeros((8, 8, 8), np.int16)
    lab[2:4, 2:4, 2:4] = STRUCTURES[0].label
    for name in ("a_first", "b_second"):
        _write(src, name, small, lab)
    (out / "localisation").mkdir(parents=True)
    # a record written before 2026-12-07 (no localise_transform key: rigid) for the second case only
    (out / "localisation" / "b_second.json").write_text(json.dumps({"name": "b_second", "status": "kept"}))
    monkeypatch.setattr(mod, "localise_case", lambda *a, **k: pytest.fail("localised a case before refusing"))
    with pytest.raises(ValueError, match="b_second was localised with the rigid transform, not affine"):
        localise_cohort(src, out)
    assert not case_paths(out, "a_first")[0].exists() and not (out / "localisation" / "a_first.json").exists()
    assert not (out / "dataset.json").exists()


def test_low_label_overlap_is_dropped(posed_case, tmp_path):
    """A registration whose labels land away from the template's counts as failed (here: a bar no case meets)."""
    volume, labels = posed_case
    src = tmp_path / "src"
    _write(src, "good", volume, labels)
    _write(src, "good2", volume, labels)
    from basalseg.errors import BasalSegError

    with pytest.raises(BasalSegError, match="every case"):
        localise_cohort(src, tmp_path / "strict", min_overlap=0.999)
    meta = json.loads((tmp_path / "strict" / "dataset.json").read_text())
    assert meta["numTraining"] == 0
    assert all(r["status"] == "dropped" and "label_overlap" in r["reason"] for r in meta["basalseg_localised"]["cases"])
    assert not case_paths(tmp_path / "strict", "good")[0].exists()
    with pytest.raises(ValueError, match="already holds"):
        localise_cohort(tmp_path / "other", tmp_path / "strict")


def test_synth_localised_needs_head(tmp_path, capsys):
    from basalseg.commands import main

    assert main(["synth", "--out", str(tmp_path / "c"), "--n", "1", "--localised"]) != 0
    assert "--localised needs --head" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["synth", "--out", str(tmp_path / "c"), "--n", "1", "--skull-stripped"]) != 0
    assert "--skull-stripped needs --head" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    # localised cohorts are training material; rescans are for the study, which segments raw heads
    assert main(["synth", "--out", str(tmp_path / "c"), "--n", "1", "--head", "--localised", "--rescans", "2"]) != 0
    assert "segments the heads as a user would" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
