"""``basalseg batch INPUT_DIR --out OUT_DIR``: a cohort in one command, resumable.

**Inputs.** Either a folder of T1 files (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``; the folder
itself, not its sub-folders) or a BIDS dataset: ``sub-*/ses-*/anat/*_T1w.nii[.gz]`` and
``sub-*/anat/*_T1w.nii[.gz]`` (``derivatives/``, ``sourcedata/`` and hidden folders are not
searched). Giving one subject's folder (``sub-01/``) works too.

**Outputs** (``OUT_DIR``):

``<scan>/``
    one result folder per scan, exactly as ``basalseg segment`` writes it
    (:func:`basalseg.results.write_result`). ``<scan>`` is ``sub-XX[_ses-YY]`` for BIDS (with the
    other entities, e.g. ``_run-2``, added when a session has several T1w images) and the file
    name without its extension otherwise. ``provenance.json`` gains ``scan_info`` (subject,
    session, session date and where the date came from), ``brain_volume``
    (:mod:`basalseg.icv`) and ``foundation_student_dice``
    (:func:`basalseg.metrics.foundation_student_dice`, recorded by the pipeline).
``volumes.csv``
    the cohort table, one row per scan and structure: ``scan, subject, session, session_date,
    structure, label, volume_ml, volume_mm3, voxels, brain_mask_ml, brain_volume_ml,
    brain_estimate``; the structure columns are copied from each scan's ``volumes.csv``. The brain
    columns repeat on each of a scan's rows (blank where not estimated, see :mod:`basalseg.icv`):
    divide by them to normalise.
``volumes_wide.csv``
    the same, one row per scan (``<Structure>_ml`` columns) for spreadsheets and statistics.
``failures.csv``
    the scans that have no result (``scan, input, kind, message, time``); empty when none.
``batch_log.jsonl``
    one JSON object per event, appended: each run's start and end, and per scan
    ``done`` / ``skipped`` / ``failed`` with the time taken or the error (and a traceback for an
    unexpected one).
``report.html`` and ``report/``
    the QC report (:mod:`basalseg.report`), regenerated at the end of every run.

All tables and the report are written atomically and rebuilt on every run from **all** complete
result folders in ``OUT_DIR``.

**Resuming.** A scan whose folder is complete (every result file present, ``provenance.json``
valid, files matching the sha256 it records) is skipped: never redone or overwritten unless
``--overwrite`` is given (which redoes every scan, replacing each result atomically). A scan
whose run was interrupted left at most a hidden staging folder (``.<scan>.staging-*``); it is
removed and the scan redone. A folder that exists but is not a complete result (files deleted or
edited by hand) is **not** touched: the scan is reported as failed and ``--redo-incomplete``
replaces it. A lock file stops two batches from writing into one ``OUT_DIR`` at the same time.

**Failures.** A scan that fails (unreadable image, prompt generator found nothing, ...) is logged
and the batch goes on; at the end the failures are listed and the exit status is 3. Problems that
would fail every scan (missing weights, no CUDA) stop the batch before the first scan (status 2).
The networks and the foundation backend are loaded once for the whole batch.

**Executors.** ``--executor dask|slurm`` runs :func:`process_scan` as one Dask task per scan on
worker processes or SLURM jobs (:mod:`basalseg.cluster`), with the guarantees above; each worker
loads the networks once.

**Session dates** (for ``basalseg compare``'s interval), first found: the ``acq_time`` of the
image in the BIDS ``*_scans.tsv``, the session's ``acq_time`` in ``sub-XX_sessions.tsv``, the
``AcquisitionDateTime``/``AcquisitionDate`` of the JSON sidecar, an ISO date (``YYYY-MM-DD``) in
the NIfTI header's ``descrip`` field. Only the date is kept (``YYYY-MM-DD``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import logging
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BasalSegError, Cancelled, OutputWriteError
from .imageio import SUPPORTED_SUFFIXES

_log = logging.getLogger("basalseg")

__all__ = ["Scan", "discover_scans", "session_date", "run_batch", "BatchSummary", "write_cohort_tables",
           "process_scan", "scan_failure", "failure_row", "preload_pipeline", "needs_prompter",
           "clean_scan_leftovers", "COHORT_COLUMNS", "BATCH_FAILED_EXIT", "register", "LOG_NAME"]

#: Exit status when some scans failed (the others are done).
BATCH_FAILED_EXIT = 3
LOG_NAME = "batch_log.jsonl"
LOCK_NAME = ".basalseg-batch.lock"
COHORT_COLUMNS = ["scan", "subject", "session", "session_date", "structure", "label", "volume_ml", "volume_mm3", "voxels",
                  "brain_mask_ml", "brain_volume_ml", "brain_estimate"]
_SKIP_DIRS = {"derivatives", "sourcedata", "code", "stimuli"}
_ISO_DATE = re.compile(r"(?<!\d)((?:19|20)\d\d)-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])(?!\d)")


# ---------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------


@dataclass
class Scan:
    """One input image of the batch.

    Attributes:
        name: its result folder's name under OUT_DIR (unique in the batch).
        path: the image file.
        subject, session: BIDS ``sub-XX`` / ``ses-YY`` (for plain folders, subject = name, no session).
        entities: the BIDS entities of the file name.
        session_date, date_source: ``YYYY-MM-DD`` and where it was read, when known.
    """

    name: str
    path: Path
    subject: str
    session: str = ""
    entities: dict = field(default_factory=dict)
    session_date: str | None = None
    date_source: str | None = None

    def info(self) -> dict:
        return {"scan": self.name, "subject": self.subject, "session": self.session, "session_date": self.session_date,
                "date_source": self.date_source, "bids_entities": self.entities, "input": str(self.path)}


def _strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _safe(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "scan"
    return f"scan-{name}" if name in ("report",) else name


def _entities(filename: str) -> dict:
    stem = _strip_suffix(filename)
    parts = stem.split("_")
    out = {}
    for part in parts[:-1]:  # the last part is the suffix (T1w)
        if "-" in part:
            key, value = part.split("-", 1)
            out[key] = value
    return out


def _is_file(path: Path) -> bool:
    """A file, or a broken symlink (a DataLad/git-annex file not fetched yet: listed, so that it is
    reported as failed rather than silently left out)."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def _is_t1w(path: Path) -> bool:
    name = path.name
    return _is_file(path) and not name.startswith(".") and name.endswith(("_T1w.nii.gz", "_T1w.nii"))


def _bids_scans(root: Path, subject_dirs: list[Path]) -> list[Scan]:
    scans = []
    for sub in subject_dirs:
        before = len(scans)
        anat_dirs = [(sub / "anat", "")] + [(ses / "anat", ses.name) for ses in sorted(sub.glob("ses-*")) if ses.is_dir()]
        for anat, session in anat_dirs:
            if not anat.is_dir():
                continue
            for path in sorted(p for p in anat.iterdir() if _is_t1w(p)):
                ents = _entities(path.name)
                scans.append(Scan(name="", path=path, subject=sub.name, session=session, entities=ents))
        if len(scans) == before:
            _log.warning("skipped %s: no T1w image (looked for %s/[ses-*/]anat/*_T1w.nii[.gz])", sub.name, sub)
    groups: dict[str, list[Scan]] = {}
    for s in scans:
        groups.setdefault(_safe(f"{s.subject}_{s.session}" if s.session else s.subject), []).append(s)
    for base, members in groups.items():
        for s in members:
            extra = [f"{k}-{v}" for k, v in s.entities.items() if k not in ("sub", "ses")]
            s.name = base if len(members) == 1 else _safe("_".join([base, *extra]))
    _make_unique(scans)
    for s in scans:
        s.session_date, s.date_source = session_date(s.path)
    return scans


def _make_unique(scans: list[Scan]) -> None:
    seen: dict[str, int] = {}
    for s in scans:
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name}_{seen[s.name]}"
        else:
            seen[s.name] = 1


def discover_scans(input_dir: str | os.PathLike) -> list[Scan]:
    """The T1 images of a plain folder or a BIDS tree (see the module docstring), in a stable order.

    Raises:
        BasalSegError: not a folder, or no image found.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise BasalSegError(f"{root}: no such folder" if not root.exists() else f"{root} is a file, not a folder of T1 images")
    subjects = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("sub-") and p.name not in _SKIP_DIRS)
    if subjects:
        scans = _bids_scans(root, subjects)
        kind = "BIDS T1w images (sub-*/[ses-*/]anat/*_T1w.nii[.gz])"
    elif root.name.startswith("sub-") and ((root / "anat").is_dir() or any(root.glob("ses-*/anat"))):
        scans = _bids_scans(root.parent, [root])
        kind = "BIDS T1w images"
    else:
        files = sorted(p for p in root.iterdir() if _is_file(p) and not p.name.startswith(".")
                       and any(p.name.lower().endswith(s) for s in SUPPORTED_SUFFIXES))
        scans = [Scan(name=_safe(_strip_suffix(p.name)), path=p, subject=_safe(_strip_suffix(p.name))) for p in files]
        _make_unique(scans)
        for s in scans:
            s.subject = s.name
            s.session_date, s.date_source = session_date(s.path)
        kind = f"images ({', '.join(SUPPORTED_SUFFIXES)})"
    if not scans:
        raise BasalSegError(f"no T1 images found in {root}: looked for {kind}")
    return scans


# ---------------------------------------------------------------------------------------------
# session dates
# ---------------------------------------------------------------------------------------------


def _iso_date(value) -> str | None:
    """``YYYY-MM-DD`` from an ISO date/datetime string (also ``YYYYMMDD``); None otherwise."""
    if value is None:
        return None
    text = str(value).strip()
    if not text or text.lower() in ("n/a", "na", "nan"):
        return None
    m = _ISO_DATE.search(text)
    if m:
        try:
            return datetime.date(int(m.group(1)), int(m.group(2)), int(m.group(3))).isoformat()
        except ValueError:
            return None
    m = re.fullmatch(r"((?:19|20)\d\d)(\d\d)(\d\d)", text)
    if m:
        try:
            return datetime.date(int(m.group(1)), int(m.group(2)), int(m.group(3))).isoformat()
        except ValueError:
            return None
    return None


def _read_tsv(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return list(csv.DictReader(handle, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _bids_parts(path: Path) -> tuple[Path, str, str] | None:
    """``(subject_dir, sub-XX, ses-YY or "")`` for a file inside a BIDS subject folder."""
    parts = Path(os.path.abspath(path)).parts  # not resolve(): annexed files are symlinks out of the tree
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].startswith("sub-") and i < len(parts) - 1:
            sub_dir = Path(*parts[: i + 1])
            session = parts[i + 1] if i + 1 < len(parts) - 1 and parts[i + 1].startswith("ses-") else ""
            return sub_dir, parts[i], session
    return None


def session_date(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """The acquisition date of an image file: ``(YYYY-MM-DD, source)`` or ``(None, None)``.

    Sources, first found: BIDS ``*_scans.tsv`` ``acq_time`` of this file, BIDS ``*_sessions.tsv``
    ``acq_time`` of its session, the JSON sidecar's ``AcquisitionDateTime`` / ``AcquisitionDate``,
    an ISO date in the NIfTI header's ``descrip``.
    """
    path = Path(path)
    bids = _bids_parts(path)
    if bids is not None:
        sub_dir, _, ses = bids
        level = sub_dir / ses if ses else sub_dir
        for tsv in sorted(level.glob("*_scans.tsv")):
            for row in _read_tsv(tsv):
                name = (row.get("filename") or "").strip()
                if name and os.path.abspath(level / name) == os.path.abspath(path):
                    date = _iso_date(row.get("acq_time"))
                    if date:
                        return date, f"{tsv.name} acq_time"
        if ses:
            for tsv in sorted(sub_dir.glob("*_sessions.tsv")):
                for row in _read_tsv(tsv):
                    if (row.get("session_id") or "").strip() in (ses, ses[4:]):
                        date = _iso_date(row.get("acq_time"))
                        if date:
                            return date, f"{tsv.name} acq_time"
    sidecar = path.with_name(_strip_suffix(path.name) + ".json")
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
        for key in ("AcquisitionDateTime", "AcquisitionDate"):
            date = _iso_date(meta.get(key)) if isinstance(meta, dict) else None
            if date:
                return date, f"{sidecar.name} {key}"
    if path.name.lower().endswith((".nii", ".nii.gz")) and path.is_file():
        try:
            import nibabel as nib

            descrip = nib.load(str(path)).header["descrip"].tobytes().decode("latin-1")
            m = _ISO_DATE.search(descrip)
            if m:
                return _iso_date(m.group(0)), "NIfTI header descrip"
        except Exception:  # noqa: BLE001 - an unreadable header is the segmentation's problem, not the date's
            pass
    return None, None


# ---------------------------------------------------------------------------------------------
# result folder states and leftovers
# ---------------------------------------------------------------------------------------------


def clean_scan_leftovers(out_dir: Path, name: str, log) -> None:
    """Remove what an interrupted write of ``name`` left (staging folders); put back a result that
    an interrupted overwrite had set aside, when the new one never arrived. The batch lock is held,
    so no other batch can be writing there (:func:`basalseg.staging.clean_leftovers`)."""
    from .results import RESULT_FILES
    from .staging import clean_leftovers

    for record in clean_leftovers(out_dir / name, RESULT_FILES, assume_dead=True):
        log("cleanup", scan=name, **{record["action"]: record["name"]}, message=record["message"])


#: the files a batch writes at the top of OUT_DIR (besides one folder per scan)
COHORT_FILES = ("volumes.csv", "volumes_wide.csv", "failures.csv", "report.html", LOG_NAME)


def _check_batch_folder(out_dir: Path) -> None:
    """Refuse an OUT_DIR whose cohort-table names are taken by files of someone else's: a folder
    that a batch wrote has its ``batch_log.jsonl``; without it, ``volumes.csv`` & co. are not ours.

    Raises:
        OutputExistsError: naming the file in the way.
    """
    from .errors import OutputExistsError

    if (out_dir / LOG_NAME).is_file():
        return
    taken = [name for name in COHORT_FILES if (out_dir / name).exists()]
    if taken:
        raise OutputExistsError(f"{out_dir} holds {', '.join(taken)} but is not a basalseg batch folder (no {LOG_NAME}): "
                                "the cohort tables would replace them; choose another --out")


class _Lock:
    """``OUT_DIR/.basalseg-batch.lock``, held (``flock``) while a batch writes there and removed at
    the end. A lock file removed by a finishing batch while another opened it is detected (its
    inode differs from the path's) and the lock taken again, so two batches never both hold one."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_NAME
        self.handle = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock
            return self
        for _ in range(100):
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                handle.close()
                raise BasalSegError(f"another basalseg batch is writing to {self.path.parent}; wait for it to finish") from exc
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.handle = handle
                return self
            handle.close()  # the file was removed by a batch that just ended: take the new one
        raise BasalSegError(f"cannot take the batch lock {self.path}")  # pragma: no cover

    def __exit__(self, *exc):
        if self.handle is not None:
            try:
                os.unlink(self.path)  # while still holding it: nobody else holds this inode
            except OSError:
                pass
            self.handle.close()
            self.handle = None


# ---------------------------------------------------------------------------------------------
# cohort tables
# ---------------------------------------------------------------------------------------------


def _num(value) -> str:
    return "" if value is None else repr(float(value)) if not isinstance(value, int) else str(value)


def write_cohort_tables(out_dir: str | os.PathLike, records) -> tuple[Path, Path]:
    """Write ``OUT_DIR/volumes.csv`` (long) and ``OUT_DIR/volumes_wide.csv`` from result records."""
    from .outputs import atomic_write_text
    from .structures import STRUCTURES

    out_dir = Path(out_dir)
    long_buf, wide_buf = io.StringIO(), io.StringIO()
    long_w = csv.DictWriter(long_buf, fieldnames=COHORT_COLUMNS, lineterminator="\n")
    wide_cols = (["scan", "subject", "session", "session_date"] + [f"{s.name}_ml" for s in STRUCTURES] +
                 ["brain_mask_ml", "brain_volume_ml", "brain_estimate", "brain_note", "structures_not_found"])
    wide_w = csv.DictWriter(wide_buf, fieldnames=wide_cols, lineterminator="\n")
    long_w.writeheader()
    wide_w.writeheader()
    for r in records:
        brain = r.brain
        status = brain.get("status") or "not_computed"
        common = {"scan": r.name, "subject": r.subject, "session": r.session, "session_date": r.session_date,
                  "brain_mask_ml": _num(brain.get("brain_mask_ml")), "brain_volume_ml": _num(brain.get("brain_volume_ml")),
                  "brain_estimate": status}
        for row in r.volumes:
            long_w.writerow({**common, "structure": row["structure"], "label": row["label"],
                             "volume_ml": _num(row["volume_ml"]), "volume_mm3": _num(row["volume_mm3"]),
                             "voxels": row["voxels"]})
        wide = {**common, "brain_note": brain.get("reason") or ("" if brain else "not computed (not a batch result)"),
                "structures_not_found": " ".join(r.missing)}
        wide.update({f"{row['structure']}_ml": _num(row["volume_ml"]) for row in r.volumes})
        wide_w.writerow(wide)
    atomic_write_text(out_dir / "volumes.csv", long_buf.getvalue())
    atomic_write_text(out_dir / "volumes_wide.csv", wide_buf.getvalue())
    return out_dir / "volumes.csv", out_dir / "volumes_wide.csv"


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


@dataclass
class BatchSummary:
    out_dir: Path
    total: int
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    cohort_csv: Path | None = None
    report: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return BATCH_FAILED_EXIT if self.failed else 0


def _now() -> str:
    """Local time now, ISO 8601 to the second (the log's and failures' timestamps)."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class _Log:
    """Appends JSON lines to ``batch_log.jsonl`` (each line flushed and synced)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, event: str, **fields) -> None:
        record = {"time": _now(), "event": event, **fields}
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, default=str) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise OutputWriteError(f"cannot write {self.path}: {exc.strerror or exc}") from exc


def _find_prompts(prompts_dir: Path | None, name: str) -> Path | None:
    """The scan's own prompts file in ``prompts_dir`` (see :func:`run_batch`), or None."""
    if prompts_dir is None:
        return None
    for candidate in (prompts_dir / name / "prompts.json", prompts_dir / f"{name}.json", prompts_dir / f"{name}.prompts.json"):
        if candidate.is_file():
            return candidate
    return None


def needs_prompter(todo, prompts=None, prompts_dir: Path | None = None) -> bool:
    """Whether some scan of ``todo`` (``[(scan, overwrite)]``) has no prompts given (neither one
    set for all, nor its own in ``prompts_dir``), so the prompt generator must run."""
    return prompts is None and any(_find_prompts(prompts_dir, s.name) is None for s, _ in todo)


def preload_pipeline(pipeline, need_prompter: bool) -> None:
    """Load the networks and backend now (a bad checkpoint stops the batch before any scan):
    the pipeline's ``prompter`` (when needed), ``student`` and ``backend`` attributes."""
    for name in (["prompter"] if need_prompter else []) + ["student", "backend"]:
        getattr(pipeline, name)


def process_scan(scan: Scan, out_dir: str | os.PathLike, pipeline, *, prompts=None, prompts_dir=None,
                 skull_stripped: str = "auto", overwrite: bool | str = False, qc: bool = True, progress=None,
                 warn=None, before_write=None) -> dict:
    """Segment one scan and write its result folder ``OUT_DIR/<scan>`` atomically (complete or absent),
    with its QC montage. What the serial loop and every executor's worker run (:mod:`basalseg.cluster`).

    Args:
        pipeline: a :class:`~basalseg.pipeline.Pipeline`: its ``segment`` returns a
            :class:`~basalseg.pipeline.SegmentResult` whose provenance holds ``foundation_student_dice``.
        overwrite: False (the folder must hold no result), True (replace BasalSegSAM's own, unchanged
            result files) or ``"named"`` (a damaged result redone: replace files with result names);
            other files in the folder are never touched (:class:`basalseg.staging.StagedOutputDir`).
        progress: ``f(stage, fraction)`` (may raise :class:`Cancelled` to stop the scan).
        warn: ``f(message)`` for problems that do not cost the result (default: ignored).
        before_write: called once between segmenting and writing (may raise :class:`Cancelled`).

    Returns:
        ``{"missing": [...]}``: the structures not found.

    Raises:
        whatever loading, segmenting or writing raised (nothing is left in ``OUT_DIR/<scan>``).
    """
    from .icv import estimate_brain_volumes
    from .imageio import load_volume
    from .prompts import load_prompts
    from .report import montage_from_result, write_montage
    from .results import write_result

    warn = warn or (lambda message: None)
    out_dir = Path(out_dir)
    volume = load_volume(scan.path)
    source = _find_prompts(Path(prompts_dir) if prompts_dir else None, scan.name)
    result = pipeline.segment(volume, prompts=load_prompts(source) if source is not None else prompts, progress=progress)
    provenance = dict(result.provenance)
    provenance["scan_info"] = {**scan.info(), "prompts_file": str(source) if source else None}
    try:
        provenance["brain_volume"] = estimate_brain_volumes(volume.data, volume.voxel_volume_mm3, skull_stripped)
    except Exception as exc:  # noqa: BLE001 - a QC figure must not cost the result
        provenance["brain_volume"] = {"status": "not_estimated", "reason": f"error: {type(exc).__name__}: {exc}"}
    result.provenance = provenance
    if before_write is not None:
        before_write()
    write_result(result, out_dir / scan.name, overwrite=bool(overwrite), qc=qc,
                 replace="named" if overwrite == "named" else "verified")
    try:
        write_montage(out_dir, scan.name, montage_from_result(result, title=scan.name))
    except Exception as exc:  # noqa: BLE001 - the report falls back to qc.png
        warn(f"QC montage not written: {type(exc).__name__}: {exc}")
    return {"missing": list(result.missing)}


def failure_row(scan: Scan, kind: str, message: str) -> dict:
    """A ``failures.csv`` row (:data:`basalseg.results.FAILURE_COLUMNS`), timed now."""
    return {"scan": scan.name, "input": str(scan.path), "kind": kind, "message": message, "time": _now()}


def scan_failure(scan: Scan, exc: BaseException) -> dict:
    """The ``failures.csv`` row of a scan that raised ``exc`` (call inside its ``except``), plus
    ``traceback`` for an unexpected error (not a :class:`BasalSegError`)."""
    expected = isinstance(exc, BasalSegError)
    kind = type(exc).__name__
    message = " ".join(str(exc).split()) or kind
    record = failure_row(scan, kind, message if expected else f"internal error: {kind}: {message}")
    if not expected:
        record["traceback"] = traceback.format_exc()
    return record


def _plan(scans: list[Scan], out_dir: Path, redo: str, log, summary: BatchSummary) -> tuple[list, dict]:
    """``(todo, refused)``: the scans to segment now, ``[(scan, overwrite)]`` (overwrite False, True
    or ``"named"``, see :func:`process_scan`), and ``{scan: failure row}`` for damaged results left
    alone; complete results go to ``summary.skipped``. Leftovers of interrupted runs are cleaned first."""
    from .results import result_state

    todo: list[tuple[Scan, bool | str]] = []
    refused: dict[str, dict] = {}
    for scan in scans:
        clean_scan_leftovers(out_dir, scan.name, log)
        state, reason = result_state(out_dir / scan.name)
        if state == "complete" and redo != "all":
            summary.skipped.append(scan.name)
        elif state == "incomplete" and redo == "none":
            refused[scan.name] = failure_row(scan, "IncompleteResult",
                                             f"{out_dir / scan.name} exists but is not a complete result ({reason}); "
                                             "left untouched: move it away or pass --redo-incomplete")
        else:
            todo.append((scan, "named" if state == "incomplete" else state != "absent"))
    return todo, refused


def _run_serial(todo: list, out_dir: Path, pipeline, job: dict, log, show, summary: BatchSummary,
                failures: dict, attempted: set) -> BaseException | None:
    """Segment ``todo`` here, one scan after the other, recording each outcome in ``summary``,
    ``failures`` and ``attempted``; returns the interruption, if any."""
    for index, (scan, overwrite) in enumerate(todo):
        t0 = time.perf_counter()
        attempted.add(scan.name)
        try:
            written = process_scan(scan, out_dir, pipeline, overwrite=overwrite, progress=show.started(scan.name, index),
                                   warn=lambda message, scan=scan: log("warning", scan=scan.name, message=message), **job)
        except (KeyboardInterrupt, Cancelled) as exc:
            log("interrupted", scan=scan.name)
            return exc
        except Exception as exc:  # noqa: BLE001 - one scan's failure must not stop the others
            failure = scan_failure(scan, exc)
            failures[scan.name] = {k: v for k, v in failure.items() if k != "traceback"}
            log("failed", scan=scan.name, input=str(scan.path), kind=failure["kind"], message=failure["message"],
                seconds=round(time.perf_counter() - t0, 2),
                **({"traceback": failure["traceback"]} if "traceback" in failure else {}))
            show.failed(scan.name, index, failure["message"], failure["kind"])
            continue
        seconds = round(time.perf_counter() - t0, 2)
        summary.done.append(scan.name)
        failures.pop(scan.name, None)
        log("done", scan=scan.name, input=str(scan.path), seconds=seconds, missing=written["missing"])
        show.done(scan.name, index, seconds, written["missing"])
    return None


def run_batch(scans: list[Scan], out_dir: str | os.PathLike, pipeline, *, prompts=None, prompts_dir=None,
              skull_stripped: str = "auto", redo: str = "none", qc: bool = True, progress: str = "none",
              report: bool = True, thresholds=None, embed: bool = False, echo=None, executor=None) -> BatchSummary:
    """Segment every scan not yet done; write the cohort tables, failures and report.

    Args:
        scans: from :func:`discover_scans`.
        out_dir: the batch output folder (created).
        pipeline: a :class:`~basalseg.pipeline.Pipeline` (its ``segment``, and the ``prompter``,
            ``student`` and ``backend`` it loads up front), reused for every scan.
        prompts: one :class:`~basalseg.prompts.PromptSet` for every scan (images on one common grid).
        prompts_dir: per-scan prompts: ``DIR/<scan>/prompts.json``, ``DIR/<scan>.json`` or
            ``DIR/<scan>.prompts.json`` (a scan without one gets the prompt generator's).
        skull_stripped: for the brain volume (:func:`basalseg.icv.estimate_brain_volumes`).
        redo: ``"none"`` (skip complete results, refuse damaged ones), ``"incomplete"`` (also
            replace damaged ones) or ``"all"`` (replace every result).
        qc: write each result's ``qc.png``.
        progress: ``"bar"``, ``"json"`` or ``"none"`` (:class:`basalseg.progress.BatchProgress`).
        report: write ``report.html`` at the end.
        thresholds: :class:`basalseg.cohortqc.Thresholds` for the report.
        embed: inline the report's pictures.
        echo: ``f(text)`` for per-scan lines in ``"none"`` mode (default: print to stdout).
        executor: None to segment the scans here, one after the other with ``pipeline``; or an
            executor of :mod:`basalseg.cluster` (Dask, SLURM), which runs :func:`process_scan` on its
            workers (each building its own pipeline; ``pipeline`` is then not used).

    Raises:
        Cancelled: interrupted (tables and report are still written for the finished scans).
        BasalSegError: the output folder is unusable, another batch holds it, or the networks
            cannot be loaded.
    """
    from . import __version__
    from .cohortqc import cohort_warnings
    from .progress import BatchProgress
    from .report import build_report
    from .results import find_results, read_failures, write_failures

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BasalSegError(f"{out_dir} is a file, not an output folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"cannot write {out_dir}: {exc.strerror or exc}") from exc
    _check_batch_folder(out_dir)
    prompts_dir = Path(prompts_dir) if prompts_dir else None
    summary = BatchSummary(out_dir=out_dir, total=len(scans))
    job = {"prompts": prompts, "prompts_dir": prompts_dir, "skull_stripped": skull_stripped, "qc": qc}

    with _Lock(out_dir):
        log = _Log(out_dir / LOG_NAME)
        todo, failures = _plan(scans, out_dir, redo, log, summary)
        log("start", basalseg=__version__, argv=sys.argv[1:], scans=len(scans), todo=len(todo),
            skipped=len(summary.skipped), refused=len(failures))
        for name in summary.skipped:
            log("skipped", scan=name, reason="complete result already there")
        for f in failures.values():
            log("failed", scan=f["scan"], input=f["input"], kind=f["kind"], message=f["message"])
        interrupted: BaseException | None = None
        attempted: set[str] = set()
        if todo and executor is not None:
            outcome = executor.run(todo, out_dir, job, log=log, progress=progress, echo=echo)
            summary.done.extend(outcome.done)
            failures.update({f["scan"]: {k: v for k, v in f.items() if k != "traceback"} for f in outcome.failed})
            for name in outcome.done:
                failures.pop(name, None)
            attempted.update(outcome.attempted)
            interrupted = outcome.interrupted
        elif todo:
            try:
                preload_pipeline(pipeline, needs_prompter(todo, prompts, prompts_dir))
            except BasalSegError as exc:
                log("stopped", kind=type(exc).__name__, message=" ".join(str(exc).split()))
                raise
            show = BatchProgress(progress, len(todo), echo=echo)
            show.open()
            try:
                interrupted = _run_serial(todo, out_dir, pipeline, job, log, show, summary, failures, attempted)
            finally:
                show.close(complete=interrupted is None)

        # failures: this run's, plus earlier ones for scans this run did not reach and that are still not done
        known = {s.name for s in scans}
        for old in read_failures(out_dir):
            if old["scan"] in known and old["scan"] not in attempted and old["scan"] not in failures \
                    and old["scan"] not in summary.skipped:
                failures[old["scan"]] = old
        summary.failed = [failures[s.name] for s in scans if s.name in failures]
        write_failures(out_dir, summary.failed)
        records, broken = find_results(out_dir)
        summary.cohort_csv = write_cohort_tables(out_dir, records)[0]
        summary.warnings = cohort_warnings(records)
        if report:
            summary.report = build_report(out_dir, thresholds, embed=embed, records=records, broken=broken)
        log("end", done=len(summary.done), skipped=len(summary.skipped), failed=len(summary.failed),
            interrupted=interrupted is not None, results_in_cohort=len(records))
    if interrupted is not None:
        raise Cancelled(f"batch interrupted after {len(summary.done)} scans; finished results are kept, run again to resume")
    return summary


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def register(sub) -> None:
    from .cli import _add_run_options
    from .cluster import add_executor_options
    from .icv import SKULL_STRIPPED_CHOICES
    from .report import add_threshold_options

    p = sub.add_parser("batch", help="segment every T1 of a folder or BIDS tree (resumable), with cohort tables and a QC report",
                       description="Segment every T1 in INPUT_DIR into OUT_DIR/<scan>/, skipping scans already done. "
                                   "Exit status 0 when every scan has a result, 3 when some failed, 2 for a problem "
                                   "with the options, inputs or weights that stops the whole batch.")
    p.add_argument("input_dir", type=Path, help="folder of T1 files (.nii, .nii.gz, .nrrd) or a BIDS dataset")
    _add_run_options(p)
    for action in p._actions:  # the shared options' help, in batch terms
        if action.dest == "overwrite":
            action.help = "redo every scan, replacing its result (default: skip scans already done)"
        elif action.dest == "prompts":
            action.help = "one prompts.json for every scan (only for images on one common grid)"
        elif action.dest == "out":
            action.help = "output folder: one result folder per scan, cohort volumes.csv, report.html"
    p.add_argument("--prompts-dir", type=Path, default=None,
                   help="per-scan prompts: DIR/<scan>/prompts.json (e.g. an earlier batch folder with edited prompts), "
                        "DIR/<scan>.json or DIR/<scan>.prompts.json; scans without one use the prompt generator")
    p.add_argument("--redo-incomplete", action="store_true",
                   help="replace result folders that exist but are not complete (default: leave them and report them)")
    p.add_argument("--skull-stripped", default="auto", choices=SKULL_STRIPPED_CHOICES,
                   help="for the brain-mask volume: auto-detect skull-stripped inputs (default), or say so")
    p.add_argument("--no-report", action="store_true", help="do not write report.html")
    add_threshold_options(p)
    add_executor_options(p)
    p.set_defaults(handler=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    from .cli import _config, _progress_mode
    from .cluster import check_executor_args, make_executor, slurm_job_script
    from .progress import emit_json
    from .prompts import load_prompts
    from .report import thresholds_from_args

    if args.band is not None and args.band <= 0:
        raise BasalSegError(f"--band must be > 0, got {args.band}")
    if args.prompts and args.prompts_dir:
        raise BasalSegError("give --prompts or --prompts-dir, not both")
    if args.prompts_dir and not args.prompts_dir.is_dir():
        raise BasalSegError(f"--prompts-dir {args.prompts_dir}: no such folder")
    thresholds = thresholds_from_args(args)
    check_executor_args(args)
    if args.print_job_script:
        print(slurm_job_script(args, args.out), end="")
        return 0
    scans = discover_scans(args.input_dir)
    prompts = load_prompts(args.prompts) if args.prompts else None
    mode = _progress_mode(args.progress)
    redo = "all" if args.overwrite else "incomplete" if args.redo_incomplete else "none"
    executor = make_executor(args, _config(args), args.out)  # None: --executor local
    if executor is None:
        from .pipeline import Pipeline

        pipeline = Pipeline(_config(args))
    else:
        pipeline = None  # each worker builds its own
    summary = run_batch(scans, args.out, pipeline, prompts=prompts, prompts_dir=args.prompts_dir,
                        skull_stripped=args.skull_stripped, redo=redo, qc=not args.no_qc, progress=mode,
                        report=not args.no_report, thresholds=thresholds, embed=args.embed, executor=executor)
    if mode == "json":
        emit_json(event="done", out=str(args.out), done=len(summary.done), skipped=len(summary.skipped),
                  failed=len(summary.failed), report=str(summary.report) if summary.report else None)
    else:
        print(f"batch: {summary.total} scans: {len(summary.done)} done, {len(summary.skipped)} skipped (already complete), "
              f"{len(summary.failed)} failed")
        print(f"  cohort table: {summary.cohort_csv}")
        if summary.report:
            print(f"  QC report:    {summary.report}")
    for w in summary.warnings:
        print(f"basalseg: warning: {w}", file=sys.stderr)
    if summary.failed:
        for f in summary.failed:
            print(f"basalseg: failed: {f['scan']}: {f['message']}", file=sys.stderr)
        print(f"basalseg: error: {len(summary.failed)} of {summary.total} scans failed (listed in "
              f"{Path(args.out) / 'failures.csv'}; details in {Path(args.out) / LOG_NAME})", file=sys.stderr)
    return summary.exit_code
