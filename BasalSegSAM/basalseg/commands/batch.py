"""``basalseg batch INPUT_DIR --out OUT_DIR``: every T1 of a folder or BIDS tree (:mod:`basalseg.batch`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import add_run_options, check_band, pipeline_config, progress_mode
from .report import add_threshold_options, thresholds

__all__ = ["register", "run", "add_executor_options", "check_executor_args", "executor_from_args"]


def register(sub) -> None:
    from ..icv import SKULL_STRIPPED_CHOICES

    p = sub.add_parser("batch", help="segment every T1 of a folder or BIDS tree (resumable), with cohort tables and a QC report",
                       description="Segment every T1 in INPUT_DIR into OUT_DIR/<scan>/, skipping scans already done. "
                                   "Exit status 0 when every scan has a result, 3 when some failed, 2 for a problem "
                                   "with the options, inputs or weights that stops the whole batch.")
    p.add_argument("input_dir", type=Path, help="folder of T1 files (.nii, .nii.gz, .nrrd) or a BIDS dataset")
    add_run_options(p)
    for action in p._actions:  # the shared options' help, in batch terms
        if action.dest == "overwrite":
            action.help = "redo every scan, replacing its result (default: skip scans already done)"
        elif action.dest == "prompts":
            action.help = "one prompts.json for every scan (only for images on one common grid)"
        elif action.dest == "out":
            action.help = ("output folder: one result folder per scan, the cohort tables volumes.csv, volumes_wide.csv, "
                           "changes.csv (follow-up), report.html")
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
    p.set_defaults(handler=run)


# ---------------------------------------------------------------------------------------------
# executors (basalseg.cluster)
# ---------------------------------------------------------------------------------------------


def add_executor_options(p) -> None:
    from ..cluster import EXECUTORS

    g = p.add_argument_group("running on several processes or machines (pip install -e \".[cluster]\")")
    g.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local: one scan after the other in this process (default); dask: a Dask cluster "
                        "(--workers N on this machine, or --scheduler ADDRESS); slurm: SLURM jobs through "
                        "dask-jobqueue")
    g.add_argument("--workers", type=int, default=None,
                   help="dask: worker processes on this machine (default: cores // 4); slurm: jobs (default 4)")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="dask: a running Dask scheduler (tcp://host:8786) instead of starting workers here")
    g.add_argument("--partition", default=None, help="slurm: partition (default: the site's)")
    g.add_argument("--time", dest="slurm_time", default=None, metavar="TIME",
                   help="slurm: wall time per job (HH:MM:SS or D-HH:MM:SS; default: the site's)")
    g.add_argument("--mem", default=None, help="slurm: memory per job (default 8G)")
    g.add_argument("--gpus", default=None, help="slurm: GPUs per job (a count, or TYPE:COUNT)")
    g.add_argument("--print-job-script", action="store_true",
                   help="slurm: print the job script that would be submitted, and stop")


def check_executor_args(args: argparse.Namespace) -> None:
    """Options of another executor are refused with one line rather than ignored."""
    from ..errors import BasalSegError

    executor = args.executor
    if executor != "dask" and args.scheduler:
        raise BasalSegError("--scheduler needs --executor dask")
    if executor == "local" and args.workers is not None:
        raise BasalSegError("--workers needs --executor dask or --executor slurm")
    if executor != "slurm":
        given = [flag for flag, value in (("--partition", args.partition), ("--time", args.slurm_time),
                                          ("--mem", args.mem), ("--gpus", args.gpus),
                                          ("--print-job-script", args.print_job_script)) if value]
        if given:
            raise BasalSegError(f"{', '.join(given)} need --executor slurm")
    if executor == "dask" and args.scheduler and args.workers is not None:
        raise BasalSegError("give --workers (start workers here) or --scheduler (use a running cluster), not both")


def _slurm_resources(args: argparse.Namespace) -> dict:
    return {"partition": args.partition, "time_limit": args.slurm_time, "mem": args.mem, "gpus": args.gpus}


def executor_from_args(args: argparse.Namespace, config):
    """:func:`basalseg.cluster.make_executor` for ``batch``'s options (None for ``--executor local``)."""
    from ..cluster import make_executor

    check_executor_args(args)
    return make_executor(args.executor, config, args.out, workers=args.workers, threads=args.threads,
                         scheduler=args.scheduler, **_slurm_resources(args))


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from ..batch import LOG_NAME, run_batch
    from ..bids import discover_scans
    from ..errors import BasalSegError
    from ..progress import emit_json
    from ..prompts import load_prompts

    check_band(args)
    if args.prompts and args.prompts_dir:
        raise BasalSegError("give --prompts or --prompts-dir, not both")
    if args.prompts_dir and not args.prompts_dir.is_dir():
        raise BasalSegError(f"--prompts-dir {args.prompts_dir}: no such folder")
    limits = thresholds(args)
    check_executor_args(args)
    if args.print_job_script:
        from ..cluster import slurm_job_script

        print(slurm_job_script(args.out, threads=args.threads, **_slurm_resources(args)), end="")
        return 0
    scans = discover_scans(args.input_dir)
    prompts = load_prompts(args.prompts) if args.prompts else None
    mode = progress_mode(args.progress)
    redo = "all" if args.overwrite else "incomplete" if args.redo_incomplete else "none"
    config = pipeline_config(args)
    executor = executor_from_args(args, config)  # None: --executor local
    if executor is None:
        from ..pipeline import Pipeline

        pipeline = Pipeline(config)
    else:
        pipeline = None  # each worker builds its own
    summary = run_batch(scans, args.out, pipeline, prompts=prompts, prompts_dir=args.prompts_dir,
                        skull_stripped=args.skull_stripped, redo=redo, qc=not args.no_qc, progress=mode,
                        report=not args.no_report, thresholds=limits, embed=args.embed, executor=executor)
    if mode == "json":
        emit_json(event="done", out=str(args.out), done=len(summary.done), skipped=len(summary.skipped),
                  failed=len(summary.failed), report=str(summary.report) if summary.report else None)
    else:
        print(f"batch: {summary.total} scans: {len(summary.done)} done, {len(summary.skipped)} skipped (already complete), "
              f"{len(summary.failed)} failed")
        tables = summary.tables or (summary.cohort_csv,)
        print(f"  cohort tables: {', '.join(str(t) for t in tables[:2])}")
        if len(tables) > 2:
            print(f"  follow-up:     {tables[2]} (change between the sessions of each subject)")
        if summary.report:
            print(f"  QC report:     {summary.report}")
    for w in summary.warnings:
        print(f"basalseg: warning: {w}", file=sys.stderr)
    if summary.failed:
        for f in summary.failed:
            print(f"basalseg: failed: {f['scan']}: {f['message']}", file=sys.stderr)
        print(f"basalseg: error: {len(summary.failed)} of {summary.total} scans failed (listed in "
              f"{Path(args.out) / 'failures.csv'}; details in {Path(args.out) / LOG_NAME})", file=sys.stderr)
    return summary.exit_code
