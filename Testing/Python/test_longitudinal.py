"""``basalseg compare``: change between two results, from synthetic result folders of known volumes."""

from __future__ import annotations

import datetime
import json

import pytest
from test_report import read_csv, register_commands, synthetic_result, write_synthetic

from basalseg.errors import BasalSegError
from basalseg.longitudinal import COMPARE_COLUMNS, compare_results, format_table
from basalseg.structures import STRUCTURES


def _pair(tmp_path, scale_b=1.3, **b_kwargs):
    a = write_synthetic(tmp_path / "A", scan_info={"subject": "sub-01", "session": "ses-1", "session_date": "2020-01-01",
                                                   "date_source": "sub-01_sessions.tsv acq_time",
                                                   "bids_entities": {"sub": "01", "ses": "1"}},
                        brain={"status": "ok", "brain_mask_ml": 1500.0, "brain_volume_ml": 1300.0})
    b_kwargs.setdefault("scan_info", {"subject": "sub-01", "session": "ses-2", "session_date": "2022-01-01",
                                      "bids_entities": {"sub": "01", "ses": "2"}})
    b_kwargs.setdefault("brain", {"status": "ok", "brain_mask_ml": 1530.0, "brain_volume_ml": 1287.0})
    b = write_synthetic(tmp_path / "B", scale={"left_putamen": scale_b, "right_caudate": 0.8}, **b_kwargs)
    return a, b


def _volumes(folder):
    return {r["structure"]: float(r["volume_ml"]) for r in read_csv(folder / "volumes.csv")}


def test_change_table(tmp_path):
    a, b = _pair(tmp_path)
    c = compare_results(a, b)
    va, vb = _volumes(a), _volumes(b)
    assert c.interval_days == (datetime.date(2022, 1, 1) - datetime.date(2020, 1, 1)).days == 731
    assert c.date_source_a == "provenance.json (sub-01_sessions.tsv acq_time)"
    rows = {r["structure"]: r for r in c.rows}
    assert list(rows) == [s.name for s in STRUCTURES] + ["BrainMask", "Brain"]
    for s in STRUCTURES:
        r = rows[s.name]
        assert (r["volume_ml_a"], r["volume_ml_b"]) == (va[s.name], vb[s.name])
        assert r["change_ml"] == pytest.approx(vb[s.name] - va[s.name])
        assert r["percent_change"] == pytest.approx(100 * (vb[s.name] - va[s.name]) / va[s.name])
        assert r["annualised_percent_change"] == pytest.approx(r["percent_change"] / (731 / 365.25))
        assert r["percent_change_symmetric"] == pytest.approx(200 * (vb[s.name] - va[s.name]) / (va[s.name] + vb[s.name]))
    assert rows["Left-Putamen"]["percent_change"] == pytest.approx(30, abs=4)  # ellipsoid grown by 1.3 in volume
    assert rows["Right-Caudate"]["percent_change"] == pytest.approx(-20, abs=4)
    assert rows["Left-Thalamus"]["change_ml"] == 0
    assert rows["BrainMask"]["percent_change"] == pytest.approx(2.0) and rows["Brain"]["change_ml"] == pytest.approx(-13)
    assert c.warnings == []
    text = format_table(c)
    assert "interval: 731 days (2.00 years)" in text and "Left-Putamen" in text and "%/year" in text


def test_truncated_brain_volumes_are_named(tmp_path):
    """A brain cut by the field of view (icv status "truncated") gives lower bounds: its brain-volume
    change is given with a warning, which names the scan."""
    a, b = _pair(tmp_path, brain={"status": "truncated", "brain_mask_ml": 900.0, "brain_volume_ml": 800.0})
    c = compare_results(a, b)
    assert [w for w in c.warnings if "field of view's border in B" in w and "lower bounds" in w]
    assert not [w for w in compare_results(*_pair(tmp_path / "ok")).warnings if "border" in w]


def test_compare_command_writes_csv(tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    register_commands(monkeypatch)
    a, b = _pair(tmp_path)
    out = tmp_path / "change.csv"
    rc = run_cli(["compare", a, b, "--out", out, "--date-a", "2021-01-01", "--date-b", "2021-07-02"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err == "" and "interval: 182 days" in captured.out and f"wrote {out}" in captured.out
    rows = read_csv(out)
    assert list(rows[0]) == COMPARE_COLUMNS and len(rows) == 10
    putamen = next(r for r in rows if r["structure"] == "Left-Putamen")
    assert putamen["interval_days"] == "182" and putamen["date_a"] == "2021-01-01" and putamen["scan_b"] == "B"
    va, vb = _volumes(a)["Left-Putamen"], _volumes(b)["Left-Putamen"]
    assert float(putamen["change_ml"]) == pytest.approx(vb - va, rel=1e-5)
    assert float(putamen["annualised_percent_change"]) == pytest.approx(100 * (vb - va) / va * 365.25 / 182, rel=1e-5)
    # why there is no SDC (these synthetic results are not the shipped student's) is in the file too
    assert all("no smallest detectable change" in r["sdc_note"] and r["sdc_study"] == "" for r in rows)


def test_compare_out_never_replaces_a_result_file_an_input_or_an_existing_file(tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    from basalseg.results import read_result

    register_commands(monkeypatch)
    a, b = _pair(tmp_path)
    before = {p: p.read_bytes() for p in b.iterdir() if p.is_file()}
    for out in (b / "volumes.csv", b / "provenance.json"):  # even with --overwrite
        assert run_cli(["compare", a, b, "--out", out, "--overwrite"]) == 2
        assert "is a file of the result folder" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in b.iterdir() if p.is_file()} == before
    read_result(b)  # still a complete result
    mine = tmp_path / "mine.csv"
    mine.write_text("my own notes\n")
    assert run_cli(["compare", a, b, "--out", mine]) == 2
    assert "already exists; give --overwrite" in capsys.readouterr().err and mine.read_text() == "my own notes\n"
    assert run_cli(["compare", a, b, "--out", mine, "--overwrite"]) == 0
    assert read_csv(mine)[0]["structure"] == "Left-Thalamus"


@pytest.mark.parametrize("given", ["2020-01-150", "2020-01-15 garbage", "", "2020/01/15"])
def test_a_malformed_date_on_the_command_line_is_refused_by_name(tmp_path, given):
    a, b = _pair(tmp_path)
    with pytest.raises(BasalSegError, match="--date-b: .* is not a date"):
        compare_results(a, b, "2020-01-01", given)
    assert compare_results(a, b, "2020-01-01T08:30:00", "20210101").interval_days == 366


def test_dates_from_bids_when_provenance_has_none(tmp_path):
    """Results made by ``basalseg segment`` on BIDS files: dates come from the tree's sessions.tsv."""
    from conftest import write_nifti

    from basalseg.results import write_result

    root = tmp_path / "bids" / "sub-07"
    (root / "sub-07_sessions.tsv").parent.mkdir(parents=True)
    (root / "sub-07_sessions.tsv").write_text("session_id\tacq_time\nses-a\t2019-05-01T08:00:00\nses-b\t2020-05-01\n")
    folders = []
    for ses, factor in (("ses-a", 1.0), ("ses-b", 0.9)):
        r = synthetic_result(scale={"left_thalamus": factor}, seed=len(folders))
        anat = root / ses / "anat"
        anat.mkdir(parents=True)
        path = write_nifti(anat / f"sub-07_{ses}_T1w.nii.gz", r.volume.data, r.volume.affine)
        r.volume.path = str(path)
        folders.append(write_result(r, tmp_path / f"res-{ses}"))
    c = compare_results(*folders)
    assert (c.date_a, c.date_b, c.interval_days) == (datetime.date(2019, 5, 1), datetime.date(2020, 5, 1), 366)
    assert c.date_source_a == "sub-07_sessions.tsv acq_time"
    assert c.warnings == []
    assert next(r for r in c.rows if r["structure"] == "Left-Thalamus")["percent_change"] < -5
    assert not any(r["structure"] == "BrainMask" for r in c.rows)  # no brain volumes in plain segment results


def test_a_date_corrected_in_the_dataset_wins_over_the_recorded_one(tmp_path):
    """batch records each session's date in provenance.json; when the dataset's sessions.tsv is
    corrected later, compare (and so the report and changes.csv) use the corrected date and say so,
    with no rerun; and the recorded date stays when the dataset agrees or is gone."""
    from conftest import write_nifti

    from basalseg.longitudinal import resolve_date
    from basalseg.results import read_result, write_result

    root = tmp_path / "bids" / "sub-07"
    root.mkdir(parents=True)
    tsv = root / "sub-07_sessions.tsv"
    tsv.write_text("session_id\tacq_time\nses-a\t2019-05-01\nses-b\t2020-05-01\n")
    folders = []
    for ses, date in (("ses-a", "2019-05-01"), ("ses-b", "2020-05-01")):
        r = synthetic_result(seed=len(folders))
        anat = root / ses / "anat"
        anat.mkdir(parents=True)
        r.volume.path = str(write_nifti(anat / f"sub-07_{ses}_T1w.nii.gz", r.volume.data, r.volume.affine))
        r.provenance["scan_info"] = {"subject": "sub-07", "session": ses, "session_date": date,
                                     "date_source": "sub-07_sessions.tsv acq_time"}
        folders.append(write_result(r, tmp_path / "out" / f"res-{ses}"))
    assert compare_results(*folders).interval_days == 366
    tsv.write_text("session_id\tacq_time\nses-a\t2019-05-01\nses-b\t2020-11-01\n")  # ses-b's date corrected
    c = compare_results(*folders)
    assert c.date_b == datetime.date(2020, 11, 1) and c.interval_days == 550
    assert "corrected since the scan was segmented (provenance.json recorded 2020-05-01)" in c.date_source_b
    assert c.date_source_a == "provenance.json (sub-07_sessions.tsv acq_time)"
    # the batch folder's tables and report read the corrected date too
    from basalseg.batch import write_cohort_tables
    from basalseg.report import build_report

    records = [read_result(f) for f in folders]
    long_csv, wide_csv, changes = write_cohort_tables(tmp_path / "out", records)
    assert {r["session_date"] for r in read_csv(wide_csv)} == {"2019-05-01", "2020-11-01"}
    assert {r["interval_days"] for r in read_csv(changes)} == {"550"}
    page = build_report(tmp_path / "out").read_text()
    assert "sub-07 ses-b 2020-11-01" in page and "2020-05-01" not in page
    assert "2020-11-01 (corrected in the dataset)" in page
    tsv.write_text("session_id\tacq_time\nses-a\t2019-05-01\nses-b\tn/a\n")  # the dataset silent: the recorded date, said so
    assert resolve_date(read_result(folders[1])) == (
        datetime.date(2020, 5, 1), "provenance.json (sub-07_sessions.tsv acq_time; the dataset gives no date for it now)")
    tsv.unlink()
    assert resolve_date(read_result(folders[1]))[1].endswith("the dataset gives no date for it now)")
    (root / "ses-b" / "anat" / "sub-07_ses-b_T1w.nii.gz").unlink()  # the input gone: nothing to check against
    assert resolve_date(read_result(folders[1])) == (datetime.date(2020, 5, 1), "provenance.json (sub-07_sessions.tsv acq_time)")


def test_an_unreadable_recorded_date_costs_one_pair_not_the_tables(tmp_path):
    """A hand-edited provenance.json whose session date cannot be read: the batch folder's tables
    and report are still written, that scan undated; its pairs in changes.csv carry the error."""
    from basalseg.batch import write_cohort_tables
    from basalseg.longitudinal import record_date
    from basalseg.report import build_report
    from basalseg.results import read_result, write_result

    folders = []
    for i, date in enumerate(("2019-05-01", "n/a", "2021-05-01")):
        r = synthetic_result(seed=i)
        r.provenance["scan_info"] = {"subject": "sub-03", "session": f"ses-{i}", "session_date": date}
        folders.append(write_result(r, tmp_path / "out" / f"sub-03_ses-{i}"))
    records = [read_result(f) for f in folders]
    assert record_date(records[1])[0] is None and "unreadable" in record_date(records[1])[1]
    long_csv, wide_csv, changes = write_cohort_tables(tmp_path / "out", records)
    assert [r["session_date"] for r in read_csv(wide_csv)] == ["2019-05-01", "", "2021-05-01"]
    rows = read_csv(changes)
    # the undated scan sits between its neighbours by its session label; both its pairs carry the error
    assert [(r["scan_a"], r["scan_b"]) for r in rows] == [("sub-03_ses-0", "sub-03_ses-1"), ("sub-03_ses-1", "sub-03_ses-2")]
    assert all(r["warnings"].startswith("not compared:") and "'n/a' is not a date" in r["warnings"] for r in rows)
    assert "date unreadable" in build_report(tmp_path / "out").read_text()


def test_session_order_places_an_undated_session_by_its_label_and_questions_contradicting_dates(tmp_path):
    """changes.csv's chain: dated sessions by date, an undated one between its neighbours by its
    session label (with a warning), and a warning when the dates contradict the session labels."""
    from basalseg.batch import write_cohort_tables
    from basalseg.longitudinal import session_groups
    from basalseg.results import read_result, write_result

    dates = {"ses-1": "2019-01-01", "ses-2": None, "ses-3": "2021-01-01", "ses-10": "2020-06-01"}
    folders = []
    for i, (ses, date) in enumerate(dates.items()):
        r = synthetic_result(seed=i)
        r.provenance["scan_info"] = {"subject": "sub-04", "session": ses, **({"session_date": date} if date else {})}
        folders.append(write_result(r, tmp_path / "out" / f"sub-04_{ses}"))
    records = [read_result(f) for f in folders]
    assert [r.session for r in session_groups(records)["sub-04"]] == ["ses-1", "ses-2", "ses-10", "ses-3"]
    rows = read_csv(write_cohort_tables(tmp_path / "out", records)[2])
    warn = {(r["scan_a"], r["scan_b"]): r["warnings"] for r in rows}
    assert "B (ses-2) has no date: placed between its neighbours" in warn[("sub-04_ses-1", "sub-04_ses-2")]
    assert "sessions.tsv or scans.tsv" in warn[("sub-04_ses-1", "sub-04_ses-2")]  # batch has no --date options
    assert "A (ses-2) has no date" in warn[("sub-04_ses-2", "sub-04_ses-10")]
    assert "the dates put ses-10 before ses-3, the session labels after it" in warn[("sub-04_ses-10", "sub-04_ses-3")]
    assert "check the dates" not in warn[("sub-04_ses-1", "sub-04_ses-2")]
    # labels that are not numbered alike say nothing of the order: an undated ses-post goes last
    # (not before ses-pre, as alphabetically), and dated pre -> post raises no question
    more = []
    for i, (ses, date) in enumerate((("ses-pre", "2020-01-01"), ("ses-post", None), ("ses-screening", "2019-06-01"))):
        r = synthetic_result(seed=10 + i)
        r.provenance["scan_info"] = {"subject": "sub-05", "session": ses, **({"session_date": date} if date else {})}
        more.append(read_result(write_result(r, tmp_path / "out" / f"sub-05_{ses}")))
    assert [r.session for r in session_groups(more)["sub-05"]] == ["ses-screening", "ses-pre", "ses-post"]
    rows = read_csv(write_cohort_tables(tmp_path / "out", more)[2])
    warn = {(r["scan_a"], r["scan_b"]): r["warnings"] for r in rows}
    assert "B (ses-post) has no date: placed after the dated sessions" in warn[("sub-05_ses-pre", "sub-05_ses-post")]
    assert "check the dates" not in " ".join(warn.values())


def test_no_dates(tmp_path):
    a = write_synthetic(tmp_path / "A")
    b = write_synthetic(tmp_path / "B", scale={"left_putamen": 1.2})
    c = compare_results(a, b)
    assert c.interval_days is None and all(r["annualised_percent_change"] is None for r in c.rows)
    assert any("no acquisition date for A and B" in w for w in c.warnings)
    assert "%/year" not in format_table(c)


def test_a_batch_folder_given_to_compare_says_to_give_a_scan_folder(tmp_path):
    a = write_synthetic(tmp_path / "cohort" / "A")
    with pytest.raises(BasalSegError, match="it holds result folders: give one of them"):
        compare_results(tmp_path / "cohort", a)


def test_swapped_dates_give_no_annualised_change(tmp_path):
    """B dated before A: warned, and no %/year (its sign would be the wrong way round)."""
    a = write_synthetic(tmp_path / "A")
    b = write_synthetic(tmp_path / "B", scale={"left_putamen": 1.2})
    c = compare_results(a, b, date_a="2022-01-01", date_b="2021-01-01")
    assert c.interval_days == -365 and all(r["annualised_percent_change"] is None for r in c.rows)
    assert any("did you swap them? (no annualised change)" in w for w in c.warnings)
    assert next(r for r in c.rows if r["structure"] == "Left-Putamen")["percent_change"] > 15


def test_warnings(tmp_path):
    a, b = _pair(tmp_path, spacing=1.25, provenance={"weights": {"student": {"sha256": "c" * 64}}},
                 scan_info={"subject": "sub-02", "session": "ses-1", "session_date": "2019-01-01",
                            "bids_entities": {"sub": "02", "ses": "1"}})
    warnings = compare_results(a, b).warnings
    assert any("differ in voxel size (A 1x1x1 mm, B 1.25x1.25x1.25 mm)" in w for w in warnings)
    assert any("different prompter/student weights" in w for w in warnings)
    assert any("A is sub-01 and B is sub-02" in w for w in warnings)
    assert any("earlier than A" in w for w in warnings)
    assert not any("different options" in w for w in warnings)


def test_option_differences_are_named_and_a_missing_mirror_tta_is_the_single_pass(tmp_path):
    """Results made before the test-time augmentation record no ``mirror_tta``: they ran one pass."""
    base = {"band": 10.0, "student_input": "sdm", "crop": True, "min_prompt_pixels": 4}
    a, b = _pair(tmp_path, provenance={"options": {**base, "mirror_tta": True, "stride": 2}})
    warnings = [w for w in compare_results(a, b).warnings if "different options" in w]
    assert len(warnings) == 1
    assert "mirror_tta: A False, B True" in warnings[0] and "stride: A None, B 2" in warnings[0]
    assert "band" not in warnings[0]
    a2, b2 = _pair(tmp_path / "single", provenance={"options": {**base, "mirror_tta": False}})
    assert not any("different options" in w for w in compare_results(a2, b2).warnings)


def test_missing_structure_and_zero_baseline(tmp_path):
    a = write_synthetic(tmp_path / "A", missing=("left_pallidum",))
    b = write_synthetic(tmp_path / "B")
    c = compare_results(a, b, "2020-01-01", "2020-06-01")
    row = next(r for r in c.rows if r["structure"] == "Left-Pallidum")
    assert row["volume_ml_a"] == 0 and row["percent_change"] is None and row["annualised_percent_change"] is None
    assert row["change_ml"] > 0
    assert any("Left-Pallidum is empty in A" in w for w in c.warnings)
    assert any("A has structures the prompt generator did not find: left_pallidum" in w for w in c.warnings)


def test_refuses_folders_that_are_not_results(tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    register_commands(monkeypatch)
    good = write_synthetic(tmp_path / "good")
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "provenance.json").write_text(json.dumps({"something": "else"}))
    cases = {tmp_path / "nope": "no such folder", tmp_path / "empty": "not a complete BasalSegSAM result",
             tmp_path / "other": "not the record of a BasalSegSAM segmentation"}
    for folder, words in cases.items():
        with pytest.raises(BasalSegError, match=words):
            compare_results(folder, good)
        rc = run_cli(["compare", good, folder])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("basalseg: error: B: ") and words in err, err
    with pytest.raises(BasalSegError, match="same folder"):
        compare_results(good, good)
    with pytest.raises(BasalSegError, match="not a date"):
        compare_results(good, write_synthetic(tmp_path / "g2"), date_a="March 3")


def test_repeatability_table_applies_only_to_results_made_with_its_options():
    from types import SimpleNamespace

    from basalseg.longitudinal import table_applies

    table = {"repeatability": {"Left-Thalamus": {}}, "student_sha256": "b" * 64,
             "options": {"band": 10.0, "mirror_tta": True}}

    def record(**options):
        return SimpleNamespace(provenance={"weights": {"student": {"sha256": "b" * 64}}, "options": {"band": 10.0, **options}})

    assert table_applies(table, record(mirror_tta=True)) == (True, "")
    for rec in (record(mirror_tta=False), record()):  # no mirror_tta recorded: made before it, one pass
        applies, why = table_applies(table, rec)
        assert not applies and "mirror_tta" in why
    # a table measured before the option existed says nothing about it
    assert table_applies({**table, "options": {"band": 10.0}}, record(mirror_tta=True))[0]


def test_repeatability_table_applies_to_what_the_localisation_did_not_to_the_option():
    """The skull-stripped study ran on brains as given (``localise: off``). A default run (``auto``)
    on a skull-stripped brain is not localised, runs exactly as ``off`` and gets that study's SDC
    (every default command-line result used to be refused for "other options (localise)"). Two
    localised results (whole heads) get the study of localised whole-head rescans when the table
    has one, and a note saying why not when it has none; a localised result against one segmented
    as it is gets none (different paths)."""
    from types import SimpleNamespace

    from basalseg.longitudinal import table_applies, table_for

    table = {"repeatability": {"Left-Thalamus": {"cv_within": 0.05}}, "student_sha256": "b" * 64,
             "options": {"band": 5.0, "mirror_tta": True, "localise": "off"}}

    def record(localise, applied, band=5.0):
        return SimpleNamespace(provenance={"weights": {"student": {"sha256": "b" * 64}},
                                           "options": {"band": band, "mirror_tta": True, "localise": localise},
                                           "localisation": {"applied": applied}})

    assert table_applies(table, record("off", False)) == (True, "")
    assert table_applies(table, record("auto", False)) == (True, "")
    applies, why = table_applies(table, record("auto", True))
    assert not applies and "no study of localised results" in why
    applies, why = table_applies(table, record("on", True), record("auto", False))
    assert not applies and "different ways" in why
    # with a study of localised results, two localised results use it, and only them
    heads = {"repeatability": {"Left-Thalamus": {"cv_within": 0.08}},
             "options": {"band": 5.0, "mirror_tta": True, "localise": "on"}}
    both = {**table, "localised": heads}
    assert table_for(both, record("auto", True), record("on", True)) == (heads, "")
    assert table_for(both, record("auto", False), record("off", False)) == (both, "")
    assert table_for(both, record("auto", True), record("off", False))[0] is None
    part, why = table_for(both, record("auto", True), record("auto", True, band=10.0))
    assert part is None and "other options (band)" in why
    # that study rescanned each head on its protocol: not for two scans of different voxel sizes
    same = {**both, "localised": {**heads, "protocol": "same"}}
    a1, b1 = record("auto", True), record("auto", True)
    a1.spacing, b1.spacing = (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)
    assert table_for(same, a1, b1)[0] is same["localised"]
    b1.spacing = (1.0, 1.0, 5.0)
    part, why = table_for(same, a1, b1)
    assert part is None and "differ in voxel size (1x1x1 and 1x1x5 mm)" in why
    # and two results that did the same thing are not said to differ in their options
    from basalseg.longitudinal import effective_options, option_differences

    off, auto = record("off", False).provenance, record("auto", False).provenance
    assert option_differences(effective_options(off), effective_options(auto)) == []
    assert option_differences(effective_options(record("on", True).provenance),
                              effective_options(record("auto", True).provenance)) == []
    assert option_differences(effective_options(off), effective_options(record("auto", True).provenance)) == \
        [("localise", "off", "on")]


def test_a_table_of_two_localised_studies_is_chosen_by_the_kind_of_input():
    """Since 2026-12-07 ``auto`` localises skull-stripped brains too: the table's own study is then of
    localised skull-stripped rescans (``input: skull-stripped``) beside the whole-head one, and a
    pair is given the study of its own kind; results segmented as they are get none."""
    from types import SimpleNamespace

    from basalseg.longitudinal import study_name, table_for

    opts = {"band": 5.0, "mirror_tta": True, "localise": "on", "localise_transform": "affine"}
    heads = {"repeatability": {"Left-Thalamus": {"cv_within": 0.04}}, "options": opts, "input": "whole head"}
    table = {"repeatability": {"Left-Thalamus": {"cv_within": 0.03}}, "options": opts, "input": "skull-stripped",
             "localised": heads}

    def record(kind_fraction, localise="auto", applied=True, transform="affine"):
        options = {"band": 5.0, "mirror_tta": True, "localise": localise}
        if transform:
            options["localise_transform"] = transform
        return SimpleNamespace(provenance={"options": options, "localisation": {
            "applied": applied, "contrast": {"head_tissue_fraction": kind_fraction}}}, spacing=(1.0, 1.0, 1.0))

    stripped, head = record(0.01), record(0.6)
    assert table_for(table, stripped, record(0.02)) == (table, "")
    assert study_name(table, table) == "skull-stripped rescans, localised (docs/UNCERTAINTY.md)"
    assert table_for(table, head, record(0.5)) == (heads, "")
    assert study_name(heads, table).startswith("localised whole-head rescans")
    part, why = table_for(table, stripped, head)
    assert part is None and "B is a whole head" in why, why
    part, why = table_for(table, record(0.01, "off", False), record(0.01, "off", False))
    assert part is None and "no study of results segmented as they are" in why, why
    # a result localised rigidly before 2026-12-07 records no transform: rigid, not this study's
    part, why = table_for(table, stripped, record(0.01, transform=None))
    assert part is None and "other options (localise_transform)" in why, why


def test_the_localisation_transform_is_an_option_only_when_the_input_was_localised():
    from basalseg.longitudinal import effective_options, option_differences

    old = {"options": {"localise": "auto", "mirror_tta": True}, "localisation": {"applied": True}}
    new = {"options": {"localise": "auto", "localise_transform": "affine", "mirror_tta": True},
           "localisation": {"applied": True}}
    assert option_differences(effective_options(old), effective_options(new)) == [("localise_transform", "rigid", "affine")]
    off_old = {"options": {"localise": "off", "mirror_tta": True}, "localisation": {"applied": False}}
    off_new = {"options": {"localise": "off", "localise_transform": "affine", "mirror_tta": True},
               "localisation": {"applied": False}}
    assert option_differences(effective_options(off_old), effective_options(off_new)) == []


def test_a_localised_study_that_records_no_transform_was_rigid():
    """A table made before 2026-12-07 records no ``localise_transform``: its localised study was
    rigid, so it gives no SDC to results localised with the affine default."""
    from types import SimpleNamespace

    from basalseg.longitudinal import table_for

    heads = {"repeatability": {"Left-Thalamus": {"cv_within": 0.04}}, "input": "whole head",
             "options": {"band": 5.0, "mirror_tta": True, "localise": "on"}}
    table = {"repeatability": {"Left-Thalamus": {"cv_within": 0.03}},
             "options": {"band": 5.0, "mirror_tta": True, "localise": "off"}, "localised": heads}

    def record(transform):
        options = {"band": 5.0, "mirror_tta": True, "localise": "auto", **({"localise_transform": transform} if transform else {})}
        return SimpleNamespace(provenance={"options": options, "localisation": {
            "applied": True, "contrast": {"head_tissue_fraction": 0.6}}}, spacing=(1.0, 1.0, 1.0))

    assert table_for(table, record(None), record("rigid")) == (heads, "")
    part, why = table_for(table, record("affine"), record("affine"))
    assert part is None and "other options (localise_transform)" in why, why
