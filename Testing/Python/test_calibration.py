"""The student's volume calibration: per-class logit offsets fitted on validation cases
(:mod:`basalseg.calibration`, ``basalseg calibrate``), used by the pipeline and the evaluation."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import TINY_STUDENT_ARCH, dice, run_cli

from basalseg.calibration import apply_offsets, fit_volume_offsets, offsets_from_meta
from basalseg.structures import NUM_CLASSES, STRUCTURES


def _biased_case(shift: dict[int, float], seed: int, shape=(64, 64, 48)):
    """Logits of 8 spheres whose boundary lies ``shift[k]`` voxels outside (> 0: over-segmented)
    or inside (< 0) the reference sphere; logit slope 1 per voxel, background logit 0."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    logits = np.zeros((NUM_CLASSES,) + shape, np.float32)
    logits[1:] = -20.0
    ref = np.zeros(shape, np.uint8)
    centres = [(14, 14, 12), (14, 36, 12), (36, 14, 12), (36, 36, 12), (14, 14, 34), (14, 36, 34), (36, 14, 34),
               (36, 36, 34)]
    for k, c in enumerate(centres, start=1):
        radius = 5.0 + rng.uniform(0, 2)
        r = np.sqrt(((grid - np.array(c)[:, None, None, None]) ** 2).sum(0))
        logits[k] = np.maximum(logits[k], radius + shift.get(k, 0.0) - r)
        ref[r <= radius] = k
    return logits, ref


def test_fit_volume_offsets_removes_a_known_bias():
    # structures 1-4 over-segmented by 2 voxels, 5 under-segmented by 1, 6-8 unbiased
    shift = {1: 2.0, 2: 2.0, 3: 2.0, 4: 2.0, 5: -1.0}
    cases = [_biased_case(shift, seed) for seed in range(3)]
    offsets, report = fit_volume_offsets([c[0] for c in cases], [c[1] for c in cases])
    assert offsets.shape == (NUM_CLASSES,) and offsets[0] == 0
    # the offset that moves a slope-1 boundary by s voxels is -s
    assert np.allclose(offsets[1:5], -2.0, atol=0.3)
    assert offsets[5] == pytest.approx(1.0, abs=0.3)
    assert np.allclose(offsets[6:], 0.0, atol=0.3)
    before = np.array(list(report["log_volume_ratio_before"].values()))
    after = np.array(list(report["log_volume_ratio_after"].values()))
    assert before[:4].min() > 0.5 and before[4] < -0.2  # the bias was there
    assert np.abs(after).max() < 0.1
    # on an unseen case with the same bias, the calibrated labels match the reference better
    logits, ref = _biased_case(shift, seed=10)
    plain, calibrated = apply_offsets(logits, None), apply_offsets(logits, offsets)
    for k in range(1, 6):
        assert dice(calibrated == k, ref == k) > dice(plain == k, ref == k) + 0.05


def test_fit_volume_offsets_tied_sides_and_extra_reference_voxels():
    shift = {s.class_index: (2.0 if s.name.startswith("Left") else 1.0) for s in STRUCTURES}
    cases = [_biased_case(shift, seed) for seed in range(2)]
    offsets, _ = fit_volume_offsets([c[0] for c in cases], [c[1] for c in cases], tie_sides=True)
    by_name = {s.name: offsets[s.class_index] for s in STRUCTURES}
    for s in STRUCTURES:
        other = s.name.replace("Left", "Right") if s.name.startswith("Left") else s.name.replace("Right", "Left")
        assert by_name[s.name] == by_name[other]
    assert -2.3 < offsets[1] < -0.7  # between the two sides' biases
    # reference voxels outside the crop count towards the reference volume: less shrinking
    extra = [np.bincount(c[1].ravel(), minlength=NUM_CLASSES) for c in cases]  # doubles every reference
    grown, _ = fit_volume_offsets([c[0] for c in cases], [c[1] for c in cases], extra)
    assert (grown[1:] > offsets[1:]).all()


def test_fit_volume_offsets_errors():
    logits, ref = _biased_case({}, 0)
    with pytest.raises(ValueError, match="same number"):
        fit_volume_offsets([logits], [])
    with pytest.raises(ValueError, match="does not match"):
        fit_volume_offsets([logits], [ref[:-1]])
    # a structure no case has keeps offset 0 and is reported, the others are still fitted
    shift = {k: 2.0 for k in range(1, 9)}
    logits, ref = _biased_case(shift, 0)
    ref[ref == 3] = 0
    offsets, report = fit_volume_offsets([logits], [ref])
    assert offsets[3] == 0 and report["not_fitted"] == [STRUCTURES[2].name]
    assert report["log_volume_ratio_before"][STRUCTURES[2].name] is None
    assert np.allclose(np.delete(offsets, [0, 3]), -2.0, atol=0.3)


def test_offsets_from_meta_and_apply():
    assert offsets_from_meta({}) is None and offsets_from_meta(None) is None
    assert offsets_from_meta({"calibration": None}) is None
    good = offsets_from_meta({"calibration": {"logit_offsets": [0] + [-0.5] * 8}})
    assert good.dtype == np.float32 and good[1] == -0.5
    with pytest.raises(ValueError, match="9 finite"):
        offsets_from_meta({"calibration": {"logit_offsets": [0, 1]}})
    with pytest.raises(ValueError, match="9 finite"):
        offsets_from_meta({"calibration": {"logit_offsets": [float("nan")] * 9}})
    logits = np.zeros((NUM_CLASSES, 2, 2, 2), np.float32)
    logits[3] = 1.0
    assert (apply_offsets(logits, None) == 3).all()
    assert (apply_offsets(logits, np.array([0, 0, 0, -2, 0, 0, 0, 0, 0], np.float32)) == 0).all()


def test_predict_student_offsets():
    from basalseg.networks import build_network
    from basalseg.student import predict_student

    torch.manual_seed(0)
    net = build_network(TINY_STUDENT_ARCH).eval()
    x = np.random.default_rng(0).random((9, 24, 20, 16)).astype(np.float32)
    plain = predict_student(net, x)
    assert np.array_equal(predict_student(net, x, logit_offsets=np.zeros(9, np.float32)), plain)
    logits = predict_student(net, x, return_logits=True)
    assert logits.shape == (9, 24, 20, 16) and np.array_equal(logits.argmax(0).astype(np.uint8), plain)
    none = predict_student(net, x, logit_offsets=np.array([0] + [-1000] * 8, np.float32))
    assert (none == 0).all()
    classes, probs = predict_student(net, x, return_probabilities=True, logit_offsets=np.array([1000] + [0] * 8, np.float32))
    assert (classes == 0).all() and np.allclose(probs[0], 1.0)


def test_calibrate_command_pipeline_and_evaluation(weights_dir, monkeypatch, tmp_path):
    from test_context_planes import _evaluate_cohort_command

    from basalseg.networks import load_checkpoint, save_checkpoint
    from basalseg.pipeline import Pipeline, PipelineConfig

    common = _evaluate_cohort_command(tmp_path, monkeypatch, weights_dir, [])
    student = weights_dir / "student_litemedsam.pt"
    base = ["calibrate", "--cohort", tmp_path / "heldout", "--work", tmp_path / "work", "--prompter", "p.pt",
            "--student", student, "--device", "cpu"]
    out = tmp_path / "calibrated.pt"
    assert run_cli(base + ["--out", out]) == 0
    _, meta = load_checkpoint(out, "student")
    cal = meta["calibration"]
    assert len(cal["logit_offsets"]) == NUM_CLASSES and cal["cases"] == ["case001"] and cal["logit_offsets"][0] == 0
    assert cal["context"] is True  # fitted on the pipeline's default foundation variant
    assert (tmp_path / "work" / "heldout" / "foundation" / "litemedsam-ctx3" / "case001.npz").is_file()
    assert set(cal["log_volume_ratio_after"]) == {s.name for s in STRUCTURES}
    # the tiny cohort has caudate and putamen only: thalamus and pallidum are left at 0
    assert sorted(cal["not_fitted"]) == sorted(s.name for s in STRUCTURES if "Thalamus" in s.name or "Pallidum" in s.name)
    assert all(cal["logit_offsets"][s.class_index] == 0 for s in STRUCTURES if s.name in cal["not_fitted"])
    # an existing output is never replaced silently
    before = out.read_bytes()
    assert run_cli(base + ["--out", out]) == 2
    assert out.read_bytes() == before
    # a student trained on the calibration case is refused (that would be fitting on training data)
    net, _ = load_checkpoint(student, "student")
    leaky = tmp_path / "leaky.pt"
    save_checkpoint(leaky, "student", TINY_STUDENT_ARCH, net, {"foundation": "litemedsam",
                                                               "training": {"cases": ["case001"]}})
    base_leaky = [a if a != student else leaky for a in base]
    assert run_cli(base_leaky + ["--out", tmp_path / "x.pt"]) == 2
    assert not (tmp_path / "x.pt").exists()

    # --manifest: an unreadable manifest or one without the file is refused before any work
    folder = tmp_path / "w"
    folder.mkdir()
    assert run_cli(base + ["--manifest", folder, "--out", folder / "s.pt"]) == 2
    (folder / "manifest.json").write_text('{"models": []}')
    assert run_cli(base + ["--manifest", folder, "--out", folder / "s.pt"]) == 2
    assert not (folder / "s.pt").exists()
    # ... and a listed file gets its calibration and new sha256 in the manifest
    import json

    from basalseg.download import sha256_file
    (folder / "manifest.json").write_text(json.dumps({"format": "basalseg-weights-manifest", "version": 1, "models": [
        {"name": "student-litemedsam", "kind": "student", "file": "s.pt", "sha256": "0" * 64}]}))
    assert run_cli(base + ["--manifest", folder, "--out", folder / "s.pt"]) == 0
    listed = json.loads((folder / "manifest.json").read_text())["models"][0]
    assert listed["sha256"] == sha256_file(folder / "s.pt") and listed["calibration"]["cases"] == ["case001"]

    # a validation split file picks the calibration cases out of a cohort
    split = tmp_path / "split.json"
    split.write_text('{"train": ["a"], "val": ["case001"]}')
    assert run_cli(base + ["--validation-split", split, "--out", tmp_path / "split.pt"]) == 0
    assert load_checkpoint(tmp_path / "split.pt", "student")[1]["calibration"]["cases"] == ["case001"]
    split.write_text('{"train": ["case001"], "val": ["other"]}')
    assert run_cli(base + ["--validation-split", split, "--out", tmp_path / "none.pt"]) == 2
    split.write_text('not json')
    assert run_cli(base + ["--validation-split", split, "--out", tmp_path / "none.pt"]) == 2
    assert not (tmp_path / "none.pt").exists()

    # the pipeline uses the offsets unless told not to, and records them
    pipe = Pipeline(PipelineConfig(weights_dir=str(weights_dir), student_checkpoint=str(out), device="cpu"))
    _ = pipe.student
    assert np.allclose(pipe.student_offsets(), cal["logit_offsets"])
    assert pipe.provenance()["options"]["calibration"] == pytest.approx(cal["logit_offsets"])
    plain = Pipeline(PipelineConfig(weights_dir=str(weights_dir), student_checkpoint=str(out), device="cpu",
                                    calibrate=False))
    _ = plain.student
    assert plain.student_offsets() is None and plain.provenance()["options"]["calibration"] is None

    # the evaluation scores the calibrated student as the pipeline runs it, and without calibration
    args = [a if not str(a).startswith("T1+SDM=") else f"T1+SDM={out}" for a in common]
    assert run_cli(args + ["--out", tmp_path / "r"]) == 0
    with open(tmp_path / "r" / "metrics.csv", newline="") as fh:
        variants = [row["variant"] for row in csv.DictReader(fh)]
    assert variants.count("T1+SDM") == 8 and variants.count("T1+SDM (uncalibrated)") == 8
    assert "T1+SDM (uncalibrated)" in (tmp_path / "r" / "report.md").read_text()
    # ... and the volume read from its softmax (expected_ml) scored beside the voxel count
    assert variants.count("T1+SDM (expected volume)") == 8
    assert "| T1+SDM (expected volume) | n/a |" in (tmp_path / "r" / "report.md").read_text()

    # the mirror test-time augmentation: the default fit is on its logits, as the pipeline runs the
    # student; evaluate-cohort scores the first student also without it, and not at all with --no-mirror-tta
    assert cal["mirror_tta"] is True
    assert variants.count("T1+SDM (no TTA)") == 8
    assert run_cli(base + ["--out", tmp_path / "single.pt", "--no-mirror-tta"]) == 0
    single = load_checkpoint(tmp_path / "single.pt", "student")[1]["calibration"]
    assert single["mirror_tta"] is False and single["logit_offsets"] != cal["logit_offsets"]
    assert run_cli(args + ["--out", tmp_path / "rt", "--no-mirror-tta"]) == 0
    with open(tmp_path / "rt" / "metrics.csv", newline="") as fh:
        variants = [row["variant"] for row in csv.DictReader(fh)]
    assert variants.count("T1+SDM (no TTA)") == 0 and variants.count("T1+SDM") == 8


def test_no_calibration_option():
    from basalseg.commands import build_parser
    from basalseg.commands.options import pipeline_config as _config

    parser = build_parser()
    assert _config(parser.parse_args(["segment", "in", "--out", "o"])).calibrate is True
    assert _config(parser.parse_args(["segment", "in", "--out", "o", "--no-calibration"])).calibrate is False
    assert _config(parser.parse_args(["batch", "in", "--out", "o", "--no-calibration"])).calibrate is False


def test_pipeline_refuses_a_corrupt_calibration(weights_dir, tmp_path):
    from basalseg.errors import CheckpointError
    from basalseg.networks import load_checkpoint, save_checkpoint
    from basalseg.pipeline import Pipeline, PipelineConfig

    net, meta = load_checkpoint(weights_dir / "student_litemedsam.pt", "student")
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, "student", TINY_STUDENT_ARCH, net, dict(meta, calibration={"logit_offsets": [0, -1]}))
    pipe = Pipeline(PipelineConfig(weights_dir=str(weights_dir), student_checkpoint=str(bad), device="cpu"))
    _ = pipe.student
    with pytest.raises(CheckpointError, match="9 finite logit offsets"):
        pipe.student_offsets()
    # without calibration the same checkpoint still runs
    off = Pipeline(PipelineConfig(weights_dir=str(weights_dir), student_checkpoint=str(bad), device="cpu",
                                  calibrate=False))
    _ = off.student
    assert off.student_offsets() is None


def test_expected_volume_rows_sum_the_softmax_with_the_calibration():
    import torch

    from basalseg.structures import STRUCTURES
    from basalseg.training.evaluate_cohort import expected_volume_rows

    logits = np.zeros((9, 4, 5, 6), np.float32)
    logits[0] = 5.0                       # background everywhere ...
    logits[1, :2] = 5.0                   # ... but class 1 ties with it on 2 x 5 x 6 = 60 voxels: p = 0.5 there
    ref = np.zeros((4, 5, 6), np.uint8)
    ref.reshape(-1)[:30] = 1              # reference: 30 voxels
    rows = {r["structure"]: r for r in expected_volume_rows(logits, None, ref, "c")}
    first = STRUCTURES[0].name
    probs = torch.softmax(torch.as_tensor(logits), 0).numpy()
    assert rows[first]["volume_pred_ml"] == pytest.approx(probs[1].sum() / 1000.0)
    assert rows[first]["volume_accuracy"] == pytest.approx(1.0 - abs(probs[1].sum() - 30) / 30)
    assert abs(probs[1].sum() - 30) < 1.0  # the ties count half each; an argmax would give 0 or 60 voxels
    assert np.isnan(rows[first]["dice"]) and np.isnan(rows[first]["hd95_mm"])
    assert np.isnan(rows[STRUCTURES[1].name]["volume_accuracy"])  # no reference voxels: undefined
    # a calibration offset moves the expected volume as it moves the softmax
    offsets = np.zeros(9, np.float32)
    offsets[1] = -20.0
    shifted = {r["structure"]: r for r in expected_volume_rows(logits, offsets, ref, "c")}
    assert shifted[first]["volume_pred_ml"] < 1e-6 and shifted[first]["volume_accuracy"] == pytest.approx(0.0, abs=1e-3)
