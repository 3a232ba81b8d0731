"""The background process runner with real child processes (no Qt, no MRML)."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import time

import pytest

from test_slicer_helpers import pid_alive

from BasalSegSAMLib.processrunner import (  # noqa: E402
    CANCELLED, FAILED, RUNNING, SUCCEEDED, ProcessRunner, defaultLauncher, parseLine,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process-group tests use POSIX signals")

CHILD = textwrap.dedent(
    r'''
    import json, os, signal, subprocess, sys, time

    def emit(**fields):
        print(json.dumps(fields), flush=True)

    mode = sys.argv[1]
    if mode == "ok":
        print("a plain log line", flush=True)
        for n in range(5):
            emit(event="progress", stage="foundation", fraction=n / 4, overall=0.1 + 0.2 * n)
            time.sleep(0.02)
        print("warming up", file=sys.stderr, flush=True)
        emit(event="done", out=sys.argv[2])
    elif mode == "error":
        emit(event="progress", stage="prepare", fraction=1.0, overall=0.04)
        print("basalseg: error: input.nii.gz: constant volume", file=sys.stderr, flush=True)
        emit(event="error", message="input.nii.gz: the image is constant (all voxels 0)", kind="InputImageError")
        sys.exit(2)
    elif mode == "crash":
        print("Traceback (most recent call last):", file=sys.stderr)
        print("ZeroDivisionError: division by zero", file=sys.stderr, flush=True)
        sys.exit(1)
    elif mode == "silent-ok":
        sys.exit(0)
    elif mode in ("hang", "stubborn"):
        if mode == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        grandchild = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
        emit(event="child", pid=grandchild.pid)
        emit(event="progress", stage="foundation", fraction=0.5, overall=0.4)
        time.sleep(120)
    elif mode == "flood":
        for n in range(20000):
            print("x" * 100, file=sys.stderr)
        emit(event="done", out="flood")
    '''
)


@pytest.fixture
def child(tmp_path):
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return lambda *args: [sys.executable, str(path), *map(str, args)]


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_parse_line():
    assert parseLine('{"event": "progress", "stage": "sdm", "fraction": 1.0}').kind == "progress"
    assert parseLine("not json").kind == "log"
    assert parseLine('{"no": "event"}').kind == "log"
    assert parseLine("{broken").data == {"line": "{broken"}


def test_progress_is_parsed_and_done_is_read(child):
    runner = ProcessRunner()
    runner.start(child("ok", "/results"))
    seen = []
    assert runner.wait(timeout=30, onEvent=seen.append) == SUCCEEDED
    kinds = [e.kind for e in seen]
    assert kinds.count("progress") == 5 and kinds[-2:] == ["done", "finished"] and "log" in kinds
    progress = [e.data["overall"] for e in seen if e.kind == "progress"]
    assert progress == sorted(progress) and progress[-1] == pytest.approx(0.9)
    assert runner.stage == "foundation" and runner.fraction == 1.0 and runner.overall == 1.0
    assert runner.doneData == {"event": "done", "out": "/results"}
    assert runner.returnCode == 0 and runner.errorMessage == ""
    assert "a plain log line" in runner.logLines and "warming up" in runner.stderrTail
    assert runner.poll() == []  # nothing after the end


def test_error_event_surfaces_its_message(child):
    runner = ProcessRunner()
    runner.start(child("error"))
    assert runner.wait(timeout=30) == FAILED
    assert runner.errorMessage == "input.nii.gz: the image is constant (all voxels 0)"
    assert runner.returnCode == 2
    assert "constant volume" in runner.details()


def test_a_crash_without_error_event_reports_exit_status_and_last_stderr_line(child):
    runner = ProcessRunner()
    runner.start(child("crash"))
    assert runner.wait(timeout=30) == FAILED
    assert runner.errorMessage == "the process failed (exit status 1): ZeroDivisionError: division by zero"


def test_exit_zero_without_done_is_a_failure(child):
    runner = ProcessRunner()
    runner.start(child("silent-ok"))
    assert runner.wait(timeout=30) == FAILED
    assert "without reporting a result" in runner.errorMessage


def test_a_full_stderr_pipe_does_not_block_the_child(child):
    runner = ProcessRunner()
    runner.start(child("flood"))
    assert runner.wait(timeout=30) == SUCCEEDED
    assert len(runner.stderrTail) == 200


def test_cancel_kills_the_child_and_its_own_child_within_seconds(child):
    runner = ProcessRunner(terminateTimeout=2.0)
    runner.start(child("hang"))
    events = []
    # the child reports its own child, then its progress: wait for both (the second line may come
    # a poll later than the first)
    assert _wait_for(lambda: {"child", "progress"} <= {e.kind for e in (events.extend(runner.poll()) or events)})
    grandchild = next(e.data["pid"] for e in events if e.kind == "child")
    assert pid_alive(runner.pid) and pid_alive(grandchild)
    assert runner.overall == pytest.approx(0.4)
    started = time.monotonic()
    runner.cancel()
    assert runner.wait(timeout=15) == CANCELLED
    assert time.monotonic() - started < 5.0
    assert runner.errorMessage == ""
    assert _wait_for(lambda: not pid_alive(grandchild), 5.0), "the grandchild survived"
    assert not pid_alive(runner.pid)


def test_cancel_escalates_to_sigkill_when_sigterm_is_ignored(child):
    runner = ProcessRunner(terminateTimeout=1.0)
    runner.start(child("stubborn"))
    events = []
    assert _wait_for(lambda: any(e.kind == "child" for e in (events.extend(runner.poll()) or events)))
    grandchild = next(e.data["pid"] for e in events if e.kind == "child")
    started = time.monotonic()
    runner.cancel()  # returns at once: the GUI never blocks
    assert time.monotonic() - started < 0.5
    assert runner.state == RUNNING
    assert runner.wait(timeout=15) == CANCELLED
    assert 0.9 < time.monotonic() - started < 6.0
    assert runner.returnCode == -signal.SIGKILL
    assert _wait_for(lambda: not pid_alive(grandchild), 5.0)


def test_blocking_cancel_and_the_injected_launcher(child):
    launched = []

    def launcher(command, cwd, env):
        launched.append((list(command), cwd))
        return defaultLauncher(command, cwd, env)

    runner = ProcessRunner(launcher=launcher, terminateTimeout=2.0)
    runner.start(child("hang"), cwd="/")
    assert launched and launched[0][1] == "/"
    runner.cancel(wait=True)
    assert runner.state == CANCELLED
    with pytest.raises(RuntimeError):
        runner.start(child("ok", "x"))


def test_a_program_that_cannot_start_says_so(tmp_path):
    runner = ProcessRunner()
    with pytest.raises(OSError, match="cannot start"):
        runner.start([str(tmp_path / "no-such-program")])
    assert runner.state == FAILED and "no-such-program" in runner.errorMessage


def test_real_basalseg_cli_reports_a_bad_input_as_an_error_event(tmp_path):
    """The real ``basalseg prompts`` command, started the way the module starts it (bootstrap, no
    PYTHONPATH, another working folder), on an unreadable file."""
    import os

    from BasalSegSAMLib.jobs import defaultCommandPrefix

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    runner = ProcessRunner()
    runner.start(defaultCommandPrefix("prompts", sys.executable) + [str(bad), "--out", str(tmp_path / "out"), "--progress", "json"],
                 cwd=str(tmp_path), env=env)
    assert runner.wait(timeout=120) == FAILED
    assert "broken.nii.gz" in runner.errorMessage and "gzip" in runner.errorMessage
    assert runner.returnCode == 2
    assert not (tmp_path / "out").exists()
    json.dumps(runner.events[-1].data)  # the finished event is plain data
