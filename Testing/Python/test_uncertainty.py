"""Volume uncertainty: the softmax measures, the flip pass, the interval columns, synthetic
rescans, coverage, and ``compare``'s smallest detectable change."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from test_report import write_synthetic
from test_slicer_helpers import mrml_scene  # noqa: F401

from basalseg.structures import NUM_CLASSES, STRUCTURES
from basalseg.uncertainty import (UNCERTAINTY_COLUMNS, Z95, add_interval_columns, flip_probabilities, load_table,
                                  softmax_measures, volume_intervals)


def _soft_spheres(shape=(40, 36, 32), radius=6.0, width=1.0, missing=()):
    """Probabilities of 8 soft spheres (logistic edge of ``width`` voxels) on background."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    logits = np.zeros((NUM_CLASSES,) + shape, np.float32)
    centres = [(10, 9, 8), (10, 27, 8), (30, 9, 8), (30, 27, 8), (10, 9, 24), (10, 27, 24), (30, 9, 24), (30, 27, 24)]
    for c, centre in enumerate(centres, start=1):
        d = np.sqrt(((grid - np.array(centre, np.float32)[:, None, None, None]) ** 2).sum(0))
        logits[c] = (radius - d) / width
    probs = torch.softmax(torch.from_numpy(logits), 0).numpy()
    classes = probs.argmax(0).astype(np.uint8)
    for c in missing:
        classes[classes == c] = 0
    return probs, classes


def test_softmax_measures_on_soft_spheres():
    probs, classes = _soft_spheres()
    m = softmax_measures(probs, classes, voxel_ml=0.001)
    sphere = 4 / 3 * np.pi * 6.0 ** 3 / 1000
    for s in STRUCTURES:
        e = m[s.class_index]
        assert e["voxels"] * 0.001 == pytest.approx(sphere, rel=0.05)
        # the integral of a logistic edge over a ball: 4 pi (r^3 / 3 + pi^2 r / 3) (a convex shape's
        # expected volume exceeds its argmax volume)
        assert e["expected_ml"] == pytest.approx(4 * np.pi * (6.0 ** 3 / 3 + np.pi ** 2 * 6.0 / 3) / 1000, rel=0.03)
        # a logit shift of +-1 moves a logistic edge of width 1 voxel by 1 voxel: the shell's volume
        assert e["band_ml"] == pytest.approx(4 * np.pi * 6.0 ** 2 / 1000, rel=0.25)
        assert 0 < e["pb_sd_ml"] < e["band_ml"]
    # a sharper edge is surer: a smaller band
    sharp = softmax_measures(*_soft_spheres(width=0.3), voxel_ml=0.001)
    assert all(sharp[c]["band_ml"] < 0.5 * m[c]["band_ml"] for c in m)


def test_softmax_measures_missing_structure_is_zero():
    probs, classes = _soft_spheres(missing=(3,))
    m = softmax_measures(probs, classes, missing=[3])
    assert m[3] == {"voxels": 0, "expected_ml": 0.0, "pb_sd_ml": 0.0, "band_ml": 0.0}
    assert m[4]["voxels"] > 0
    with pytest.raises(ValueError):
        softmax_measures(probs[:, :-1], classes)


class _Pointwise(torch.nn.Module):
    """A 1x1x1 'network': logits = 6 * input channels (T1 -> background). Pointwise, so it
    commutes with a mirror, and a left-right channel swap at the input comes out as a class swap."""

    def forward(self, x):
        return 6.0 * x


def test_flip_pass_maps_back_onto_the_plain_pass():
    from basalseg.student import predict_student

    rng = np.random.default_rng(0)
    inputs = rng.random((NUM_CLASSES, 20, 18, 16)).astype(np.float32)  # asymmetric in every channel
    _, plain = predict_student(_Pointwise(), inputs, "cpu", return_probabilities=True)
    flipped = flip_probabilities(_Pointwise(), inputs, "cpu")
    assert flipped.shape == plain.shape
    np.testing.assert_allclose(flipped, plain, atol=1e-6)


def test_intervals_ordered_and_scaled_by_the_table():
    vols = {"Left-Putamen": 5.0, "Left-Caudate": 0.0}
    meas = {"Left-Putamen": {"band_ml": 0.2}, "Left-Caudate": {"band_ml": 0.1}}
    iv = volume_intervals(vols, meas, {"interval": {"k": {"Left-Putamen": 2.0}}})
    assert iv["Left-Putamen"]["low"] == pytest.approx(5.0 - Z95 * 2.0 * 0.2)
    assert iv["Left-Putamen"]["high"] == pytest.approx(5.0 + Z95 * 2.0 * 0.2)
    assert iv["Left-Caudate"] == {"low": 0.0, "high": 0.0, "k": 1.0}  # empty: no interval around nothing


def test_shipped_table_is_valid():
    table = load_table()
    assert table is not None, "weights/repeatability.json is shipped"
    assert table["format"] == "basalseg-repeatability"
    from pathlib import Path

    import basalseg

    manifest = json.loads((Path(basalseg.__file__).parent / "weights" / "manifest.json").read_text())
    students = [m for m in manifest["models"] if m["kind"] == "student"]
    assert table["student_sha256"] in {m.get("sha256") for m in students}
    for s in STRUCTURES:
        assert table["interval"]["k"][s.name] > 0
        rep = table["repeatability"][s.name]
        assert 0 < rep["cv_within"] < 0.5 and rep["sdc_ml"] > 0 and rep["band_ratio"] > 0
    # since 2026-12-07 both studies are of localised scans (affine): skull-stripped brains at the top
    # level, whole heads (one protocol) in the "localised" part; the same student and options
    assert table["options"]["localise"] == "on" and table["input"] == "skull-stripped"
    part = table["localised"]
    assert part["options"]["localise"] == "on" and part["protocol"] == "same" and part["input"] == "whole head"
    assert part["options"] == table["options"] and table["options"]["localise_transform"] == "affine"
    for s in STRUCTURES:
        rep = part["repeatability"][s.name]
        assert 0 < rep["cv_within"] < 0.5 and rep["sdc_ml"] > 0 and rep["band_ratio"] > 0 and rep["n_subjects"] >= 5


# ---------------------------------------------------------------------------------------------
# the pipeline writes the interval columns
# ---------------------------------------------------------------------------------------------


def _read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def segment_runs(small_t1, small_prompts_path, weights_dir, tmp_path_factory):
    """The pipeline (tiny random networks, a box-filling stand-in for the foundation model) with
    and without uncertainty, written as results."""
    from test_cli import _BoxFill

    from basalseg.imageio import load_volume
    from basalseg.pipeline import Pipeline, PipelineConfig
    from basalseg.prompts import load_prompts
    from basalseg.results import write_result

    work = tmp_path_factory.mktemp("uncertainty_runs")
    out = {}
    for mode in ("flip", "none"):  # flip: the softmax measures and the mirrored pass
        pipe = Pipeline(PipelineConfig(weights_dir=str(weights_dir), device="cpu", uncertainty=mode), backend=_BoxFill())
        result = pipe.segment(load_volume(small_t1.path), prompts=load_prompts(small_prompts_path))
        out[mode] = (result, write_result(result, work / mode))
    return out


def test_volumes_csv_has_ordered_interval_columns(segment_runs):
    result, folder = segment_runs["flip"]
    rows = _read(folder / "volumes.csv")
    assert list(rows[0]) == ["structure", "label", "voxels", "volume_mm3", "volume_ml"] + UNCERTAINTY_COLUMNS
    assert [r["structure"] for r in rows] == [s.name for s in STRUCTURES]
    nonempty = 0
    for r in rows:
        v, lo, hi = float(r["volume_ml"]), float(r["volume_ml_low"]), float(r["volume_ml_high"])
        assert 0 <= lo <= v <= hi
        assert float(r["band_ml"]) >= 0 and float(r["expected_ml"]) >= 0
        nonempty += v > 0
        if v > 0:
            assert hi > v, "a non-empty structure has a real interval"
    assert nonempty > 0
    prov = json.loads((folder / "provenance.json").read_text())
    unc = prov["volume_uncertainty"]
    assert unc["mode"] == "flip" and unc["level"] == 0.95
    # random test weights are not the student the shipped factors were fitted for
    assert unc["table"]["calibrated"] is False and ("note" in unc) == (load_table() is not None)
    for r in rows:
        entry = unc["per_structure"][r["structure"]]
        assert entry["low_ml"] == pytest.approx(float(r["volume_ml_low"])) and entry["k"] == 1.0
    assert "uncertainty" in prov["timings_s"]


def test_no_uncertainty_leaves_the_columns_blank(segment_runs):
    (r_on, f_on), (r_off, f_off) = segment_runs["flip"], segment_runs["none"]
    assert r_off.uncertainty is None and "uncertainty" not in r_off.timings
    on, off = _read(f_on / "volumes.csv"), _read(f_off / "volumes.csv")
    assert list(off[0]) == list(on[0])
    assert all(r[c] == "" for r in off for c in UNCERTAINTY_COLUMNS)
    # the labelmap does not depend on the switch
    assert [r["voxels"] for r in on] == [r["voxels"] for r in off]
    assert json.loads((f_off / "provenance.json").read_text())["volume_uncertainty"] == {"mode": "none"}
    from basalseg.results import read_result

    rec = read_result(f_off)
    assert rec.interval("left_putamen") is None and read_result(f_on).interval("left_putamen") is not None


def test_flip_mode_records_the_mirrored_pass(segment_runs):
    result, folder = segment_runs["flip"]
    per = json.loads((folder / "provenance.json").read_text())["volume_uncertainty"]["per_structure"]
    for name, entry in per.items():
        assert entry["flip_ml"] >= 0 and entry["flip_half_diff_ml"] >= 0


def test_cli_no_uncertainty_flag():
    from basalseg.commands import build_parser
    from basalseg.commands.options import pipeline_config as _config

    args = build_parser().parse_args(["segment", "x.nii.gz", "--out", "o", "--no-uncertainty"])
    assert _config(args).uncertainty == "none"
    assert _config(build_parser().parse_args(["segment", "x.nii.gz", "--out", "o"])).uncertainty == "softmax"


def test_table_for_another_student_is_not_used():
    rows = [{"structure": s.name, "volume_ml": 4.0} for s in STRUCTURES]
    unc = {"mode": "softmax", "measures": {s.name: {"voxels": 4000, "expected_ml": 4.0, "pb_sd_ml": 0.01, "band_ml": 0.1}
                                           for s in STRUCTURES}, "seconds": 0.1}
    table = {"student_sha256": "c" * 64, "interval": {"k": {s.name: 3.0 for s in STRUCTURES}}}
    same = add_interval_columns([dict(r) for r in rows], unc, table, student_sha256="c" * 64)
    other = add_interval_columns([dict(r) for r in rows], unc, table, student_sha256="d" * 64)
    assert same["per_structure"]["Left-Putamen"]["k"] == 3.0 and "note" not in same
    assert other["per_structure"]["Left-Putamen"]["k"] == 1.0 and "another student" in other["note"]


# ---------------------------------------------------------------------------------------------
# synthetic rescans and coverage
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rescan_source():
    """MNI152 and its DK labels cropped to the structures + 20 mm (as test_data_synth does)."""
    from basalseg.data import atlas
    from basalseg.data.synth import SynthConfig, prepare_source
    from basalseg.imageio import Volume
    from basalseg.spatial import bounding_box

    template = atlas.load_template("mni152")
    labels = atlas.load_reference_labels("mni152", "dk", full=True)
    box = bounding_box(np.isin(labels, [s.label for s in STRUCTURES]), margin=20)
    affine = template.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([b.start for b in box], float) + affine[:3, 3]
    crop = Volume(np.ascontiguousarray(template.data[box]), affine), np.ascontiguousarray(labels[box])
    return prepare_source(*crop, SynthConfig(roi="structures", margin_mm=15.0), name="mni152_crop")


def test_rescan_keeps_anatomy_and_changes_the_scan(rescan_source):
    from basalseg.data.synth import SynthConfig, synthesize

    cfg = SynthConfig(roi="structures", margin_mm=15.0, thick_slice_prob=0.0)
    base, again = synthesize(rescan_source, 5, cfg), synthesize(rescan_source, 5, cfg, rescan=0)
    assert np.array_equal(base.image.data, again.image.data), "rescan 0 is the subject itself"
    r1, r2 = synthesize(rescan_source, 5, cfg, rescan=1), synthesize(rescan_source, 5, cfg, rescan=2)
    assert r1.params["structure_volume_factor"] == base.params["structure_volume_factor"]
    assert r1.params["scale"] == base.params["scale"] and r1.params["shear"] == base.params["shear"]
    assert r1.params["rotation_deg"] == base.params["rotation_deg"]  # the subject's own draws ...
    assert r1.params["rescan"]["pose_rotation_deg"] != r2.params["rescan"]["pose_rotation_deg"]  # ... in a new pose
    assert "rescan" not in base.params
    assert r1.params["bias_std"] != base.params["bias_std"] and r1.params["rescan"]["index"] == 1
    assert not np.array_equal(r1.labels, base.labels)  # a new pose on the grid
    for key, v in base.params["volumes_mm3"].items():  # but the same true volumes (label resampling aside)
        assert r1.params["volumes_mm3"][key] == pytest.approx(v, rel=0.03)
        assert r2.params["volumes_mm3"][key] == pytest.approx(v, rel=0.03)
    other = synthesize(rescan_source, 6, cfg)
    assert any(abs(other.params["volumes_mm3"][k] / v - 1) > 0.03 for k, v in base.params["volumes_mm3"].items())


def test_coverage_on_a_small_synthetic_set(tmp_path):
    """The study's fitting and coverage code (scripts/repeatability.py) on made-up records: a
    factor fitted on one set covers ~95 % of a second set drawn the same way, and the
    repeatability figures come out as defined."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("repeatability", Path(__file__).resolve().parents[2] / "scripts" / "repeatability.py")
    rep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rep)
    rng = np.random.default_rng(1)
    name = "Left-Putamen"

    def records(cohort, n_subjects, n_scans):
        out = []
        for s in range(n_subjects):
            true = rng.uniform(4, 6)
            bias = rng.normal(0, 0.03)
            for k in range(n_scans):
                band = rng.uniform(0.05, 0.15)
                v = true * (1 + bias) + rng.normal(0, 0.02 * true)
                out.append({"cohort": cohort, "subject": f"s{s}", "volume_ml": {name: v}, "reference_ml": {name: true},
                            "measures": {name: {"band_ml": band}}})
        return out

    fit, held = records("fit", 60, 3), records("held", 60, 3)
    k = rep._fit_k(fit, name, "band")
    assert 0.95 <= rep._coverage(fit, name, "band", k) <= 0.96
    assert 0.90 <= rep._coverage(held, name, "band", k) <= 0.99
    assert rep._coverage(held, name, "band", 0.5 * k) < 0.85
    r = rep._repeatability(held, name)
    assert r["dof"] == 120 and r["cv_within"] == pytest.approx(0.02, rel=0.2)
    assert r["sdc_ml"] == pytest.approx(Z95 * np.sqrt(2) * r["sd_within_ml"])


# ---------------------------------------------------------------------------------------------
# compare: a real change against a rescan
# ---------------------------------------------------------------------------------------------

TABLE = {"format": "basalseg-repeatability", "student_sha256": "b" * 64,
         "repeatability": {s.name: {"cv_within": 0.02, "band_ratio": 0.1} for s in STRUCTURES}}


def _with_uncertainty(folder, scale=None, seed=0, localised=False, head_fraction=0.8):
    """A synthetic result folder with an interval (band 1 % of each volume); ``localised``: as a
    whole head that ``--localise auto`` registered to the template."""
    from test_report import synthetic_result

    from basalseg.results import write_result

    result = synthetic_result(scale=scale, seed=seed)
    if localised:
        result.provenance.setdefault("options", {})["localise"] = "auto"
        result.provenance["localisation"] = {"mode": "auto", "applied": True,
                                             "contrast": {} if head_fraction is None else {"head_tissue_fraction": head_fraction}}
    vox = result.volume.voxel_volume_mm3 / 1000
    counts = {s.name: int((result.labels == s.label).sum()) for s in STRUCTURES}
    result.uncertainty = {"mode": "softmax", "seconds": 0.0, "measures": {
        n: {"voxels": c, "expected_ml": c * vox, "pb_sd_ml": 0.001, "band_ml": 0.01 * c * vox} for n, c in counts.items()}}
    return write_result(result, folder)


def test_compare_flags_a_10_percent_shrinkage_and_not_a_rescan(tmp_path):
    from basalseg.longitudinal import compare_results, format_table

    a = _with_uncertainty(tmp_path / "A")
    rescan = _with_uncertainty(tmp_path / "R", scale={s.key: 1.01 for s in STRUCTURES}, seed=1)  # +-1 %: noise
    shrunk = _with_uncertainty(tmp_path / "S", scale={"left_putamen": 0.90}, seed=2)
    c = compare_results(a, rescan, "2020-01-01", "2021-01-01", table=TABLE)
    assert c.sdc_note is None
    for r in c.rows[:8]:
        assert r["sdc_ml"] > 0 and r["exceeds_sdc"] is False, r["structure"]
        assert r["volume_ml_low_a"] < r["volume_ml_a"] < r["volume_ml_high_a"]
    c = compare_results(a, shrunk, "2020-01-01", "2021-01-01", table=TABLE)
    rows = {r["structure"]: r for r in c.rows}
    put = rows["Left-Putamen"]
    assert put["percent_change"] == pytest.approx(-10, abs=3)
    assert put["exceeds_sdc"] is True and put["change_over_sdc"] > 1.3
    assert put["sdc_ml"] == pytest.approx(Z95 * np.hypot(0.02 * put["volume_ml_a"], 0.02 * put["volume_ml_b"]))
    assert not any(r["exceeds_sdc"] for n, r in rows.items() if n != "Left-Putamen" and r["exceeds_sdc"] is not None)
    text = format_table(c)
    assert "real change?" in text and "yes (" in text and "A 95 %" in text
    csv_rows = list(csv.DictReader(c.csv_text().splitlines()))
    assert next(r for r in csv_rows if r["structure"] == "Left-Putamen")["exceeds_sdc"] == "yes"
    assert next(r for r in csv_rows if r["structure"] == "Left-Caudate")["exceeds_sdc"] == "no"


def test_compare_of_localised_heads_uses_the_head_study(tmp_path):
    """Two localised results take the SDC of the table's ``localised`` part (here CV 5 % against the
    top level's 2 %), and every output names the study; a localised result against one segmented as
    it is gets none."""
    from basalseg.longitudinal import changes_csv_text, compare_results, format_table

    heads = {"options": {"localise": "on"}, "protocol": "same", "input": "whole head",
             "repeatability": {s.name: {"cv_within": 0.05, "band_ratio": 0.1} for s in STRUCTURES}}
    table = {**TABLE, "localised": heads}
    a = _with_uncertainty(tmp_path / "A", localised=True)
    b = _with_uncertainty(tmp_path / "B", scale={"left_putamen": 0.90}, seed=2, localised=True)
    c = compare_results(a, b, "2020-01-01", "2021-01-01", table=table)
    put = next(r for r in c.rows if r["structure"] == "Left-Putamen")
    assert put["sdc_ml"] == pytest.approx(Z95 * np.hypot(0.05 * put["volume_ml_a"], 0.05 * put["volume_ml_b"]))
    assert put["exceeds_sdc"] is False  # -10 % is within this study's SDC (~14 %), not the skull-stripped one's
    assert c.sdc_note is None and "localised whole-head rescans" in c.sdc_study
    assert "from the study of localised whole-head rescans" in format_table(c)
    assert "about one pair of scans in three" in format_table(c)  # 8 structures, each tested at 95 %
    row = next(r for r in csv.DictReader(changes_csv_text([("sub-01", c.a, c.b, c)]).splitlines())
               if r["structure"] == "Left-Putamen")
    assert row["subject"] == "sub-01" and "localised whole-head" in row["sdc_study"] and row["sdc_note"] == ""
    stripped = _with_uncertainty(tmp_path / "S", seed=3)
    c = compare_results(a, stripped, "2020-01-01", "2021-01-01", table=table)
    assert c.sdc_study is None and "went different ways" in c.sdc_note
    assert all(r["sdc_ml"] is None for r in c.rows)
    c = compare_results(_with_uncertainty(tmp_path / "S2", seed=4), stripped, "2020-01-01", "2021-01-01", table=table)
    assert "skull-stripped rescans" in c.sdc_study
    # the study is of whole heads: not for a skull-stripped brain that was localised ...
    turned = _with_uncertainty(tmp_path / "T", seed=5, localised=True, head_fraction=0.02)
    c = compare_results(a, turned, "2020-01-01", "2021-01-01", table=table)
    assert c.sdc_study is None and "B is a skull-stripped brain" in c.sdc_note
    # ... nor for a result that does not record what its input was
    old = _with_uncertainty(tmp_path / "O", seed=6, localised=True, head_fraction=None)
    c = compare_results(old, a, "2020-01-01", "2021-01-01", table=table)
    assert c.sdc_study is None and "A does not record whether its input was a whole head" in c.sdc_note


def test_compare_scan_band_widens_the_sdc(tmp_path):
    from basalseg.longitudinal import add_sdc

    row = {"volume_ml_a": 5.0, "volume_ml_b": 5.0, "change_ml": 0.3}
    add_sdc(row, TABLE, "Left-Putamen", band_a=0.05, band_b=0.05)  # bands typical: the table's CV rules
    assert row["sdc_ml"] == pytest.approx(Z95 * np.hypot(0.1, 0.1)) and row["exceeds_sdc"] is True
    add_sdc(row, TABLE, "Left-Putamen", band_a=2.0, band_b=0.05)  # an unsure scan A: a larger SDC
    assert row["sdc_ml"] == pytest.approx(Z95 * np.hypot(0.2, 0.1)) and row["exceeds_sdc"] is False


def test_compare_without_a_matching_table_says_why(tmp_path):
    from basalseg.longitudinal import compare_results, format_table

    a, b = _with_uncertainty(tmp_path / "A"), _with_uncertainty(tmp_path / "B", seed=1)
    c = compare_results(a, b, "2020-01-01", "2021-01-01", table={**TABLE, "student_sha256": "e" * 64})
    assert all(r["sdc_ml"] is None and r["exceeds_sdc"] is None for r in c.rows)
    assert "not made with the student" in c.sdc_note and c.sdc_note in format_table(c)


def test_report_longitudinal_view(tmp_path, monkeypatch):
    import re

    import basalseg.uncertainty
    from basalseg.report import build_report

    monkeypatch.setattr(basalseg.uncertainty, "load_table", lambda path=None: TABLE)
    out = tmp_path / "out"
    info = lambda ses, date: {"subject": "sub-01", "session": ses, "session_date": date,  # noqa: E731
                              "bids_entities": {"sub": "01", "ses": ses}}
    for name, ses, date, scale in (("sub-01_ses-2", "2", "2021-01-01", {"left_putamen": 0.9}),
                                   ("sub-01_ses-1", "1", "2020-01-01", None)):
        folder = _with_uncertainty(out / name, scale=scale)
        prov = json.loads((folder / "provenance.json").read_text())
        prov["scan_info"] = info(ses, date)
        (folder / "provenance.json").write_text(json.dumps(prov))
    write_synthetic(out / "sub-02")  # one session only, no interval
    page = build_report(out, verify=False).read_text()
    tables = re.findall(r'<table class="longitudinal" data-subject="([^"]+)" data-a="([^"]+)" data-b="([^"]+)"', page)
    assert tables == [("sub-01", "sub-01_ses-1", "sub-01_ses-2")]
    assert re.search(r'<tr data-structure="Left-Putamen">.*?data-real="yes"', page)
    assert "about one pair of scans in three" in page and "SDC from the study of skull-stripped rescans" in page
    assert re.search(r'<tr data-structure="Left-Caudate">.*?data-real="no"', page)
    assert 'class="ci"' in page


def test_slicer_volumes_table_gets_the_interval_columns(mrml_scene):
    """The Slicer volumes table (BasalSegSAMLib): interval columns when the result has them."""
    pytest.importorskip("slicer")
    from BasalSegSAMLib import mrmlbridge

    labels = np.zeros((6, 6, 6), np.int16)
    labels[1:3, 1:3, 1:3] = 12
    rows = [{"structure": s.name, "volume_ml_low": 0.001 * s.label, "volume_ml_high": 0.002 * s.label} for s in STRUCTURES]
    intervals = mrmlbridge.intervalsFromRows(rows)
    table = mrmlbridge.volumesToTable(labels, 1.0, None, scene=mrml_scene, intervals=intervals)
    got = mrmlbridge.tableRows(table)
    assert list(got[0]) == ["structure", "label", "voxels", "volume_mm3", "volume_ml", "volume_ml_low", "volume_ml_high"]
    put = next(r for r in got if r["structure"] == "Left-Putamen")
    assert (put["voxels"], put["volume_ml_low"], put["volume_ml_high"]) == (8, pytest.approx(0.012), pytest.approx(0.024))
    assert mrmlbridge.intervalsFromRows([{"structure": "x", "volume_ml_low": None, "volume_ml_high": None}]) is None
    plain = mrmlbridge.volumesToTable(labels, 1.0, table, scene=mrml_scene)  # e.g. after manual edits: no interval
    assert "volume_ml_low" not in mrmlbridge.tableRows(plain)[0]


def test_a_localised_runs_measures_are_in_the_inputs_millilitres():
    """The student's measures are counted on the template grid; with an affine localisation a
    template voxel holds |det A| mm^3 of the input, so they are scaled to the input's mL (as
    ``volume_ml``, counted on the input grid, is); the voxel counts stay template-grid counts."""
    from types import SimpleNamespace

    from basalseg.pipeline import _to_input_ml

    matrix = np.diag([1.1, 1.0, 1.2, 1.0])
    matrix[:3, 3] = [5.0, -3.0, 40.0]
    record = {"mode": "softmax", "measures": {"Left-Thalamus": {"voxels": 1000, "expected_ml": 1.0, "band_ml": 0.1,
                                                                "pb_sd_ml": 0.01}}}
    _to_input_ml(record, SimpleNamespace(template_to_input=matrix))
    entry = record["measures"]["Left-Thalamus"]
    assert entry["voxels"] == 1000 and record["ml_per_template_ml"] == pytest.approx(1.32)
    assert (entry["expected_ml"], entry["band_ml"], entry["pb_sd_ml"]) == pytest.approx((1.32, 0.132, 0.0132))
    _to_input_ml(None, SimpleNamespace(template_to_input=matrix))  # --no-uncertainty: nothing to scale
