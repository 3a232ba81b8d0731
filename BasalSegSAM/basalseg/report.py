"""The cohort HTML report of a folder of results.

``basalseg report OUT_DIR [--embed] [thresholds]`` writes ``OUT_DIR/report.html`` from every
complete result folder directly under ``OUT_DIR`` (the layout ``basalseg batch`` writes, but any
folder of ``basalseg segment`` results works; read with :func:`basalseg.results.find_results`),
and lists the scans of ``OUT_DIR/failures.csv`` when a batch left one.
``basalseg batch`` calls it at the end of every run.

**The page** (``templates/report.html``, filled with :class:`string.Template`; every piece of
user-controlled text is escaped with :func:`html.escape`) lists every scan with its QC montage,
its eight volumes, the brain-mask and brain volumes (:mod:`basalseg.icv`), the left/right
asymmetry indices, the foundation-vs-student agreement, and its flags
(:mod:`basalseg.cohortqc`, where the flags and their thresholds are defined); then the
longitudinal changes of subjects with several sessions, and the scans that failed. The montages
are PNG files in ``OUT_DIR/report/`` linked by relative paths (keep that folder next to
``report.html``), or, with ``--embed``, inlined as base64 so that ``report.html`` is a single
file. No network access, no external scripts or styles; a few lines of inline JavaScript only
add a "flagged scans only" filter (the page is complete without it).

**Montages** (:func:`basalseg.qc.montage_png`): made from the input image (path and sha256 in
``provenance.json``) and ``segmentation.nii.gz``; when the input is gone or changed the page
shows the folder's ``qc.png``.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import os
from importlib import resources
from pathlib import Path
from string import Template

import numpy as np

from .cohortqc import PAIRS, Thresholds, asymmetry_indices, cohort_flags, cohort_warnings
from .download import sha256_file
from .errors import BasalSegError
from .qc import montage_png
from .results import MONTAGE_DIR, REPORT_NAME, ResultRecord, find_results, read_failures
from .structures import STRUCTURES

__all__ = ["montage_from_result", "montage_from_folder", "write_montage", "build_report", "register"]


# ---------------------------------------------------------------------------------------------
# montages
# ---------------------------------------------------------------------------------------------


def montage_from_result(result, title: str | None = None, prompts: bool = True) -> bytes:
    """The report's montage of an in-memory :class:`~basalseg.pipeline.SegmentResult`."""
    return montage_png(result.image01, result.classes, result.prompts if prompts else None, title=title, grid=result.grid)


def montage_from_folder(record: ResultRecord, prompts: bool = True) -> tuple[bytes, str]:
    """The montage of a result folder: ``(png, note)``.

    Made from the input image when it is still at the path recorded in provenance with the same
    sha256; otherwise the folder's ``qc.png`` is returned (note says so), or a placeholder."""
    from .imageio import load_volume
    from .intensity import normalize01
    from .spatial import resample_to_grid, to_canonical
    from .structures import labels_to_classes

    path = record.input.get("path")
    why = "the input image is not recorded"
    if path and Path(path).is_file():
        digest = record.input.get("sha256")
        if digest and sha256_file(Path(path)) != digest:
            why = f"the input image {path} changed since the run"
        else:
            try:
                import nibabel as nib

                volume = load_volume(path)
                data, grid = to_canonical(volume)
                seg = nib.load(str(record.folder / "segmentation.nii.gz"))
                labels = np.asarray(seg.dataobj).astype(np.int16)
                classes = labels_to_classes(resample_to_grid(labels, np.asarray(seg.affine, float), grid, order=0))
                prompt_set = None
                if prompts:
                    from .prompts import load_prompts

                    try:
                        prompt_set = load_prompts(record.folder / "prompts.json")
                        prompt_set.check_grid(grid)
                    except BasalSegError:
                        prompt_set = None
                return montage_png(normalize01(data), classes, prompt_set, title=record.name, grid=grid), ""
            except BasalSegError as exc:
                why = f"the input image cannot be read ({exc})"
    elif path:
        why = f"the input image {path} is not there any more"
    qc = record.folder / "qc.png"
    if qc.is_file():
        return qc.read_bytes(), f"{why}: showing the run's qc.png"
    return _placeholder_png(record.name), f"{why} and the result has no qc.png"


def _placeholder_png(text: str) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (360, 60), (40, 40, 40))
    ImageDraw.Draw(img).text((6, 22), f"{text}: no picture", fill=(255, 255, 255))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def write_montage(out_dir: str | os.PathLike, name: str, png: bytes, note: str = "") -> Path:
    """Write ``OUT_DIR/report/<name>.png`` atomically, and ``<name>.png.note`` when the picture is a
    stand-in (the note says why; an old note is removed otherwise)."""
    from .outputs import atomic_write_bytes, atomic_write_text

    path = Path(out_dir) / MONTAGE_DIR / f"{name}.png"
    atomic_write_bytes(path, png)
    note_path = path.with_name(path.name + ".note")
    if note:
        atomic_write_text(note_path, note + "\n")
    else:
        note_path.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# the HTML page
# ---------------------------------------------------------------------------------------------

_e = html.escape


def _template() -> Template:
    return Template(resources.files("basalseg").joinpath("templates", "report.html").read_text(encoding="utf-8"))


def _fmt(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _pictures(out_dir: Path, records: list[ResultRecord], embed: bool, prompts: bool) -> tuple[dict, dict]:
    """``({scan: img src}, {scan: note})``: each scan's montage, made (or redone when older than the
    result) in ``OUT_DIR/report/``, linked or inlined."""
    notes: dict[str, str] = {}
    images: dict[str, str] = {}
    for r in records:
        path = out_dir / MONTAGE_DIR / f"{r.name}.png"
        if not path.is_file() or path.stat().st_mtime < (r.folder / "provenance.json").stat().st_mtime:
            try:
                png, note = montage_from_folder(r, prompts=prompts)
            except Exception as exc:  # noqa: BLE001 - one bad picture must not cost the page
                png, note = _placeholder_png(r.name), f"no picture: {type(exc).__name__}: {exc}"
            write_montage(out_dir, r.name, png, note)
        note_path = path.with_name(path.name + ".note")
        if note_path.is_file():
            notes[r.name] = note_path.read_text(encoding="utf-8").strip()
        if embed:
            images[r.name] = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        else:
            images[r.name] = f"{MONTAGE_DIR}/{_url_quote(r.name)}.png"
    return images, notes


def _scan_row(r: ResultRecord, fl: list, image: str, note: str | None) -> str:
    """One ``<tr class="scan">`` of the scans table."""
    from .longitudinal import record_date

    e = _e
    flagged_structures = {(f.kind, f.structure) for f in fl}
    date, source = record_date(r)  # a date corrected in the dataset since the scan was segmented wins
    shown = (date.isoformat() + (" (corrected in the dataset)" if "corrected since" in (source or "") else "")
             if date else ("date unreadable" if source else ""))
    who = " ".join(x for x in (r.subject if r.subject != r.name else "", r.session, shown) if x)
    parts = [f'<tr class="scan{" flagged" if fl else ""}" id="scan-{e(r.name)}" data-scan="{e(r.name)}" '
             f'data-flags="{len(fl)}">']
    parts.append(f'<td class="scan"><b>{e(r.name)}</b>' + (f"<br><small>{e(who)}</small>" if who else "") +
                 '<ul class="flags">' + "".join(
                     f'<li class="flag flag-{e(f.kind)}"><span class="badge b-{e(f.kind)}">{e(f.kind)}</span>'
                     f"{e(f.message)}</li>" for f in fl) + "</ul></td>")
    note_html = f'<small class="note">{e(note)}</small>' if note is not None else ""
    parts.append(f'<td><a href="{e(image)}"><img class="montage" '
                 f'src="{e(image)}" alt="QC montage of {e(r.name)}"></a>{note_html}</td>')
    for s in STRUCTURES:
        v = r.volume_ml(s.key)
        out = ("outlier", s.key) in flagged_structures or ("missing", s.key) in flagged_structures
        iv = r.interval(s.key)
        ci = f'<br><small class="ci" title="95 % interval, mL">{iv[0]:.2f}&ndash;{iv[1]:.2f}</small>' if iv else ""
        parts.append(f'<td class="num{" out" if out else ""}" data-structure="{s.key}">{v:.3f}{ci}</td>')
    brain = r.brain
    if brain.get("brain_mask_ml") is not None:
        title = e(brain.get("reason") or brain.get("method", ""))
        parts.append(f'<td class="num" title="{title}">{brain["brain_mask_ml"]:.1f}'
                     f'{"*" if brain.get("status") == "truncated" else ""}</td>'
                     f'<td class="num" title="{title}">{brain["brain_volume_ml"]:.1f}</td>')
    else:
        title = e(brain.get("reason") or "not estimated (result not made by basalseg batch)")
        parts.append(f'<td class="na" title="{title}">&ndash;</td><td class="na" title="{title}">&ndash;</td>')
    for part, ai in asymmetry_indices(r).items():
        if ai is None:
            parts.append('<td class="na">&ndash;</td>')
        else:
            hot = ("asymmetry", part) in flagged_structures
            parts.append(f'<td class="num{" asym" if hot else ""}">{100 * ai:.0f}%</td>')
    dice = [d for d in r.dice.values() if d is not None]
    parts.append((f'<td class="num">{min(dice):.2f}</td>' if dice else '<td class="na">&ndash;</td>') + "</tr>")
    return "\n".join(parts)


def _failure_rows(failures: list[dict]) -> str:
    e = _e
    if not failures:
        return "<p>None.</p>"
    rows = ['<table id="failed"><thead><tr><th>scan</th><th>input</th><th>flags</th><th>error</th><th>when</th>'
            "</tr></thead><tbody>"]
    for f in failures:
        kind = "nothing found" if f["kind"] == "NothingFoundError" else f["kind"]
        rows.append(f'<tr class="failed" data-scan="{e(f["scan"])}"><td>{e(f["scan"])}</td><td>{e(f["input"])}</td>'
                    f'<td><span class="badge b-failed">failed</span>{e(kind)}</td><td>{e(f["message"])}</td>'
                    f'<td>{e(f["time"])}</td></tr>')
    rows.append("</tbody></table>")
    return "\n".join(rows)


def build_report(out_dir: str | os.PathLike, thresholds: Thresholds | None = None, embed: bool = False,
                 prompts: bool = True, verify: bool = True, records: list[ResultRecord] | None = None,
                 broken: list[tuple[Path, str]] | None = None, pairs: list[tuple] | None = None) -> Path:
    """Write ``OUT_DIR/report.html`` (and any missing or stale montages in ``OUT_DIR/report/``).

    Args:
        out_dir: folder of result folders.
        thresholds: flag thresholds (:class:`basalseg.cohortqc.Thresholds`).
        embed: inline the montages as base64 (one self-contained file) instead of relative links.
        prompts: draw prompt boxes on montages made here.
        verify: check each result's files against the sha256 in its provenance.
        records, broken: already-read results and damaged folders (else :func:`basalseg.results.find_results`).
        pairs: the records' :func:`basalseg.longitudinal.consecutive_changes`, when already made
            (for ``changes.csv``).

    Returns:
        The page's path.
    """
    from . import __version__
    from .outputs import atomic_write_text

    e = _e
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise BasalSegError(f"{out_dir}: no such folder")
    thresholds = thresholds or Thresholds()
    if records is None:
        records, broken = find_results(out_dir, verify=verify)
    broken = list(broken or [])
    failures = read_failures(out_dir)
    flags, stats = cohort_flags(records, thresholds)
    images, notes = _pictures(out_dir, records, embed, prompts)

    counts: dict[str, int] = {}
    for fl in flags.values():
        for kind in {f.kind for f in fl}:
            counts[kind] = counts.get(kind, 0) + 1
    warnings = [f'<div class="warn cohort-warning">{e(w)}</div>' for w in cohort_warnings(records)]
    warnings += [f'<div class="warn broken">{e(folder.name)}: not a complete result ({e(reason)}); not included</div>'
                 for folder, reason in broken]
    flag_counts = ("<p>Flags: " + " ".join(f'<span class="badge b-{k}">{e(k)}</span>{v} scan{"s" if v > 1 else ""}'
                                           for k, v in sorted(counts.items())) + "</p>") if counts else ""
    stats_rows = [f"<tr><td>{e(s.name)}</td><td class=num>{stats[s.key]['n']}</td>" +
                  "".join(f"<td class=num>{_fmt(stats[s.key][k])}</td>" for k in ("median", "q1", "q3", "low", "high"))
                  + "</tr>" for s in STRUCTURES]
    scan_columns = ("".join(f"<th>{e(s.name)}<br>mL</th>" for s in STRUCTURES) + "<th>brain mask<br>mL</th><th>brain<br>mL</th>"
                    + "".join(f"<th>AI {e(part)}</th>" for part, _, _ in PAIRS))
    page = _template().substitute(
        folder_name=e(out_dir.name), folder=e(str(out_dir.resolve())), n_results=len(records),
        n_flagged=sum(1 for r in records if flags[r.name]), n_failed=len(failures),
        generated=e(datetime.datetime.now().isoformat(timespec="seconds")), version=e(__version__),
        warnings="\n".join(warnings), flag_counts=flag_counts,
        iqr_factor=f"{thresholds.iqr_factor:g}", min_cohort=thresholds.min_cohort,
        asymmetry_percent=f"{100 * thresholds.asymmetry:g}", dice=f"{thresholds.dice:.2f}",
        stats_rows="\n".join(stats_rows), scan_columns=scan_columns,
        scan_rows="\n".join(_scan_row(r, flags[r.name], images[r.name], notes.get(r.name)) for r in records),
        longitudinal="\n".join(_longitudinal_section(records, pairs)), failures=_failure_rows(failures))
    path = out_dir / REPORT_NAME
    atomic_write_text(path, page)
    return path


def _longitudinal_section(records: list[ResultRecord], pairs: list[tuple] | None = None) -> list[str]:
    """The longitudinal view: per subject with several sessions, the change between consecutive
    sessions as ``basalseg compare`` gives it (:func:`basalseg.longitudinal.consecutive_changes`,
    unless given)."""
    from .longitudinal import MULTIPLE_TESTS_NOTE, consecutive_changes

    pairs = consecutive_changes(records) if pairs is None else pairs
    if not pairs:
        return []
    groups = {subject for subject, *_ in pairs}
    e = _e
    parts = [f'<h2>Longitudinal ({len(groups)} subject{"s" if len(groups) > 1 else ""} with several sessions)</h2>',
             "<p>Change between consecutive sessions, as <code>basalseg compare</code> gives it. "
             "<b>real change?</b>: yes when |change| exceeds the smallest detectable change (SDC: 95 % of scan-rescan "
             "differences of the repeatability study are smaller; docs/UNCERTAINTY.md). "
             f"{e(MULTIPLE_TESTS_NOTE)}</p>"]
    for subject, a, b, c in pairs:
        if isinstance(c, BasalSegError):
            parts.append(f'<div class="warn">{e(subject)}: {e(a.name)} &rarr; {e(b.name)}: {e(str(c))}</div>')
            continue
        span = f", {c.interval_days} days" if c.interval_days is not None else ""
        parts.append(f'<h3 class="pair">{e(subject)}: {e(a.name)} &rarr; {e(b.name)}{e(span)}</h3>')
        for w in c.warnings:
            parts.append(f'<div class="warn">{e(w)}</div>')
        if c.sdc_note:
            parts.append(f'<p class="meta">{e(c.sdc_note)}</p>')
        elif c.sdc_study:
            parts.append(f'<p class="meta">SDC from the study of {e(c.sdc_study)}</p>')
        parts.append(f'<table class="longitudinal" data-subject="{e(subject)}" data-a="{e(a.name)}" data-b="{e(b.name)}">'
                     "<thead><tr><th>structure</th><th>A mL (95 %)</th><th>B mL (95 %)</th><th>change mL</th>"
                     "<th>change %</th><th>%/year</th><th>SDC mL</th><th>real change?</th></tr></thead><tbody>")
        for row in c.rows:
            def cell(v, lo=None, hi=None, d=3):
                if v is None:
                    return '<td class="na">&ndash;</td>'
                ci = f" <small>({lo:.2f}&ndash;{hi:.2f})</small>" if lo is not None and hi is not None else ""
                return f"<td class=num>{v:.{d}f}{ci}</td>"
            verdict = row.get("exceeds_sdc")
            real = ('<td class="na">&ndash;</td>' if verdict is None else
                    f'<td class="num{" out" if verdict else ""}" data-real="{"yes" if verdict else "no"}">'
                    f'{"yes" if verdict else "no"} ({row["change_over_sdc"]:.1f}&times;)</td>')
            parts.append(f'<tr data-structure="{e(row["structure"])}"><td>{e(row["structure"])}</td>'
                         + cell(row["volume_ml_a"], row.get("volume_ml_low_a"), row.get("volume_ml_high_a"))
                         + cell(row["volume_ml_b"], row.get("volume_ml_low_b"), row.get("volume_ml_high_b"))
                         + cell(row["change_ml"]) + cell(row["percent_change"], d=1)
                         + cell(row["annualised_percent_change"], d=2) + cell(row.get("sdc_ml")) + real + "</tr>")
        parts.append("</tbody></table>")
    return parts


def _url_quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name)
