"""Result folders read back, foundation/student Dice, QC montages, cohort flags and the HTML report.

Result folders are made with the package's own :func:`basalseg.results.write_result` from
synthetic :class:`~basalseg.pipeline.SegmentResult` objects (:func:`synthetic_result`): ellipsoid
structures of known size on a small 1 mm grid, so no network runs. The helpers here are also
imported by ``test_longitudinal.py``, ``test_batch.py`` and ``test_report_browser.py``.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, write_nifti

from basalseg import __version__
from basalseg.imageio import Volume
from basalseg.structures import STRUCTURES, classes_to_labels

# ---------------------------------------------------------------------------------------------
# helpers shared with the other test files
# ---------------------------------------------------------------------------------------------

#: geometry in "units" of _G voxels: centre offsets (dx from the midline, j, k) and radii of each
#: structure type; i grows toward the patient's right (RAS), so left structures sit at low i.
_G = 1.5
_CENTRES = {"thalamus": (0, 24, 18), "caudate": (4, 36, 24), "putamen": (12, 32, 18), "pallidum": (7, 30, 16)}
_RADII = {"thalamus": (5, 7, 5), "caudate": (3, 5, 5), "putamen": (3, 7, 5), "pallidum": (2, 4, 3)}
SHAPE = (84, 84, 60)


def _centre(key: str) -> tuple[float, float, float]:
    side, part = key.split("_", 1)
    dx, j, k = _CENTRES[part]
    x = 28 - 6 - dx if side == "left" else 28 + 5 + dx
    return (x * _G, j * _G, k * _G)


def synthetic_classes(scale: dict | None = None, only: tuple | None = None, shape=SHAPE) -> np.ndarray:
    """Class-index volume with one ellipsoid per structure; ``scale[key]`` multiplies its volume."""
    scale = scale or {}
    ii, jj, kk = np.indices(shape)
    classes = np.zeros(shape, np.uint8)
    for s in STRUCTURES:
        if only is not None and s.key not in only:
            continue
        f = float(scale.get(s.key, 1.0)) ** (1 / 3)
        if f == 0:
            continue
        part = s.key.split("_", 1)[1]
        c, r = _centre(s.key), [v * f * _G for v in _RADII[part]]
        inside = ((ii - c[0]) / r[0]) ** 2 + ((jj - c[1]) / r[1]) ** 2 + ((kk - c[2]) / r[2]) ** 2 <= 1
        classes[inside & (classes == 0)] = s.class_index
    return classes


def synthetic_result(scale: dict | None = None, spacing: float = 1.0, path: str | None = None, missing=(),
                     disagree=(), seed: int = 0, provenance: dict | None = None, data: np.ndarray | None = None):
    """A :class:`SegmentResult` without running anything: labels on a ``spacing`` mm RAS grid
    (the canonical grid is the same grid, so volumes are voxel counts x spacing^3).

    Args:
        scale: volume factor per structure key.
        path: recorded as the input path (the file is not read).
        missing: structure keys reported as not found (left empty).
        disagree: structure keys whose foundation mask is shifted well off the student's label.
        provenance: merged over a plausible default provenance.
        data: image intensities (default: smooth random tissue with brighter structures).
    """
    from basalseg.pipeline import SegmentResult
    from basalseg.prompts import prompts_from_classes
    from basalseg.spatial import Grid

    rng = np.random.default_rng(seed)
    scale = dict(scale or {})
    for key in missing:
        scale[key] = 0
    classes = synthetic_classes(scale)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-42.0 * spacing, -45.0 * spacing, -27.0 * spacing]
    grid = Grid(SHAPE, affine)
    if data is None:
        from scipy import ndimage

        data = ndimage.gaussian_filter(rng.random(SHAPE), 2) * 400 + 500 + (classes > 0) * 300
    image01 = np.clip((data - data.min()) / (np.ptp(data) or 1), 0, 1).astype(np.float32)
    prompts = prompts_from_classes(classes, grid)
    keep = {24, 27, 30}
    prompts.prompts = [p for p in prompts.prompts if p.slice in keep]
    prompts.source = {"generator": "test: synthetic"}
    masks = np.zeros((8,) + SHAPE, bool)
    for s in STRUCTURES:
        m = classes == s.class_index
        if s.key in disagree:
            m = np.roll(m, 4, axis=0) | np.roll(m, 4, axis=1)
        for p in prompts.for_structure(s.key):
            masks[s.class_index - 1][:, :, p.slice] = m[:, :, p.slice]
    prov = {"basalseg": __version__, "python": "3", "torch": "x", "monai": "x", "numpy": np.__version__, "device": "cpu",
            "foundation": {"backend": "litemedsam", "checkpoint_sha256": "f" * 64},
            "weights": {"prompter": {"file": "prompter.pt", "sha256": "a" * 64, "trained": False},
                        "student": {"file": "student.pt", "sha256": "b" * 64, "trained": False}},
            "options": {"band": 10.0, "student_input": "sdm", "crop": True, "min_prompt_pixels": 4}}
    prov.update(provenance or {})
    volume = Volume(data=np.asarray(data, np.float32), affine=affine, path=path)
    return SegmentResult(volume=volume, labels=classes_to_labels(classes).astype(np.int16), grid=grid, image01=image01,
                         classes=classes, coarse=None, masks=masks, prompts=prompts,
                         timings={"total": 1.0, "foundation": 0.5}, provenance=prov, missing=list(missing))


def write_synthetic(folder: Path, *, scan_info: dict | None = None, brain: dict | None = None, dice: bool = True,
                    input_path: Path | None = None, **kwargs) -> Path:
    """Write a synthetic result folder the way ``basalseg batch`` does (with its provenance extras);
    with ``input_path``, the image is also written there as NIfTI and recorded as the input."""
    from basalseg.metrics import foundation_student_dice
    from basalseg.results import write_result

    result = synthetic_result(**kwargs)
    if input_path is not None:
        input_path.parent.mkdir(parents=True, exist_ok=True)
        result.volume.path = str(write_nifti(input_path, result.volume.data, result.volume.affine))
    if scan_info is not None:
        result.provenance["scan_info"] = scan_info
    if brain is not None:
        result.provenance["brain_volume"] = brain
    if dice:
        result.provenance["foundation_student_dice"] = foundation_student_dice(result.masks, result.classes, result.prompts)
    write_result(result, folder)
    return folder


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


#: the synthetic cohort: scan name -> (keyword arguments of write_synthetic, expected flag kinds)
COHORT = {
    "sub-01": ({"scale": {"left_putamen": 1.05}}, set()),
    "sub-02": ({"scale": {"left_thalamus": 0.95}}, set()),
    "sub-03": ({"scale": {"right_caudate": 1.08}}, set()),
    "sub-04": ({"scale": {}}, set()),
    "sub-05": ({"scale": {"right_putamen": 3.5}}, {"outlier", "asymmetry"}),  # big right putamen
    "sub-06": ({"missing": ("right_pallidum",)}, {"missing"}),
    "sub-07": ({"disagree": ("left_caudate",)}, {"disagreement"}),
    "sub-08": ({"scale": {"left_thalamus": 1.03, "right_thalamus": 0.98}}, set()),
}


def make_cohort(out_dir: Path, failures: bool = True, inputs: Path | None = None) -> Path:
    """Eight synthetic results (see :data:`COHORT`) and a failures.csv with two failed scans; with
    ``inputs``, their images are written there (so montages are made from them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    heads = np.random.default_rng(7).permutation(np.linspace(0.85, 1.15, len(COHORT)))
    for i, (name, (kwargs, _)) in enumerate(COHORT.items()):
        # natural variation: a head-size factor shared by all structures
        head = heads[i]
        kwargs = dict(kwargs)
        kwargs["scale"] = {s.key: head * kwargs.get("scale", {}).get(s.key, 1.0) for s in STRUCTURES}
        write_synthetic(out_dir / name, seed=i, scan_info={"scan": name, "subject": name, "session": "",
                                                           "session_date": f"2020-01-{i + 1:02d}"},
                        brain={"status": "ok", "brain_mask_ml": 1400.0 + i, "brain_volume_ml": 1200.0 + i},
                        input_path=inputs / f"{name}.nii.gz" if inputs else None, **kwargs)
    if failures:
        (out_dir / "failures.csv").write_text(
            "scan,input,kind,message,time\n"
            "sub-09,/data/sub-09.nii.gz,NothingFoundError,the prompt generator found none of the 8 structures,2024-01-01\n"
            "sub-10,/data/sub-10.nii.gz,InputImageError,/data/sub-10.nii.gz: unreadable NIfTI file,2024-01-01\n")
    return out_dir


# ---------------------------------------------------------------------------------------------
# result folders
# ---------------------------------------------------------------------------------------------


def test_result_state(tmp_path):
    from basalseg.results import read_result, result_state
    from basalseg.results import write_prompts_only

    folder = write_synthetic(tmp_path / "r")
    assert result_state(folder) == ("complete", "")
    assert result_state(tmp_path / "nothing")[0] == "absent"
    (tmp_path / "empty").mkdir()
    assert result_state(tmp_path / "empty")[0] == "absent"

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "segmentation.seg.nrrd").unlink()
    assert result_state(broken) == ("incomplete", "segmentation.seg.nrrd is missing")

    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    with open(edited / "volumes.csv", "a") as handle:
        handle.write("\n")
    state, reason = result_state(edited)
    assert state == "incomplete" and "volumes.csv was changed" in reason
    assert result_state(edited, verify=False)[0] == "complete"

    bad = tmp_path / "badjson"
    shutil.copytree(folder, bad)
    (bad / "provenance.json").write_text("{")
    assert result_state(bad)[1].startswith("provenance.json is not valid JSON")

    r = synthetic_result()
    write_prompts_only(r.prompts, r.image01, r.classes, r.volume, tmp_path / "prompts_only")
    assert result_state(tmp_path / "prompts_only") == (
        "incomplete", "provenance.json is not the record of a BasalSegSAM segmentation")

    record = read_result(folder)
    rows = read_csv(folder / "volumes.csv")
    assert [r["volume_ml"] for r in record.volumes] == [float(r["volume_ml"]) for r in rows]
    assert record.volume_ml("left_putamen") == record.volume_ml("Left-Putamen") > 0


def test_reading_results_does_not_import_torch():
    """One module writes and reads result folders (no copy of the file list); reading them, the
    cohort flags and the report still load without torch."""
    import subprocess
    import sys

    code = ("import sys, basalseg.results, basalseg.report, basalseg.cohortqc; "
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_find_results_lists_damaged_folders(tmp_path):
    from basalseg.results import find_results

    write_synthetic(tmp_path / "a")
    write_synthetic(tmp_path / "b")
    (tmp_path / "b" / "prompts.json").unlink()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("unrelated")
    (tmp_path / ".a.staging-123").mkdir()
    records, broken = find_results(tmp_path)
    assert [r.name for r in records] == ["a"]
    assert [(f.name, why) for f, why in broken] == [("b", "prompts.json is missing")]


# ---------------------------------------------------------------------------------------------
# foundation vs student
# ---------------------------------------------------------------------------------------------


def test_foundation_student_dice():
    from basalseg.metrics import foundation_student_dice

    r = synthetic_result(disagree=("left_caudate",), missing=("right_pallidum",))
    dice = foundation_student_dice(r.masks, r.classes, r.prompts)
    assert set(dice) == {s.key for s in STRUCTURES}
    assert dice["right_pallidum"] is None  # no prompts
    assert dice["left_putamen"] == 1.0
    # by hand for the shifted one, on the prompted slices only
    ks = sorted({p.slice for p in r.prompts.for_structure("left_caudate")})
    f, s = r.masks[1][:, :, ks], r.classes[:, :, ks] == 2
    assert dice["left_caudate"] == pytest.approx(2 * (f & s).sum() / (f.sum() + s.sum()), abs=1e-4)
    assert dice["left_caudate"] < 0.7
    # the student labelling slices without prompts does not count against it
    r.classes[:, :, 5][r.classes[:, :, 5] == 0] = 3
    assert foundation_student_dice(r.masks, r.classes, r.prompts)["left_putamen"] == 1.0


# ---------------------------------------------------------------------------------------------
# montages
# ---------------------------------------------------------------------------------------------


def _png(data: bytes):
    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_montage_radiological_and_coloured():
    """Only the left putamen: it must appear on the picture's right half (radiological view) in
    both rows, filled in its colour."""
    from basalseg.qc import montage_png
    from basalseg.spatial import Grid

    classes = synthetic_classes(only=("left_putamen", "right_thalamus"))
    rng = np.random.default_rng(0)
    image = rng.random(SHAPE).astype(np.float32) * 0.3
    grid = Grid(SHAPE, np.eye(4))
    img = _png(montage_png(image, classes, n=3, zoom=2, grid=grid, title="t"))
    putamen = np.all(img == STRUCTURES[2].color, axis=2)
    thalamus = np.all(img == STRUCTURES[4].color, axis=2)
    assert putamen.sum() > 50 and thalamus.sum() > 50
    # each tile: the left putamen lies right of the right thalamus
    xs = np.nonzero(putamen)[1]
    xt = np.nonzero(thalamus)[1]
    tile_w = img.shape[1] // 3
    assert np.median(xs % (tile_w + 1)) > np.median(xt % (tile_w + 1))
    # filled: blended pixels (not the exact colour, not grey) exist inside
    r, g, b = img[..., 0].astype(int), img[..., 1].astype(int), img[..., 2].astype(int)
    assert ((r - g > 40) & (b - g > 30) & ~putamen).sum() > 50


def test_montage_prompt_boxes_drawn():
    from basalseg.qc import montage_png

    r = synthetic_result()
    with_boxes = _png(montage_png(r.image01, r.classes, r.prompts, n=5))
    without = _png(montage_png(r.image01, r.classes, None, n=5))
    yellow = lambda a: np.all(a == (255, 255, 0), axis=2).sum()  # noqa: E731
    assert yellow(with_boxes) > yellow(without) + 50


def test_montage_from_folder_uses_input_then_falls_back(tmp_path):
    from basalseg.report import montage_from_folder
    from basalseg.results import read_result

    r = synthetic_result()
    image = write_nifti(tmp_path / "t1.nii.gz", r.volume.data, r.volume.affine)
    r.volume.path = str(image)
    from basalseg.results import write_result

    folder = write_result(r, tmp_path / "res")
    png, note = montage_from_folder(read_result(folder))
    assert note == "" and _png(png).shape[1] >= 360
    image.unlink()
    png, note = montage_from_folder(read_result(folder))
    assert "not there any more" in note and "qc.png" in note
    assert png == (folder / "qc.png").read_bytes()


# ---------------------------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------------------------


def test_asymmetry_index(tmp_path):
    from basalseg.cohortqc import asymmetry_indices
    from basalseg.results import read_result

    rec = read_result(write_synthetic(tmp_path / "r", scale={"left_caudate": 2.0}))
    left, right = rec.volume_ml("left_caudate"), rec.volume_ml("right_caudate")
    ai = asymmetry_indices(rec)
    assert ai["caudate"] == pytest.approx(abs(left - right) / ((left + right) / 2))
    assert ai["caudate"] > 0.5 and ai["thalamus"] < 0.05


def test_cohort_flags(tmp_path):
    from basalseg.cohortqc import Thresholds, cohort_flags
    from basalseg.results import find_results

    records, _ = find_results(make_cohort(tmp_path / "out"))
    flags, stats = cohort_flags(records, Thresholds())
    for name, (_, expected) in COHORT.items():
        assert {f.kind for f in flags[name]} == expected, (name, flags[name])
    outlier = [f for f in flags["sub-05"] if f.kind == "outlier"]
    assert [f.structure for f in outlier] == ["right_putamen"] and "above the cohort range" in outlier[0].message
    assert stats["right_putamen"]["n"] == 8 and stats["right_pallidum"]["n"] == 7  # the missing one is left out
    assert [f.structure for f in flags["sub-06"]] == ["right_pallidum"]
    assert [f.structure for f in flags["sub-07"]] == ["left_caudate"]
    # fewer scans than --min-cohort: no outlier flags; a looser asymmetry threshold clears sub-05
    flags, _ = cohort_flags(records, Thresholds(min_cohort=9, asymmetry=2.0))
    assert flags["sub-05"] == []


def test_cohort_warnings(tmp_path):
    from basalseg.cohortqc import cohort_warnings
    from basalseg.results import find_results

    write_synthetic(tmp_path / "a")
    write_synthetic(tmp_path / "b", spacing=1.2,
                    provenance={"weights": {"student": {"sha256": "c" * 64}, "prompter": {"sha256": "a" * 64}}})
    warnings = cohort_warnings(find_results(tmp_path)[0])
    assert any("weights" in w for w in warnings) and any("voxel sizes" in w for w in warnings)


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------


def _rows(page: str) -> list[str]:
    return re.findall(r'<tr class="scan[^"]*" id="scan-([^"]+)"', page)


def test_report_page(tmp_path):
    from basalseg.report import build_report

    out = make_cohort(tmp_path / "out")
    path = build_report(out)
    assert path == out / "report.html"
    page = path.read_text()
    assert _rows(page) == list(COHORT)
    for name, (_, expected) in COHORT.items():
        row = re.search(rf'id="scan-{name}" data-scan="{name}" data-flags="(\d+)"', page)
        assert (int(row.group(1)) > 0) == bool(expected), name
    assert page.count('class="flag flag-outlier"') == 1 and page.count('class="flag flag-disagreement"') == 1
    assert "Left-Caudate: foundation vs student Dice" in page
    assert 'id="failed"' in page and page.count('<tr class="failed"') == 2 and "nothing found" in page
    # pictures: one relative link per scan, each an existing PNG
    srcs = re.findall(r'<img class="montage" src="([^"]+)"', page)
    assert len(srcs) == len(COHORT)
    for src in srcs:
        assert not src.startswith(("/", "file:", "http")) and (out / src).read_bytes()[:4] == b"\x89PNG"
    # self-contained: no external resources
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert 'id="n-results">8<' in page and 'id="n-failed">2<' in page and 'id="n-flagged">3<' in page


def test_report_embedded_and_regenerated(tmp_path):
    from basalseg.report import build_report

    out = make_cohort(tmp_path / "out", failures=False)
    build_report(out)
    before = (out / "report" / "sub-01.png").stat().st_mtime_ns
    page = build_report(out, embed=True).read_text()
    assert page.count('src="data:image/png;base64,') == len(COHORT) and 'src="report/' not in page
    assert (out / "report" / "sub-01.png").stat().st_mtime_ns == before, "an up-to-date montage is not redone"
    assert re.search(r"<h2>Failed scans \(0\)</h2>\s*<p>None.</p>", page)


def test_report_with_no_results(tmp_path):
    from basalseg.report import build_report

    out = tmp_path / "out"
    out.mkdir()
    (out / "failures.csv").write_text("scan,input,kind,message,time\nx,/x.nii,InputImageError,bad,now\n")
    page = build_report(out).read_text()
    assert _rows(page) == [] and 'id="n-results">0<' in page and page.count('<tr class="failed"') == 1


def test_report_escapes_names(tmp_path):
    from basalseg.report import build_report

    out = tmp_path / "out"
    write_synthetic(out / "a&b<c>")
    page = build_report(out).read_text()
    assert "a&amp;b&lt;c&gt;" in page and "a&b<c>" not in page
    assert 'src="report/a%26b%3Cc%3E.png"' in page and (out / "report" / "a&b<c>.png").is_file()


def test_report_command(tmp_path, capsys, monkeypatch):
    out = make_cohort(tmp_path / "out")
    rc = run_report_cli(monkeypatch, ["report", out, "--asymmetry-threshold", "500", "--embed"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"wrote {out / 'report.html'} (8 results, 2 failed)" in captured.out
    page = (out / "report.html").read_text()
    assert 'class="flag flag-asymmetry"' not in page and "&gt; 500%" in page
    rc = run_report_cli(monkeypatch, ["report", tmp_path / "nope"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("basalseg: error:") and "no such folder" in err
    (tmp_path / "empty").mkdir()  # a folder with no result (a wrong --out): said so, no report.html
    rc = run_report_cli(monkeypatch, ["report", tmp_path / "empty"])
    err = capsys.readouterr().err
    assert rc == 2 and "no results in it" in err and list((tmp_path / "empty").iterdir()) == []


def test_report_command_refreshes_a_batch_folders_tables_and_leaves_a_users_own(tmp_path, capsys, monkeypatch):
    """In a batch folder ``report`` writes the cohort tables again from what it read (so they never
    disagree with report.html); a volumes.csv that is not batch's is not touched."""
    from basalseg.batch import COHORT_COLUMNS, write_cohort_tables
    from basalseg.results import find_results

    out = make_cohort(tmp_path / "out")
    write_cohort_tables(out, find_results(out)[0])
    (out / "volumes_wide.csv").write_text("stale\n")
    assert run_report_cli(monkeypatch, ["report", out]) == 0
    assert "refreshed the cohort tables: volumes.csv, volumes_wide.csv, changes.csv" in capsys.readouterr().out
    assert read_csv(out / "volumes_wide.csv")[0]["scan"] and list(read_csv(out / "volumes.csv")[0]) == COHORT_COLUMNS
    own = make_cohort(tmp_path / "own")
    (own / "volumes.csv").write_text("name,ml\nme,1\n")
    assert run_report_cli(monkeypatch, ["report", own]) == 0
    assert "refreshed" not in capsys.readouterr().out
    assert (own / "volumes.csv").read_text() == "name,ml\nme,1\n" and not (own / "changes.csv").exists()


def run_report_cli(monkeypatch, argv) -> int:
    """``basalseg.commands.main`` in this process."""
    register_commands(monkeypatch)
    return run_cli(argv)


def register_commands(monkeypatch) -> None:
    """Nothing to do any more: :func:`basalseg.commands.build_parser` registers every subcommand
    (kept so that the tests that call it read as before)."""
