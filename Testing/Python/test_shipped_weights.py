"""The trained weights shipped in the package, and ``basalseg demo`` with them.

These are checks that the shipped files are the ones the manifest describes and that they give a
real segmentation out of the box. They are **not** the evaluation: the demo image (the MNI152
template) is the image the training subjects were deformed from, so agreement with its own labels
is a sanity floor, not an accuracy figure. The held-out evaluation is in the README ("Results").
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from basalseg.structures import STRUCTURES
from basalseg.weights import default_weights_dir, read_manifest, sha256_file

SHIPPED = default_weights_dir()


def test_manifest_lists_trained_prompter_and_litemedsam_student():
    entries = {(e.kind, e.foundation if e.kind == "student" else None): e for e in read_manifest(SHIPPED)}
    assert ("prompter", None) in entries
    assert ("student", "litemedsam") in entries
    for entry in entries.values():
        path = entry.path(SHIPPED)
        assert path.is_file(), path
        assert sha256_file(path) == entry.sha256, f"{path} does not match its manifest sha256"
        assert entry.trained, f"{entry.name} is marked untrained"
        # small enough to live in the repository
        assert path.stat().st_size < 20 * 1024 * 1024
        # the manifest says what the network was trained on and when
        for key in ("training", "date"):
            assert entry.info.get(key), f"{entry.name}: manifest lacks {key!r}"


def test_shipped_networks_load_with_their_architecture():
    from basalseg.weights import load_model

    prompter, pinfo = load_model("prompter", folder=SHIPPED)
    student, sinfo = load_model("student", "litemedsam", folder=SHIPPED)
    n_student = sum(p.numel() for p in student.parameters())
    assert 2.0e6 < n_student < 4.0e6, n_student  # the ~3M-parameter student of the method
    assert sinfo["meta"].get("input_mode", "sdm") == "sdm"
    assert pinfo["trained"] and sinfo["trained"]


@pytest.mark.slow
def test_demo_segments_the_sample_with_the_shipped_weights(tmp_path, monkeypatch):
    """``basalseg demo`` end to end (real LiteMedSAM, shipped prompter and student, 1 mm MNI152)."""
    import nibabel as nib

    from basalseg.commands import main
    from basalseg.data.atlas import load_reference_labels

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--progress", "none", "--threads", "2"]) == 0
    labels = np.asarray(nib.load(str(out / "segmentation.nii.gz")).dataobj)
    with open(out / "volumes.csv", newline="") as fh:
        volumes = {row["structure"]: float(row["volume_ml"]) for row in csv.DictReader(fh)}
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["weights"]["student"]["trained"] is True
    assert provenance["weights"]["prompter"]["trained"] is True
    reference = load_reference_labels("mni152", "dk")
    dices = {}
    for s in STRUCTURES:
        pred, ref = labels == s.label, reference == s.label
        dices[s.name] = 2 * np.logical_and(pred, ref).sum() / max(pred.sum() + ref.sum(), 1)
        # plausible adult volumes on the (large) MNI152 brain: 1-15 mL each
        assert 1.0 < volumes[s.name] < 15.0, (s.name, volumes[s.name])
    print("demo Dice vs the template's own DK labels:", {k: round(float(v), 3) for k, v in dices.items()})
    assert min(dices.values()) > 0.6, dices
    assert float(np.mean(list(dices.values()))) > 0.75, dices


def test_export_records_what_the_cohort_was_not_its_path(weights_dir, tmp_path):
    """``basalseg train --export``: the manifest describes each training cohort (name, size, seed,
    templates, contrast), copies the files and records their sha256."""
    from basalseg.training.run import export_weights

    cohort = tmp_path / "somewhere" / "train_x"
    cohort.mkdir(parents=True)
    (cohort / "dataset.json").write_text(json.dumps({
        "name": "train_x", "numTraining": 2,
        "basalseg_synth": {"generator_version": 1, "cohort_seed": 7, "config": {"contrast": "t1_gmm"},
                           "cases": [{"template": "mni152", "atlas": "dk"}, {"template": "icbm2009c", "atlas": "dk"}]}}))
    plain = tmp_path / "real_cohort"
    plain.mkdir()
    out = tmp_path / "exported"
    export_weights(weights_dir / "prompter.pt", weights_dir / "student_litemedsam.pt", out, "litemedsam",
                   cohorts=[str(cohort), str(plain)])
    entries = {e.name: e for e in read_manifest(out)}
    assert set(entries) == {"prompter", "student-litemedsam"}
    for e in entries.values():
        assert sha256_file(out / e.file) == e.sha256 == sha256_file(weights_dir / e.file)
        described = e.info["training"]["cohorts"]
        assert described[0] == {"name": "train_x", "cases": 2, "synthetic": True, "generator_version": 1,
                                "cohort_seed": 7, "templates": ["icbm2009c", "mni152"], "atlas": ["dk"],
                                "contrast": "t1_gmm", "head": False}
        assert described[1] == {"name": "real_cohort"}
        assert str(tmp_path) not in json.dumps(e.info)
    assert entries["student-litemedsam"].foundation == "litemedsam"
    # prompter=None: the student only; the folder's prompter entry is left as it was
    export_weights(None, weights_dir / "student_litemedsam.pt", out, "litemedsam", cohorts=[str(plain)])
    again = {e.name: e for e in read_manifest(out)}
    assert again["prompter"].info == entries["prompter"].info
    assert again["student-litemedsam"].info["training"]["cohorts"] == [{"name": "real_cohort"}]
