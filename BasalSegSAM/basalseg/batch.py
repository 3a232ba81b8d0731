"""``basalseg batch INPUT_DIR --out OUT_DIR``: a cohort in one command, resumable.

**Inputs.** Either a folder of T1 files or a BIDS dataset (:func:`basalseg.bids.discover_scans`).

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
    brain_estimate, volume_ml_low, volume_ml_high``; the structure columns are copied from each
    scan's ``volumes.csv`` (``volume_ml_low``/``_high``: its 95 % volume interval,
    docs/UNCERTAINTY.md; blank when it has none). The brain columns repeat on each of a scan's rows
    (blank where not estimated, see :mod:`basalseg.icv`): divide by them to normalise.
``volumes_wide.csv``
    the same, one row per scan (``<Structure>_ml`` columns, then ``<Structure>_ml_low`` /
    ``_ml_high``) for spreadsheets and statistics.
``changes.csv``
    the follow-up table: for every subject with several sessions, the change between consecutive
    sessions (in session-date order), one row per pair and structure, the columns of ``basalseg
    compare`` (:data:`basalseg.longitudinal.CHANGES_COLUMNS`: change in mL and %, %/year, each
    scan's interval, the smallest detectable change and whether the change exceeds it), plus the
    repeatability study the SDC comes from, or why a pair has none, and its warnings. Only the header when no subject has two sessions.
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

**Discovery and session dates** (which files are scans, their names, subjects, sessions and
acquisition dates): :mod:`basalseg.bids`. The command line is :mod:`basalseg.commands.batch`.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BasalSegError, Cancelled, OutputWriteError
from .bids import Scan

_log = logging.getLogger("basalseg")

__all__ = ["Scan", "process_scan", "run_batch", "BatchSummary", "write_cohort_tables", "scan_failure", "failure_row",
           "preload_pipeline", "needs_prompter", "clean_scan_leftovers", "COHORT_COLUMNS", "BATCH_FAILED_EXIT",
           "LOG_NAME"]

#: Exit status when some scans failed (the others are done).
BATCH_FAILED_EXIT = 3
LOG_NAME = "batch_log.jsonl"
LOCK_NAME = ".basalseg-batch.lock"
COHORT_COLUMNS = ["scan", "subject", "session", "session_date", "structure", "label", "volume_ml", "volume_mm3", "voxels",
                  "brain_mask_ml", "brain_volume_ml", "brain_estimate", "volume_ml_low", "volume_ml_high"]


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
COHORT_FILES = ("volumes.csv", "volumes_wide.csv", "changes.csv", "failures.csv", "report.html", LOG_NAME)


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


def write_cohort_tables(out_dir: str | os.PathLike, records, pairs: list[tuple] | None = None) -> tuple[Path, Path, Path]:
    """Write ``OUT_DIR/volumes.csv`` (long), ``OUT_DIR/volumes_wide.csv`` and ``OUT_DIR/changes.csv``
    (module docstring) from result records (``pairs``: their
    :func:`basalseg.longitudinal.consecutive_changes`, when already made for the report)."""
    from .longitudinal import changes_csv_text, consecutive_changes, record_date
    from .outputs import atomic_write_text
    from .structures import STRUCTURES

    out_dir = Path(out_dir)
    long_buf, wide_buf = io.StringIO(), io.StringIO()
    long_w = csv.DictWriter(long_buf, fieldnames=COHORT_COLUMNS, lineterminator="\n")
    wide_cols = (["scan", "subject", "session", "session_date"] + [f"{s.name}_ml" for s in STRUCTURES] +
                 ["brain_mask_ml", "brain_volume_ml", "brain_estimate", "brain_note", "structures_not_found"] +
                 [f"{s.name}_ml_{end}" for s in STRUCTURES for end in ("low", "high")])
    wide_w = csv.DictWriter(wide_buf, fieldnames=wide_cols, lineterminator="\n")
    long_w.writeheader()
    wide_w.writeheader()
    for r in records:
        brain = r.brain
        status = brain.get("status") or "not_computed"
        date = record_date(r)[0]  # a date corrected in the dataset since the scan was segmented wins
        common = {"scan": r.name, "subject": r.subject, "session": r.session,
                  "session_date": date.isoformat() if date else "",
                  "brain_mask_ml": _num(brain.get("brain_mask_ml")), "brain_volume_ml": _num(brain.get("brain_volume_ml")),
                  "brain_estimate": status}
        for row in r.volumes:
            long_w.writerow({**common, "structure": row["structure"], "label": row["label"],
                             "volume_ml": _num(row["volume_ml"]), "volume_mm3": _num(row["volume_mm3"]),
                             "voxels": row["voxels"], "volume_ml_low": _num(row.get("volume_ml_low")),
                             "volume_ml_high": _num(row.get("volume_ml_high"))})
        wide = {**common, "brain_note": brain.get("reason") or ("" if brain else "not computed (not a batch result)"),
                "structures_not_found": " ".join(r.missing)}
        for row in r.volumes:
            wide[f"{row['structure']}_ml"] = _num(row["volume_ml"])
            for end in ("low", "high"):
                wide[f"{row['structure']}_ml_{end}"] = _num(row.get(f"volume_ml_{end}"))
        wide_w.writerow(wide)
    atomic_write_text(out_dir / "volumes.csv", long_buf.getvalue())
    atomic_write_text(out_dir / "volumes_wide.csv", wide_buf.getvalue())
    atomic_write_text(out_dir / "changes.csv", changes_csv_text(consecutive_changes(records) if pairs is None else pairs))
    return out_dir / "volumes.csv", out_dir / "volumes_wide.csv", out_dir / "changes.csv"


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
    tables: tuple = ()  # volumes.csv, volumes_wide.csv, changes.csv
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
        seen = result.volume if result.volume is not None else volume  # as the pipeline saw it (conformed intensities)
        provenance["brain_volume"] = estimate_brain_volumes(seen.data, seen.voxel_volume_mm3, skull_stripped)
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
        scans: from :func:`basalseg.bids.discover_scans`.
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
    from .longitudinal import consecutive_changes
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
        pairs = consecutive_changes(records)  # changes.csv and the report's longitudinal view
        summary.tables = write_cohort_tables(out_dir, records, pairs)
        summary.cohort_csv = summary.tables[0]
        summary.warnings = cohort_warnings(records)
        if report:
            summary.report = build_report(out_dir, thresholds, embed=embed, records=records, broken=broken, pairs=pairs)
        log("end", done=len(summary.done), skipped=len(summary.skipped), failed=len(summary.failed),
            interrupted=interrupted is not None, results_in_cohort=len(records))
    if interrupted is not None:
        raise Cancelled(f"batch interrupted after {len(summary.done)} scans segmented in this run "
                        f"({len(summary.skipped)} were already done and skipped); finished results are kept, "
                        "run again to resume")
    return summary
