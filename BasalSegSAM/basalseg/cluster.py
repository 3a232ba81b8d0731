"""Cohorts beyond one process: ``basalseg batch --executor dask|slurm``.

The batch itself (what is skipped, the lock, the failures, the cohort tables and the report) stays
in :func:`basalseg.batch.run_batch`; an executor here only runs :func:`basalseg.batch.process_scan`
for each scan to do, as one `Dask <https://distributed.dask.org>`_ task per scan, and hands back
what became of each. The engine is Dask's; there is no scheduler of our own.

``--executor dask``
    ``--workers N`` starts a ``dask.distributed.LocalCluster`` of N worker processes on this
    machine; ``--scheduler ADDRESS`` (``tcp://host:8786``) uses a running Dask cluster instead.
``--executor slurm``
    a ``dask_jobqueue.SLURMCluster``: ``--workers N`` SLURM jobs of one worker each, with
    ``--partition``, ``--time``, ``--mem``, ``--gpus`` and ``--threads`` CPUs per job. The batch
    command stays on the submitting node and holds the Dask scheduler there while the jobs run
    (use ``tmux``/``screen`` or submit the command itself as a small job); everything else
    (account, interface, module loads) comes from dask-jobqueue's own configuration
    (``~/.config/dask/jobqueue.yaml``, section ``jobqueue.slurm``). ``--print-job-script``
    prints the job script and submits nothing (the jobs' logs go to ``OUT_DIR/.slurm-logs/``).
    ``OUT_DIR`` and the inputs must be on a file system the compute nodes share. ``--scheduler``
    workers get ``--threads`` torch threads (default: torch's own).

Why SLURMCluster rather than an ``sbatch`` job array: one code path for both executors, so the
SLURM run has exactly the guarantees of the Dask one (progress and ETA from the futures, failures
and the cohort tables handled in one place, Ctrl-C cancels everything, ``scancel`` included); the
price is the scheduler process on the submitting node.

**Workers.** Each worker process builds its pipeline once, on its first task (cached per process,
:func:`worker_pipeline`), and runs one scan at a time with ``--threads`` torch threads; for
``--workers N`` alone the threads are ``cores // N`` so that workers x threads <= cores. Before
any scan, one warm-up task loads the networks on a worker: missing or broken weights stop the
batch (status 2) as in the serial run.

**Guarantees** (as the serial run's): a result folder is written through a staging folder and
renamed into place, so it is complete or absent even when a worker dies (on the clusters started
here Dask retries a scan once on another worker when its worker is lost, and a second loss fails
the scan as ``KilledWorker``; a ``--scheduler`` cluster has its own setting); after the run,
staging leftovers of every scan are removed. At most one scan per worker is in flight. A failing scan is logged and the
others go on. Ctrl-C (or SIGTERM) sets a Dask ``Event`` that every running task polls between
stages, cancels what is still queued, waits a moment for the running scans to stop, then shuts
down the cluster it started and cleans up; finished results are kept and a rerun resumes.

Dask is imported only when one of these executors is chosen (``pip install -e ".[cluster]"``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BasalSegError, Cancelled

__all__ = ["EXECUTORS", "DaskExecutor", "ExecutorOutcome", "PipelineFactory", "make_executor", "slurm_job_script",
           "plan_threads", "worker_pipeline", "slurm_cluster_options", "INSTALL_HINT"]

EXECUTORS = ("local", "dask", "slurm")
INSTALL_HINT = 'pip install -e ".[cluster]"'
#: how many times Dask may lose a worker while it runs one scan before the scan fails (own clusters).
LOST_WORKER_RETRIES = 1
#: seconds given to running scans to stop after Ctrl-C before the cluster is shut down.
CANCEL_GRACE_S = 20.0
#: seconds between two looks at the cancel flag inside a task.
_POLL_S = 1.0

_SLURM_TIME = re.compile(r"^(\d+-\d+(:\d+(:\d+)?)?|\d+(:\d+(:\d+)?)?)$")  # sbatch --time forms
_SLURM_MEM = re.compile(r"^\d+[KMGT]?$")
_SLURM_GPUS = re.compile(r"^([A-Za-z0-9_.-]+:)?\d+$")
_SLURM_PARTITION = re.compile(r"^[A-Za-z0-9_.,-]+$")


def _distributed():
    """``distributed``, or one clear error naming the install command."""
    try:
        import distributed
    except ImportError:
        raise BasalSegError(f"--executor dask/slurm needs dask.distributed, which is not installed; "
                            f"install it with: {INSTALL_HINT}") from None
    return distributed


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------


class PipelineFactory:
    """Builds a :class:`basalseg.pipeline.Pipeline` from a config on a worker (picklable)."""

    def __init__(self, config):
        self.config = config

    def __call__(self):
        from .pipeline import Pipeline

        return Pipeline(self.config)


_PIPELINES: dict[str, object] = {}
_ONE_SCAN_AT_A_TIME = threading.Lock()
_BUILDS: dict[str, int] = {}


def worker_pipeline(factory, threads: int | None = None):
    """The pipeline ``factory()`` builds, built once per worker process and kept for its later tasks.
    Returns ``(pipeline, builds)``: builds is how many times this process built it (1 unless the
    process lost it)."""
    key = hashlib.sha256(pickle.dumps(factory)).hexdigest()
    if key not in _PIPELINES:
        if threads:
            try:
                import torch

                torch.set_num_threads(int(threads))
            except ImportError:  # pragma: no cover - the pipeline needs torch anyway
                pass
        _PIPELINES[key] = factory()
        _BUILDS[key] = _BUILDS.get(key, 0) + 1
    return _PIPELINES[key], _BUILDS[key]


def _worker_id() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def _dashboard(client) -> str | None:
    try:
        import bokeh  # noqa: F401 - Dask serves its dashboard only with bokeh
    except ImportError:
        return None
    return getattr(client, "dashboard_link", None)


def _warm_up(factory, threads, need_prompter: bool) -> dict:
    """Task: load the networks and backend on this worker now (as the serial run's preload)."""
    from .batch import preload_pipeline

    try:
        pipeline, builds = worker_pipeline(factory, threads)
        preload_pipeline(pipeline, need_prompter)
    except BasalSegError as exc:
        return {"status": "error", "kind": type(exc).__name__, "message": " ".join(str(exc).split())}
    return {"status": "ok", "worker": _worker_id(), "pid": os.getpid(), "builds": builds}


class _CancelFlag:
    """Polls the run's Dask ``Event`` at most once a second; raises Cancelled once it is set."""

    def __init__(self, name: str):
        self.name = name
        self.event = None
        self.last = 0.0

    def check(self, *_args) -> None:
        now = time.monotonic()
        if now - self.last < _POLL_S:
            return
        self.last = now
        if self.event is None:
            from distributed import Event

            self.event = Event(self.name)
        if self.event.is_set():
            raise Cancelled("batch cancelled")


def _scan_task(scan, out_dir: str, overwrite: bool, job: dict, factory, threads, cancel_name: str) -> dict:
    """Task: one scan, start to finish, on a worker. Never raises for the scan's own failure: the
    outcome comes back as a dict (status done / failed / cancelled)."""
    from .batch import process_scan, scan_failure

    t0 = time.perf_counter()
    warnings: list[str] = []
    flag = _CancelFlag(cancel_name)
    base = {"scan": scan.name, "worker": _worker_id(), "pid": os.getpid()}
    try:
        with _ONE_SCAN_AT_A_TIME:  # a worker with several threads shares one pipeline between them
            flag.check()
            pipeline, builds = worker_pipeline(factory, threads)
            base["builds"] = builds
            written = process_scan(scan, out_dir, pipeline, overwrite=overwrite, progress=flag.check,
                                   warn=warnings.append, before_write=lambda: (setattr(flag, "last", 0.0), flag.check()),
                                   **job)
    except Cancelled:
        return {**base, "status": "cancelled", "warnings": warnings}
    except Exception as exc:  # noqa: BLE001 - one scan's failure is reported, the others go on
        return {**base, "status": "failed", "failure": scan_failure(scan, exc), "warnings": warnings,
                "seconds": round(time.perf_counter() - t0, 2)}
    return {**base, "status": "done", "missing": written["missing"], "warnings": warnings,
            "seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------
# the executor
# ---------------------------------------------------------------------------------------------


@dataclass
class ExecutorOutcome:
    """What :meth:`DaskExecutor.run` hands back to :func:`basalseg.batch.run_batch`."""

    done: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # failures.csv rows (+ traceback)
    attempted: set[str] = field(default_factory=set)
    interrupted: BaseException | None = None


def scheduler_config() -> dict:
    """Dask settings for the clusters started here: a scan whose worker is lost is retried
    LOST_WORKER_RETRIES times."""
    return {"distributed.scheduler.allowed-failures": LOST_WORKER_RETRIES}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def plan_threads(workers: int | None, threads: int | None, cores: int) -> tuple[int, int, str | None]:
    """``(workers, threads, warning)`` for a cluster on this machine: workers x threads <= cores
    unless both were given (then a warning says the CPUs are oversubscribed)."""
    if workers is not None and workers < 1:
        raise BasalSegError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise BasalSegError(f"--threads must be >= 1, got {threads}")
    if workers is None:
        workers = max(1, cores // (threads or 4))
    if threads is None:
        threads = max(1, cores // workers)
    warning = None
    if workers * threads > cores:
        warning = (f"{workers} workers x {threads} threads = {workers * threads} threads on {cores} cores: "
                   "the workers will slow each other down")
    return workers, threads, warning


class DaskExecutor:
    """Runs the batch's scans as Dask tasks.

    Args:
        factory: a picklable ``f() -> pipeline`` (:class:`PipelineFactory`), called once per worker.
        workers: worker processes of the LocalCluster started here (or SLURM jobs with ``cluster``).
        threads: torch threads per worker (one scan at a time per worker).
        scheduler: address of a running Dask scheduler (then nothing is started here).
        cluster: ``f(workers, threads) -> a Dask cluster`` to start instead of a LocalCluster
            (:func:`make_executor` passes a SLURMCluster's).
        name: for messages (``"dask"``, ``"slurm"``).
    """

    def __init__(self, factory, *, workers: int | None = None, threads: int | None = None, scheduler: str | None = None,
                 cluster=None, name: str = "dask"):
        self.factory = factory
        self.workers, self.threads, self.scheduler, self.cluster_factory, self.name = \
            workers, threads, scheduler, cluster, name
        self.warning = None

    # -- connecting ---------------------------------------------------------------------------

    def _start(self, n_scans: int):
        distributed = _distributed()
        import dask

        if self.scheduler:
            try:
                client = distributed.Client(self.scheduler, timeout="30s")
            except (OSError, TimeoutError) as exc:
                raise BasalSegError(f"--scheduler {self.scheduler}: cannot connect ({exc})") from None
            return client, None
        with dask.config.set(scheduler_config()):
            if self.cluster_factory is not None:
                cluster = self.cluster_factory(min(self.workers or 1, n_scans), self.threads)
            else:
                workers, self.threads, self.warning = plan_threads(self.workers, self.threads, _cores())
                cluster = distributed.LocalCluster(n_workers=min(workers, n_scans), threads_per_worker=1, processes=True,
                                                   dashboard_address=":0", silence_logs=logging.ERROR)
        return distributed.Client(cluster), cluster

    # -- running ------------------------------------------------------------------------------

    def run(self, todo, out_dir, job: dict, *, log, progress: str = "none", echo=None) -> ExecutorOutcome:
        """Run ``todo`` (``[(scan, overwrite)]``); ``log(event, **fields)`` is the batch log."""
        from .batch import clean_scan_leftovers, needs_prompter
        from .progress import BatchProgress

        distributed = _distributed()
        out_dir = Path(out_dir)
        outcome = ExecutorOutcome()
        client, cluster = self._start(len(todo))
        show = BatchProgress(progress, len(todo), echo=echo)
        say = show.say

        cancel_name = f"basalseg-cancel-{uuid.uuid4().hex}"
        flag = distributed.Event(cancel_name, client=client)
        futures = {}
        try:
            if self.warning:
                log("warning", message=self.warning)
                say(f"basalseg: warning: {self.warning}")
            dashboard = _dashboard(client)
            log("executor", executor=self.name, scheduler=client.scheduler.address, workers=self.workers,
                threads=self.threads, dashboard=dashboard)
            if dashboard and progress != "json":
                say(f"batch: Dask dashboard at {dashboard}")
            try:
                need_prompter = needs_prompter(todo, job.get("prompts"),
                                               Path(job["prompts_dir"]) if job.get("prompts_dir") else None)
                if not client.scheduler_info().get("workers"):
                    say(f"batch: waiting for the first {self.name} worker")
                try:
                    warm = client.submit(_warm_up, self.factory, self.threads, need_prompter, pure=False,
                                         key=f"basalseg-warm-up-{uuid.uuid4().hex[:8]}").result()
                except Exception as exc:  # noqa: BLE001 - e.g. the worker died loading the networks
                    warm = {"status": "error", "kind": type(exc).__name__,
                            "message": f"a {self.name} worker could not load the pipeline: {type(exc).__name__}: "
                                       f"{' '.join(str(exc).split())}"}
                if warm["status"] != "ok":
                    log("stopped", kind=warm["kind"], message=warm["message"])
                    raise BasalSegError(warm["message"])
                show.open()

                def submit(scan, overwrite):
                    key = f"basalseg-scan-{scan.name}-{uuid.uuid4().hex[:8]}"
                    future = client.submit(_scan_task, scan, str(out_dir), overwrite, job, self.factory, self.threads,
                                           cancel_name, key=key, pure=False)
                    futures[future] = scan
                    return future

                self._collect(client, list(todo), submit, futures, outcome, log, show, distributed)
            except (KeyboardInterrupt, Cancelled) as exc:
                outcome.interrupted = exc
                self._cancel(client, flag, todo, futures, outcome, log, distributed)
        finally:
            show.close(complete=False)
            try:
                client.close()
                if cluster is not None:
                    cluster.close()
            except Exception:  # noqa: BLE001 - shutting down must not hide the batch's own outcome
                pass
            for scan, _ in todo:  # a lost worker's staging folders; an overwrite's moved-aside result
                clean_scan_leftovers(out_dir, scan.name, log)
        return outcome

    def _collect(self, client, queue, submit, futures, outcome, log, show, distributed) -> None:
        """Submit the scans as workers free up (never more in flight than the cluster has workers,
        so a lost worker takes no queued scan with it; workers that join later, e.g. SLURM jobs
        leaving the queue, get work within seconds), and record each outcome as it comes."""
        total = len(queue)
        inflight: list = []

        def top_up() -> None:
            slots = max(1, len(client.nthreads()))
            while queue and len(inflight) < slots:
                inflight.append(submit(*queue.pop(0)))

        top_up()
        count = 0
        while inflight:
            try:
                distributed.wait(inflight, timeout=_POLL_S * 2, return_when="FIRST_COMPLETED")
            except TimeoutError:
                pass
            for future in [f for f in inflight if f.done()]:
                inflight.remove(future)
                count += 1
                self._record(future, futures[future], count, outcome, log, show, distributed)
            top_up()

    def _record(self, future, scan, count, outcome, log, show, distributed) -> None:
        """One finished future (the ``count``-th): log it, show it (a
        :class:`~basalseg.progress.BatchProgress`), count it."""
        outcome.attempted.add(scan.name)
        try:
            res = future.result()
        except Exception as exc:  # noqa: BLE001 - a lost worker (KilledWorker) or a task Dask could not run
            kind = type(exc).__name__
            lost = isinstance(exc, distributed.KilledWorker)
            message = ("the Dask worker running this scan died, each time it was tried (out of memory? killed? "
                       "a SLURM job past its --time?); the worker's log says why" if lost
                       else f"internal error: {kind}: {' '.join(str(exc).split())}")
            from .batch import failure_row

            res = {"status": "failed", "failure": failure_row(scan, kind, message)}
        for message in res.get("warnings", []):
            log("warning", scan=scan.name, message=message)
        where = {k: res[k] for k in ("worker", "pid", "builds") if k in res}
        if res["status"] == "done":
            outcome.done.append(scan.name)
            log("done", scan=scan.name, input=str(scan.path), seconds=res["seconds"], missing=res["missing"], **where)
            show.done(scan.name, count - 1, res["seconds"], res["missing"])
        elif res["status"] == "failed":
            failure = res["failure"]
            outcome.failed.append(failure)
            log("failed", scan=scan.name, input=failure["input"], kind=failure["kind"], message=failure["message"],
                **({"seconds": res["seconds"]} if "seconds" in res else {}), **where,
                **({"traceback": failure["traceback"]} if "traceback" in failure else {}))
            show.failed(scan.name, count - 1, failure["message"], failure["kind"])
        else:  # cancelled by another client of the same run: cannot happen without Ctrl-C
            log("interrupted", scan=scan.name, **where)
        show.finished(scan.name, count)

    def _cancel(self, client, flag, todo, futures, outcome, log, distributed) -> None:
        """Ctrl-C: stop the running scans (the Event), drop the queued ones, wait a little."""
        pending = [f for f in futures if not f.done()]
        try:
            flag.set()
            distributed.wait(pending, timeout=CANCEL_GRACE_S)
        except BaseException:  # noqa: BLE001 - a second Ctrl-C or the timeout: stop waiting
            pass
        for future in pending:
            scan = futures[future]
            if future.status == "finished":
                res = future.result()
                if res.get("status") == "done":  # finished writing before it saw the flag: a complete result
                    outcome.done.append(scan.name)
                    outcome.attempted.add(scan.name)
                    log("done", scan=scan.name, input=str(scan.path), seconds=res["seconds"], missing=res["missing"])
        try:
            client.cancel([f for f in pending if not f.done()], force=True)
        except Exception:  # noqa: BLE001 - the cluster is shut down next anyway
            pass
        finished = outcome.done + [f["scan"] for f in outcome.failed]
        log("interrupted", scans=[scan.name for scan, _ in todo if scan.name not in finished])


# ---------------------------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------------------------


def slurm_cluster_options(*, threads: int, partition: str | None = None, time_limit: str | None = None,
                          mem: str | None = None, gpus: str | None = None, log_directory: str | None = None) -> dict:
    """Keyword arguments for ``dask_jobqueue.SLURMCluster``: one worker per job running one scan at a
    time (``cores=1``) with ``threads`` CPUs booked (``job_cpu``). Values are checked here with
    sbatch's own syntax so that a typo fails now rather than in the queue."""
    if partition is not None and not _SLURM_PARTITION.match(partition):
        raise BasalSegError(f"--partition {partition!r}: not a SLURM partition name")
    if time_limit is not None and not _SLURM_TIME.match(time_limit):
        raise BasalSegError(f"--time {time_limit!r}: give minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    if mem is not None and not _SLURM_MEM.match(mem.upper()):
        raise BasalSegError(f"--mem {mem!r}: give a size such as 16G or 8000M")
    if gpus is not None and not _SLURM_GPUS.match(gpus):
        raise BasalSegError(f"--gpus {gpus!r}: give a count (1) or TYPE:COUNT (a100:1)")
    mem = (mem or "8G").upper()
    # memory: the worker's own limit (Dask pauses/restarts a worker above it); job_mem: sbatch --mem
    options = {"cores": 1, "processes": 1, "job_cpu": int(threads), "memory": mem, "job_mem": mem, "name": "basalseg",
               "job_extra_directives": [], "silence_logs": "error"}
    if partition:
        options["queue"] = partition
    if time_limit:
        options["walltime"] = time_limit
    if gpus:
        options["job_extra_directives"].append(f"--gpus={gpus}")
    if log_directory:
        options["log_directory"] = log_directory
    return options


def make_slurm_cluster(options: dict):
    """A ``dask_jobqueue.SLURMCluster`` (no job submitted until it is scaled)."""
    _distributed()
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise BasalSegError(f"--executor slurm needs dask-jobqueue, which is not installed; install it with: "
                            f"{INSTALL_HINT}") from None
    return SLURMCluster(**options)


def make_executor(executor: str, config, out_dir: str | os.PathLike, *, workers: int | None = None,
                  threads: int | None = None, scheduler: str | None = None, partition: str | None = None,
                  time_limit: str | None = None, mem: str | None = None,
                  gpus: str | None = None) -> DaskExecutor | None:
    """The executor that runs a batch's scans (None for ``"local"``: one after the other in this process).

    Args:
        executor: one of :data:`EXECUTORS`.
        config: the :class:`~basalseg.pipeline.PipelineConfig` every worker builds its pipeline from.
        out_dir: the batch's output folder (SLURM job logs go to ``out_dir/.slurm-logs``).
        workers: dask: worker processes on this machine (default: cores // 4); slurm: jobs (default 4).
        threads: CPU threads per worker (default: planned from the cores for dask, 4 for slurm).
        scheduler: dask: the address of a running scheduler instead of starting workers here.
        partition, time_limit, mem, gpus: slurm: per-job resources (:func:`slurm_cluster_options`).
    """
    if executor not in EXECUTORS:
        raise BasalSegError(f"executor {executor!r}: choose from {', '.join(EXECUTORS)}")
    if executor == "local":
        return None
    _distributed()
    if executor == "dask":
        if not scheduler:
            _, threads, _ = plan_threads(workers, threads, _cores())
        return DaskExecutor(PipelineFactory(_with_threads(config, threads)), workers=workers, threads=threads,
                            scheduler=scheduler, name="dask")
    threads = threads or 4
    options = slurm_cluster_options(threads=threads, partition=partition, time_limit=time_limit, mem=mem,
                                    gpus=gpus, log_directory=str(Path(out_dir) / ".slurm-logs"))
    factory = PipelineFactory(_with_threads(config, threads))

    def cluster(workers, threads_):
        c = make_slurm_cluster(options)
        # adapt with min = max: keeps `workers` jobs, resubmitting one that ends (its --time, preemption)
        c.adapt(minimum_jobs=workers, maximum_jobs=workers)
        return c

    return DaskExecutor(factory, workers=workers or 4, threads=threads, cluster=cluster, name="slurm")


def slurm_job_script(out_dir: str | os.PathLike, *, threads: int | None = None, partition: str | None = None,
                     time_limit: str | None = None, mem: str | None = None, gpus: str | None = None) -> str:
    """The job script SLURMCluster would submit for these resources (``--print-job-script``)."""
    options = slurm_cluster_options(threads=threads or 4, partition=partition, time_limit=time_limit, mem=mem,
                                    gpus=gpus, log_directory=str(Path(out_dir) / ".slurm-logs"))
    cluster = make_slurm_cluster(options)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def _with_threads(config, threads):
    import dataclasses

    return dataclasses.replace(config, threads=threads) if threads else config
