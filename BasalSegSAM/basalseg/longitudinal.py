"""``basalseg compare A_DIR B_DIR``: volume change between two results of the same person.

For each structure (and the brain-mask / brain volumes when both results have them,
:mod:`basalseg.icv`):

``change_ml``
    ``B - A`` in mL.
``percent_change``
    ``100 (B - A) / A`` (relative to the first scan); blank when A is 0.
``percent_change_symmetric``
    ``100 (B - A) / ((A + B) / 2)``: the symmetrised percent change (FreeSurfer's longitudinal
    "spc"), less sensitive to which scan is taken as baseline.
``annualised_percent_change``
    ``percent_change / (interval_days / 365.25)`` (linear, not compounded), when both dates are
    known and differ.
``volume_ml_low_a`` ... ``volume_ml_high_b``
    each scan's 95 % volume interval (``volumes.csv``; blank for results without one).
``sdc_ml``
    the smallest detectable change of this pair (docs/UNCERTAINTY.md):
    ``1.96 sqrt(sd_A^2 + sd_B^2)`` with ``sd_X = max(cv_within * V_X, band_ratio * band_X)``:
    ``cv_within`` the structure's scan-rescan coefficient of variation and ``band_ratio`` the
    ratio of its within-subject SD to the mean ``band_ml`` in the repeatability study shipped
    with the weights (``weights/repeatability.json``), ``band_X`` the scan's own ``band_ml``; so
    a scan less certain than the study's gets a larger SDC, never a smaller one. The study is the one
    of the path both results took and of their kind of input (:func:`table_for`): localised
    skull-stripped rescans or localised whole-head rescans (tables before 2026-12-07: skull-stripped
    rescans segmented as they are). Blank when the results were not made with the
    student (sha256) and options a study was measured for, or took different paths.
``exceeds_sdc``, ``change_over_sdc``
    ``yes`` when ``|change_ml| > sdc_ml`` (a change larger than 95 % of scan-rescan differences),
    and ``|change_ml| / sdc_ml``. Each structure is tested on its own, at 95 %: of 8 structures
    of an unchanged brain, about one pair in three has one ``yes`` by chance.
``sdc_study``, ``sdc_note``, ``warnings``
    the same on every row of a pair: the repeatability study the SDC comes from, or why there is
    none, and the warnings below (``; ``-separated).

**Dates**, for each scan, first found: ``--date-a`` / ``--date-b``; the session date that
``basalseg batch`` recorded in ``provenance.json`` (``scan_info``); the BIDS ``*_scans.tsv`` /
``*_sessions.tsv``, JSON sidecar or NIfTI header of the input image recorded in provenance (when
it is still there; see :func:`basalseg.bids.session_date`). When the input is still there and its
dataset now gives another date than the recorded one (a corrected ``sessions.tsv``), the
dataset's date wins and the source says so: a date fixed after segmentation needs no rerun.
``interval_days = date_B - date_A``.

Folders that are not complete BasalSegSAM results are refused. Warnings (printed, and kept in
:attr:`Comparison.warnings`) when the inputs differ in voxel size, when the weights, foundation
backend, options or basalseg version differ, when the subjects recorded differ, when both
results come from the same image, or when B is not later than A.

The Python entry point for other front ends is :func:`compare_results`. For a cohort,
:func:`consecutive_changes` compares every subject's consecutive sessions (the report's
longitudinal view, and ``changes.csv`` of a batch folder, :func:`changes_csv_text`).
"""

from __future__ import annotations

import csv
import datetime
import io
import re
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BasalSegError

__all__ = ["Comparison", "compare_results", "compare_records", "resolve_date", "record_date", "COMPARE_COLUMNS", "format_table",
           "add_sdc", "table_applies", "table_for", "effective_options", "session_groups",
           "consecutive_changes", "changes_csv_text", "CHANGES_COLUMNS", "MULTIPLE_TESTS_NOTE"]

COMPARE_COLUMNS = ["structure", "label", "volume_ml_a", "volume_ml_b", "change_ml", "percent_change",
                   "percent_change_symmetric", "annualised_percent_change", "interval_days", "date_a", "date_b",
                   "scan_a", "scan_b", "volume_ml_low_a", "volume_ml_high_a", "volume_ml_low_b", "volume_ml_high_b",
                   "sdc_ml", "exceeds_sdc", "change_over_sdc", "sdc_study", "sdc_note", "warnings"]


@dataclass
class Comparison:
    """The change table between two results.

    Attributes:
        a, b: the two :class:`~basalseg.results.ResultRecord`.
        rows: one dict per structure (then ``BrainMask`` / ``Brain`` when estimated), keys :data:`COMPARE_COLUMNS`.
        date_a, date_b: ``datetime.date`` or None; ``date_source_a`` / ``date_source_b`` say where from.
        interval_days: ``date_b - date_a`` in days, or None.
        warnings: differences that make the change less trustworthy.
        sdc_note: why there is no smallest detectable change (None when there is one).
        sdc_study: which repeatability study the SDC comes from (None when there is none).
    """

    a: object
    b: object
    rows: list[dict]
    date_a: datetime.date | None = None
    date_b: datetime.date | None = None
    date_source_a: str | None = None
    date_source_b: str | None = None
    interval_days: int | None = None
    warnings: list[str] = field(default_factory=list)
    sdc_note: str | None = None
    sdc_study: str | None = None

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COMPARE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.csv_rows())
        return buffer.getvalue()

    def csv_rows(self) -> list[dict]:
        """The rows of :meth:`csv_text` (:data:`COMPARE_COLUMNS`, formatted)."""
        extra = self.pair_columns()
        return [{**{k: _cell(row.get(k)) for k in COMPARE_COLUMNS}, **extra} for row in self.rows]

    def pair_columns(self) -> dict:
        """The columns that are the same on every row: the SDC's study or why there is none, and
        the warnings (``; ``-separated)."""
        return {"sdc_study": self.sdc_study or "", "sdc_note": self.sdc_note or "",
                "warnings": "; ".join(" ".join(w.split()) for w in self.warnings)}


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        value = round(value, 6) + 0.0  # + 0.0: no "-0"
        return f"{value:.12g}"
    return str(value)


#: an ISO 8601 date, optionally with a time of day and zone (the same on every Python version)
_ISO = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?")


def _parse_date(text: str, what: str) -> datetime.date:
    """An ISO 8601 date or date-time (``YYYY-MM-DD``, ``YYYY-MM-DDThh:mm[:ss[.f]][Z|+hh:mm]``,
    ``YYYYMMDD``) as a date; anything else, trailing text included, is refused naming ``what``."""
    m = _ISO.fullmatch(str(text).strip())
    try:
        if m is None:
            raise ValueError(text)
        return datetime.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError as exc:
        raise BasalSegError(f"{what}: {text!r} is not a date (use YYYY-MM-DD)") from exc


#: where a date that batch recorded came from, when it came from the dataset (not a NIfTI header)
_DATASET_SOURCES = ("scans.tsv", "sessions.tsv", ".json")


def resolve_date(record, override: str | None = None, what: str = "date") -> tuple[datetime.date | None, str | None]:
    """The acquisition date of a result (see the module docstring): ``(date, source)``.
    ``override``: a date given on the command line (``what`` names its option in an error)."""
    from .bids import session_date

    if override is not None:
        return _parse_date(override, what), "given on the command line"
    info = record.scan_info
    path = record.input.get("path")
    there = bool(path) and Path(path).exists()
    current, current_source = session_date(path) if there else (None, None)
    if info.get("session_date"):
        recorded = _parse_date(info["session_date"], f"{record.folder}/provenance.json")
        if current and datetime.date.fromisoformat(current) != recorded:  # the dataset's dates were corrected since
            return datetime.date.fromisoformat(current), \
                f"{current_source}, corrected since the scan was segmented (provenance.json recorded {recorded})"
        source = info.get("date_source") or "batch"
        if there and not current and any(k in source for k in _DATASET_SOURCES):
            return recorded, f"provenance.json ({source}; the dataset gives no date for it now)"
        return recorded, f"provenance.json ({source})"
    if current:
        return datetime.date.fromisoformat(current), current_source
    return None, None


def _resolved(record) -> tuple[datetime.date | None, str | None] | BasalSegError:
    """:func:`resolve_date` of a result without a date given, or its error: read once per record
    (the dataset's tables are read again otherwise for every table, pair and report row)."""
    cached = getattr(record, "__dict__", {}).get("_basalseg_date")
    if cached is not None:
        return cached
    try:
        out = resolve_date(record)
    except BasalSegError as exc:
        out = exc
    if hasattr(record, "__dict__"):
        record.__dict__["_basalseg_date"] = out
    return out


def record_date(record) -> tuple[datetime.date | None, str | None]:
    """:func:`resolve_date` of a result for the cohort tables, the report and the session order:
    read once per record, and never raising: a recorded date that cannot be read gives
    ``(None, "unreadable: <why>")`` (the scan counts as undated there; ``compare`` and the pair's
    row of ``changes.csv`` give the error itself)."""
    out = _resolved(record)
    return (None, f"unreadable: {out}") if isinstance(out, BasalSegError) else out


def _date_of(record, override: str | None, what: str) -> tuple[datetime.date | None, str | None]:
    """:func:`resolve_date`, the recorded or dataset date read once per record (:func:`_resolved`)."""
    if override is not None:
        return resolve_date(record, override, what)
    out = _resolved(record)
    if isinstance(out, BasalSegError):
        raise out
    return out


def _describe_weights(prov: dict) -> dict:
    return {k: (v or {}).get("sha256") for k, v in (prov.get("weights") or {}).items()}


def _describe_backend(prov: dict) -> dict:
    f = prov.get("foundation") or {}
    return {k: f.get(k) for k in ("backend", "model", "checkpoint_sha256") if f.get(k) is not None}


def _bids_subject(record) -> str | None:
    """``sub-XX`` from what batch recorded, else from a BIDS input path (outside BIDS the batch
    "subject" is only the file name, so it is not used)."""
    from .bids import bids_parts

    info = record.scan_info
    if "sub" in (info.get("bids_entities") or {}):
        return info.get("subject")
    path = record.input.get("path")
    parts = bids_parts(Path(path)) if path else None
    return parts[1] if parts else None


#: What a result made before an option was recorded was made with (``provenance.json``
#: ``options``): results before 2026-12-04 record no ``mirror_tta`` and ran the student once;
#: results before 2026-12-07 record no ``localise_transform`` and were localised rigidly.
LEGACY_OPTIONS = {"mirror_tta": False, "localise_transform": "rigid"}


def option_differences(a: dict | None, b: dict | None) -> list[tuple]:
    """``(option, value in a, value in b)`` for every option two provenance ``options`` dicts
    disagree on, sorted by name; an option one of them does not record counts as
    :data:`LEGACY_OPTIONS`' value when it has one, else as ``None``."""
    a, b = dict(a or {}), dict(b or {})
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, LEGACY_OPTIONS.get(key)), b.get(key, LEGACY_OPTIONS.get(key))
        if va != vb:
            out.append((key, va, vb))
    return out


def effective_options(provenance: dict) -> dict:
    """A result's ``options`` as they acted: :data:`LEGACY_OPTIONS` for options it does not record,
    and ``localise`` by what the localisation did: ``"off"`` when it was asked for (``auto``) but
    not applied (a crop smaller than a brain, or, before 2026-12-07, a skull-stripped brain in the
    template's pose, segmented as it is: exactly what ``off`` does), ``"on"`` when ``auto`` applied
    it (exactly what ``on`` does); without
    ``localise_transform`` when the input was not localised (the transform did not act)."""
    opts = dict(provenance.get("options") or {})
    opts = {**{k: v for k, v in LEGACY_OPTIONS.items() if k not in opts}, **opts}
    applied = (provenance.get("localisation") or {}).get("applied")
    if opts.get("localise") in ("auto", "on") and applied is False:
        opts["localise"] = "off"
    elif opts.get("localise") == "auto" and applied is True:
        opts["localise"] = "on"
    if opts.get("localise") in ("off", None):
        opts.pop("localise_transform", None)  # nothing was aligned: the transform did not act
    return opts


def _input_kind(record) -> str | None:
    """``"whole head"`` or ``"skull-stripped"`` by the localisation's head-tissue check
    (:mod:`basalseg.localise`: the shell around the registered brain), None when not recorded."""
    from .localise import HEAD_FRACTION

    fraction = (((record.provenance.get("localisation") or {}).get("contrast")) or {}).get("head_tissue_fraction")
    if fraction is None:
        return None
    return "whole head" if float(fraction) >= HEAD_FRACTION else "skull-stripped"


def _spacing_differs(a, b) -> bool:
    sa, sb = a.spacing, b.spacing
    return bool(sa and sb and (len(sa) != len(sb) or any(abs(x - y) > 1e-3 for x, y in zip(sa, sb))))


def _fmt_spacing(spacing) -> str:
    return "x".join(f"{x:.4g}" for x in spacing)


def _check_pair(a, b) -> list[str]:
    warnings = []
    if _spacing_differs(a, b):
        warnings.append(f"the scans differ in voxel size (A {_fmt_spacing(a.spacing)} mm, B {_fmt_spacing(b.spacing)} mm): "
                        "part of the change may come from the resolution, not the anatomy")
    pa, pb = a.provenance, b.provenance
    if _describe_weights(pa) != _describe_weights(pb):
        warnings.append("the results were made with different prompter/student weights (sha256 differ): "
                        "rerun both with the same weights to measure change")
    if _describe_backend(pa) != _describe_backend(pb):
        warnings.append(f"the results were made with different foundation backends ({_describe_backend(pa)} vs "
                        f"{_describe_backend(pb)})")
    differ = option_differences(effective_options(pa), effective_options(pb))
    if differ:
        warnings.append("the results were made with different options (" + "; ".join(
            f"{k}: A {va!r}, B {vb!r}" for k, va, vb in differ) + "): part of the change may come from the options; "
            "rerun one with the other's options to measure change")
    if pa.get("basalseg") != pb.get("basalseg"):
        warnings.append(f"the results were made by different basalseg versions ({pa.get('basalseg')} vs {pb.get('basalseg')})")
    sub_a, sub_b = _bids_subject(a), _bids_subject(b)
    if sub_a and sub_b and sub_a != sub_b:
        warnings.append(f"A is {sub_a} and B is {sub_b}: are they the same person?")
    ha, hb = a.input.get("sha256"), b.input.get("sha256")
    if ha and ha == hb:
        warnings.append("A and B were made from the same image file (same sha256): the change is not longitudinal")
    ea, eb = _extent_mm(a.input), _extent_mm(b.input)
    if ea and eb and any(abs(x - y) > FOV_TOLERANCE_MM for x, y in zip(ea, eb)):
        fmt = lambda e: "x".join(f"{x:.0f}" for x in e)  # noqa: E731
        warnings.append(f"the scans cover different fields of view (A {fmt(ea)} mm, B {fmt(eb)} mm along the voxel "
                        "axes): another protocol or another scan; check that both cover every structure fully")
    for rec, tag in ((a, "A"), (b, "B")):
        if rec.missing:
            warnings.append(f"{tag} has structures the prompt generator did not find: {', '.join(rec.missing)}")
        for flag in rec.provenance.get("qc_flags") or []:
            if isinstance(flag, dict) and flag.get("message") and flag.get("kind") != "missing":  # missing: above
                warnings.append(f"{tag}: {flag['message']}")
    return warnings


#: fields of view differing by more than this (mm, along a voxel axis) are reported
FOV_TOLERANCE_MM = 10.0
#: a mean absolute change across the structures above this (%) is reported: it is far more than
#: atrophy (about 0.5-2 % a year) explains, and typical of two different people or a failed result
LARGE_CHANGE_PERCENT = 15.0


def _extent_mm(record: dict) -> list[float] | None:
    try:
        return [float(n) * float(s) for n, s in zip(record["shape"], record["spacing_mm"])]
    except (KeyError, TypeError, ValueError):
        return None


def _row(structure: str, label, va: float | None, vb: float | None, days: int | None) -> dict:
    row = {"structure": structure, "label": label, "volume_ml_a": va, "volume_ml_b": vb, "change_ml": None,
           "percent_change": None, "percent_change_symmetric": None, "annualised_percent_change": None}
    if va is None or vb is None:
        return row
    row["change_ml"] = vb - va
    if va > 0:
        row["percent_change"] = 100.0 * (vb - va) / va
        if days:
            row["annualised_percent_change"] = row["percent_change"] / (days / 365.25)
    if va + vb > 0:
        row["percent_change_symmetric"] = 100.0 * (vb - va) / ((va + vb) / 2.0)
    return row


def _a_kind(kind: str) -> str:
    return "a whole head" if kind == "whole head" else "a skull-stripped brain"


def _kind_plural(kind: str | None) -> str:
    return "whole heads" if kind == "whole head" else "skull-stripped brains"


def _part_way(part: dict) -> str:
    """How a study's scans went: ``"on"`` (localised) or ``"off"`` (segmented as they are)."""
    return (part.get("options") or {}).get("localise") or "off"


def _part_input(part: dict) -> str | None:
    """What a study's scans were: ``"whole head"``, ``"skull-stripped"``, or None (not recorded:
    the skull-stripped study of tables made before 2026-12-07, segmented as they were)."""
    return part.get("input")


def table_for(table: dict | None, *records) -> tuple[dict | None, str]:
    """The part of the repeatability table measured for the student and options of these results:
    ``(part, why not)``. A table holds up to two studies, the table itself and its ``"localised"``
    part; the part used is the one whose scans went the same way as these results (localised, or
    segmented as they are: ``options.localise``, by what the localisation did) and were the same
    kind of input (``input``: a whole head or a skull-stripped brain, by the localisation's
    head-tissue check), and only for two scans of equal voxel size when its rescans kept the
    protocol. None with the reason when no part was measured for them."""
    if not table or not table.get("repeatability"):
        return None, "no repeatability table is shipped"
    want = table.get("student_sha256")
    for r in records:
        got = ((r.provenance.get("weights") or {}).get("student") or {}).get("sha256")
        if want and got != want:
            return None, "the results were not made with the student the repeatability table was measured for"
    opts = [effective_options(r.provenance) for r in records]
    localised = [o.get("localise") == "on" for o in opts]
    if any(localised) and not all(localised):
        return None, ("one result was localised (resampled onto the brain template) and the other was segmented as "
                      "it is: the two went different ways, and the repeatability studies measured each way on its own")
    way = "on" if localised and all(localised) else "off"
    parts = [p for p in (table, table.get("localised")) if p and p.get("repeatability")]
    measured = [p for p in parts if _part_way(p) == way]
    if not measured:
        return None, (("the repeatability table has no study of localised results (resampled onto the brain "
                       "template), a path whose scan-rescan repeatability it does not hold") if way == "on" else
                      ("the repeatability table has no study of results segmented as they are (--localise off, or a "
                       "crop smaller than a brain), a path whose scan-rescan repeatability it does not hold"))
    kinds = [_input_kind(r) for r in records]
    if len(records) == 2 and None not in kinds and kinds[0] != kinds[1]:
        return None, (f"A is {_a_kind(kinds[0])} and B is {_a_kind(kinds[1])}: each repeatability study measured "
                      "one kind of input, and none measured a pair of both")
    matching = [p for p in measured if _part_input(p) is None or all(k == _part_input(p) for k in kinds)]
    if not matching:
        want_kind = _part_input(measured[0])
        for tag, kind in zip("AB", kinds):
            if kind != want_kind:
                what = f"{tag} is {_a_kind(kind)}" if kind else (
                    f"{tag} does not record whether its input was a whole head (made before 2026-12-02); segment it again")
                studied = " and ".join(sorted({_kind_plural(_part_input(p)) for p in measured}))
                return None, (f"the repeatability {'study' if len(measured) == 1 else 'studies'} of "
                              f"{'localised' if way == 'on' else 'unlocalised'} results {'is' if len(measured) == 1 else 'are'} "
                              f"of {studied}; {what}, whose scan-rescan repeatability it did not measure")
    part = matching[0]
    if part.get("protocol") == "same" and len(records) == 2 and _spacing_differs(*records):
        return None, ("that repeatability study rescanned each head on the same protocol; these scans differ "
                      f"in voxel size ({_fmt_spacing(records[0].spacing)} and {_fmt_spacing(records[1].spacing)} mm), "
                      "whose scan-rescan repeatability it did not measure")
    ref = dict(part.get("options") or {})
    if way == "on":  # a localised study that records no transform (before 2026-12-07) was rigid
        ref.setdefault("localise_transform", LEGACY_OPTIONS["localise_transform"])
    for o in opts:
        differ = sorted(k for k in ref if k in o and o[k] != ref[k])
        if differ:
            return None, f"the results were made with other options ({', '.join(differ)}) than the repeatability study"
    return part, ""


def table_applies(table: dict | None, *records) -> tuple[bool, str]:
    """Whether a part of the repeatability table applies to these results (:func:`table_for`):
    ``(applies, why not)``."""
    part, why = table_for(table, *records)
    return part is not None, why


def study_name(part: dict, table: dict | None = None) -> str:
    """How the text outputs name the study a part of the table (:func:`table_for`) holds."""
    if _part_input(part) == "whole head":
        return "localised whole-head rescans, one protocol each (docs/UNCERTAINTY.md)"
    if _part_way(part) == "on":
        return "skull-stripped rescans, localised (docs/UNCERTAINTY.md)"
    return "skull-stripped rescans segmented as they are (docs/UNCERTAINTY.md)"


def add_sdc(row: dict, table: dict | None, structure: str, band_a: float | None = None,
            band_b: float | None = None) -> None:
    """Fill ``sdc_ml``, ``exceeds_sdc`` and ``change_over_sdc`` of a change row (module docstring)."""
    import math

    from .uncertainty import Z95, change_test

    row.update({"sdc_ml": None, "exceeds_sdc": None, "change_over_sdc": None})
    entry = ((table or {}).get("repeatability") or {}).get(structure)
    va, vb = row.get("volume_ml_a"), row.get("volume_ml_b")
    if not entry or entry.get("cv_within") is None or va is None or vb is None:
        return
    cv, ratio = float(entry["cv_within"]), float(entry.get("band_ratio") or 0.0)
    sd_a = max(cv * va, ratio * (band_a or 0.0))
    sd_b = max(cv * vb, ratio * (band_b or 0.0))
    sdc = Z95 * math.sqrt(sd_a ** 2 + sd_b ** 2)
    exceeds, over = change_test(row.get("change_ml"), sdc)
    row.update({"sdc_ml": sdc, "exceeds_sdc": exceeds, "change_over_sdc": over})


#: how to give a missing date: on ``compare``'s command line, or (batch tables, report) in the dataset
DATE_HINT_COMPARE = "give --date-a/--date-b YYYY-MM-DD"
DATE_HINT_DATASET = "add its acq_time to the dataset's sessions.tsv or scans.tsv, or compare the two with --date-a/--date-b"


def compare_records(a, b, date_a: str | None = None, date_b: str | None = None, table: dict | None = None,
                    use_table: bool = True, date_hint: str = DATE_HINT_COMPARE) -> Comparison:
    """:func:`compare_results` on two :class:`~basalseg.results.ResultRecord` (the report's
    longitudinal view uses it). ``table``: the repeatability table (default: the shipped one);
    ``date_hint``: how the warning for a missing date says to give one."""
    from .structures import STRUCTURES
    from .uncertainty import load_table

    da, src_a = _date_of(a, date_a, "--date-a")
    db, src_b = _date_of(b, date_b, "--date-b")
    days = (db - da).days if da and db else None
    warnings = _check_pair(a, b)
    if days is not None and days <= 0:
        warnings.append(f"B ({db}) is {'on the same day as' if days == 0 else 'earlier than'} A ({da})"
                        + ("" if days == 0 else ": did you swap them? (no annualised change)"))
    if days is None:
        missing = [t for t, d in (("A", da), ("B", db)) if d is None]
        warnings.append(f"no acquisition date for {' and '.join(missing)}: no interval or annualised change "
                        f"({date_hint})")
    full_table = None
    if use_table:
        full_table = load_table() if table is None else table
        table, why = table_for(full_table, a, b)
    else:
        table, why = None, "not asked for"
    rows = []
    per_year = days if days and days > 0 else None  # the interval for %/year: none when B is not after A
    for s in STRUCTURES:
        row = _row(s.name, s.label, a.volume_ml(s.key), b.volume_ml(s.key), per_year)
        ia, ib = a.interval(s.key), b.interval(s.key)
        row.update({"volume_ml_low_a": ia[0] if ia else None, "volume_ml_high_a": ia[1] if ia else None,
                    "volume_ml_low_b": ib[0] if ib else None, "volume_ml_high_b": ib[1] if ib else None})
        add_sdc(row, table, s.name, a.band_ml(s.key), b.band_ml(s.key))
        rows.append(row)
    for key, name in (("brain_mask_ml", "BrainMask"), ("brain_volume_ml", "Brain")):
        va, vb = a.brain.get(key), b.brain.get(key)
        if va is not None and vb is not None:
            rows.append(_row(name, "", float(va), float(vb), per_year))
    cut = [tag for tag, r in (("A", a), ("B", b)) if r.brain.get("status") == "truncated"]
    if cut and any(r["structure"] in ("BrainMask", "Brain") for r in rows):
        warnings.append(f"the brain touches the field of view's border in {' and '.join(cut)}: its brain-mask and brain "
                        "volumes are lower bounds, so their change says more about the field of view than the brain")
    for row in rows:
        row.update({"interval_days": days, "date_a": da.isoformat() if da else None, "date_b": db.isoformat() if db else None,
                    "scan_a": a.name, "scan_b": b.name})
        if row["percent_change"] is None and row["volume_ml_a"] == 0 and row["structure"] not in ("BrainMask", "Brain"):
            warnings.append(f"{row['structure']} is empty in A: no percent change")
    changes = [abs(r["percent_change"]) for r in rows[:len(STRUCTURES)] if r.get("percent_change") is not None]
    if changes and sum(changes) / len(changes) > LARGE_CHANGE_PERCENT:
        warnings.append(f"the structures changed by {sum(changes) / len(changes):.0f}% on average, far more than atrophy "
                        "explains (about 0.5-2% a year): are A and B scans of the same person, and both results correct?")
    comparison = Comparison(a=a, b=b, rows=rows, date_a=da, date_b=db, date_source_a=src_a, date_source_b=src_b,
                            interval_days=days, warnings=warnings)
    comparison.sdc_note = None if table else f"no smallest detectable change: {why}"
    comparison.sdc_study = study_name(table, full_table) if table else None
    return comparison


def compare_results(a_dir: str | os.PathLike, b_dir: str | os.PathLike, date_a: str | None = None,
                    date_b: str | None = None, table: dict | None = None) -> Comparison:
    """The per-structure change from result ``A`` to result ``B`` (see the module docstring).

    Args:
        table: the repeatability table for ``sdc_ml`` (default: the shipped one,
            :func:`basalseg.uncertainty.load_table`).

    Raises:
        BasalSegError: a folder is not a complete BasalSegSAM result, or a date is malformed.
    """
    from .results import read_result

    records = []
    for folder, tag in ((a_dir, "A"), (b_dir, "B")):
        folder = Path(folder)
        if not folder.is_dir():
            raise BasalSegError(f"{tag}: {folder} is not a folder" if folder.exists() else f"{tag}: {folder}: no such folder")
        try:
            records.append(read_result(folder))
        except BasalSegError as exc:
            raise BasalSegError(f"{tag}: {exc}") from exc
    a, b = records
    if a.folder.resolve() == b.folder.resolve():
        raise BasalSegError(f"A and B are the same folder ({a.folder})")
    return compare_records(a, b, date_a, date_b, table)


def _label_key(session: str) -> tuple:
    """Natural order of session labels (``ses-2`` before ``ses-10``)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.findall(r"\d+|\D+", session or ""))


def _numbered_alike(a: str, b: str) -> bool:
    """Two session labels that differ only in their numbers (``ses-2`` / ``ses-10``,
    ``ses-m06`` / ``ses-m12``): only such labels say which session came first (``ses-pre`` and
    ``ses-post``, ``screening`` and ``baseline`` do not, alphabetically)."""
    return bool(a and b) and re.search(r"\d", a) is not None and re.sub(r"\d+", "#", a) == re.sub(r"\d+", "#", b)


def session_groups(records) -> dict[str, list]:
    """Subjects with at least two results (a subject that ``basalseg batch`` recorded), each list in
    session order: the dated sessions by date (:func:`record_date`), then session label, then
    folder name; an undated session placed after the last dated one whose session label comes
    before its own (natural order: ``ses-2`` before ``ses-10``; only labels that differ in their
    numbers alone are compared), so it sits between its neighbours; other undated sessions last."""
    groups: dict[str, list] = {}
    for r in records:
        if r.subject and r.subject != r.name:  # batch recorded a subject (outside BIDS it is the file name)
            groups.setdefault(r.subject, []).append(r)
    out = {}
    for subject, recs in sorted(groups.items()):
        if len(recs) < 2:
            continue
        dated = sorted((r for r in recs if record_date(r)[0] is not None),
                       key=lambda r: (record_date(r)[0], _label_key(r.session), r.name))
        order = list(dated)
        for u in sorted((r for r in recs if record_date(r)[0] is None), key=lambda r: (_label_key(r.session), r.name)):
            alike = [i for i, d in enumerate(order) if _numbered_alike(d.session, u.session)]
            before = [i for i in alike if _label_key(order[i].session) <= _label_key(u.session)]
            order.insert(before[-1] + 1 if before else (alike[0] if alike else len(order)), u)
        out[subject] = order
    return out


def _order_warnings(a, b) -> list[str]:
    """What :func:`session_groups` had to guess about a consecutive pair."""
    out = []
    for tag, r, other in (("A", a, b), ("B", b, a)):
        if record_date(r)[0] is None:
            out.append(f"{tag} ({r.session or r.name}) has no date: "
                       + ("placed between its neighbours by its session label" if _numbered_alike(r.session, other.session)
                          else "placed after the dated sessions"))
    if (record_date(a)[0] is not None and record_date(b)[0] is not None and _numbered_alike(a.session, b.session)
            and _label_key(a.session) > _label_key(b.session)):
        out.append(f"the dates put {a.session} before {b.session}, the session labels after it: check the dates")
    return out


def consecutive_changes(records, table: dict | None = None) -> list[tuple]:
    """The change between consecutive sessions (:func:`session_groups`) of every subject with
    several (the report's longitudinal view and the batch folder's ``changes.csv``):
    ``(subject, A, B, Comparison)``, or ``(subject, A, B, BasalSegError)`` for a pair that cannot
    be compared."""
    out = []
    for subject, recs in session_groups(records).items():
        for a, b in zip(recs, recs[1:]):
            try:
                c = compare_records(a, b, table=table, date_hint=DATE_HINT_DATASET)
                c.warnings.extend(_order_warnings(a, b))
                out.append((subject, a, b, c))
            except BasalSegError as exc:
                out.append((subject, a, b, exc))
    return out


#: Said next to every SDC verdict: each structure is tested on its own.
MULTIPLE_TESTS_NOTE = ("Each structure is tested on its own at 95 %: in an unchanged brain about one pair of scans in "
                       "three shows one of the 8 structures over its SDC by chance; trust a change seen in more than "
                       "one structure or over several sessions.")

#: ``changes.csv`` of a batch folder: :data:`COMPARE_COLUMNS` of each consecutive pair, with the
#: subject first.
CHANGES_COLUMNS = ["subject"] + COMPARE_COLUMNS


def changes_csv_text(pairs: list[tuple]) -> str:
    """``changes.csv`` (:data:`CHANGES_COLUMNS`) of :func:`consecutive_changes`; a pair that could
    not be compared gets one row with its scans and the error in ``warnings``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CHANGES_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for subject, a, b, c in pairs:
        if isinstance(c, BasalSegError):
            writer.writerow({"subject": subject, "scan_a": a.name, "scan_b": b.name, "warnings": f"not compared: {c}"})
            continue
        writer.writerows({"subject": subject, **row} for row in c.csv_rows())
    return buffer.getvalue()


def format_table(comparison: Comparison) -> str:
    """The change table as aligned text."""
    c = comparison
    head = [f"A: {c.a.folder}" + (f"  ({c.date_a}, {c.date_source_a})" if c.date_a else ""),
            f"B: {c.b.folder}" + (f"  ({c.date_b}, {c.date_source_b})" if c.date_b else "")]
    if c.interval_days is not None:
        head.append(f"interval: {c.interval_days} days ({c.interval_days / 365.25:.2f} years)")
    sdc = any(r.get("sdc_ml") is not None for r in c.rows)
    ci = any(r.get("volume_ml_low_a") is not None or r.get("volume_ml_low_b") is not None for r in c.rows)
    cols = (["structure", "A mL"] + (["A 95 %"] if ci else []) + ["B mL"] + (["B 95 %"] if ci else [])
            + ["change mL", "change %", "sym %"] + (["%/year"] if c.interval_days else [])
            + (["SDC mL", "real change?"] if sdc else []))
    lines = []
    for r in c.rows:
        def f(v, d=3):
            return "" if v is None else f"{v:.{d}f}"
        def span(lo, hi):
            return "" if lo is None or hi is None else f"{lo:.2f}-{hi:.2f}"
        cells = [r["structure"], f(r["volume_ml_a"])] + ([span(r.get("volume_ml_low_a"), r.get("volume_ml_high_a"))] if ci else []) \
            + [f(r["volume_ml_b"])] + ([span(r.get("volume_ml_low_b"), r.get("volume_ml_high_b"))] if ci else []) \
            + [f(r["change_ml"]), f(r["percent_change"], 1), f(r["percent_change_symmetric"], 1)]
        if c.interval_days:
            cells.append(f(r["annualised_percent_change"], 2))
        if sdc:
            verdict = ""
            if r.get("exceeds_sdc") is not None:
                verdict = (f"yes ({r['change_over_sdc']:.1f}x SDC)" if r["exceeds_sdc"]
                           else f"no ({r['change_over_sdc']:.1f}x SDC)")
            cells += [f(r.get("sdc_ml")), verdict]
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *lines)]
    fmt = lambda cells: "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)  # noqa: E731
                                  for i, (x, w) in enumerate(zip(cells, widths)))
    tail = []
    if sdc:
        tail.append("SDC: smallest detectable change (95 % of scan-rescan differences are smaller), from the study of "
                    + (c.sdc_study or "docs/UNCERTAINTY.md"))
        tail.append(MULTIPLE_TESTS_NOTE)
    elif getattr(c, "sdc_note", None):
        tail.append(c.sdc_note)
    return "\n".join(head + [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(cells) for cells in lines] + tail) + "\n"
