"""Run a command as a killable child process and read its JSON-lines progress.

The child (``python -m basalseg ... --progress json``) writes one JSON object per line on
standard output (see ``basalseg.progress``)::

    {"event": "progress", "stage": "foundation", "fraction": 0.42, "overall": 0.31}
    {"event": "done", "out": "/tmp/.../out"}
    {"event": "error", "message": "...", "kind": "InputImageError"}

How it works:

* The child starts in its **own process group / session** (``start_new_session`` on POSIX,
  ``CREATE_NEW_PROCESS_GROUP`` on Windows), so :meth:`ProcessRunner.cancel` can end the whole
  tree: SIGTERM to the group, then SIGKILL to the group after ``terminateTimeout`` seconds
  (Windows: ``taskkill /T /F``).
* Two reader threads move standard output lines into a queue and keep the last lines of
  standard error; neither pipe can fill up and block the child.
* :meth:`ProcessRunner.poll` never blocks: it drains the queue, parses the events, and notices
  when the child has exited. In Slicer a ``QTimer`` calls it; :meth:`ProcessRunner.wait` loops on it
  for scripts and tests.
* The process launcher is injected (``launcher(command, cwd, env) -> Popen-like``), so tests
  can pass their own, and the logic never depends on Qt.

Only the standard library is imported.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

__all__ = [
    "RunnerEvent",
    "ProcessRunner",
    "pollUntilFinished",
    "PopenLike",
    "defaultLauncher",
    "killProcessTree",
    "signalTree",
    "parseLine",
    "IDLE",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
]

log = logging.getLogger("BasalSegSAM")

IDLE, RUNNING, SUCCEEDED, FAILED, CANCELLED = "idle", "running", "succeeded", "failed", "cancelled"
_FINAL = (SUCCEEDED, FAILED, CANCELLED)
_EOF = object()


class PopenLike(Protocol):
    """What the runner needs from a launched process (``subprocess.Popen`` fits)."""

    pid: int
    stdout: object
    stderr: object

    def poll(self) -> Optional[int]: ...

    def wait(self, timeout: Optional[float] = None) -> int: ...


Launcher = Callable[[Sequence[str], Optional[str], Optional[dict]], PopenLike]


@dataclass
class RunnerEvent:
    """One thing that happened to the child.

    Attributes:
        kind: ``"progress"``, ``"done"``, ``"error"`` or any other ``event`` the child wrote
            (e.g. ``"cache"``); ``"log"`` for a non-JSON standard-output line; ``"finished"``
            once, when the run is over (``data["state"]`` is the final state).
        data: the parsed JSON object (``{"line": ...}`` for ``"log"``).
    """

    kind: str
    data: dict = field(default_factory=dict)


def parseLine(line: str) -> RunnerEvent:
    """Turn one standard-output line into an event (non-JSON lines become ``"log"`` events)."""
    text = line.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("event"), str):
            return RunnerEvent(obj["event"], obj)
    return RunnerEvent("log", {"line": text})


#: Windows process-creation flag that keeps a console window from appearing (value from the Win32 API).
CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)


def defaultLauncher(command: Sequence[str], cwd: Optional[str] = None, env: Optional[dict] = None) -> subprocess.Popen:
    """Start ``command`` with piped, line-buffered UTF-8 output in a new process group."""
    kwargs: dict = {}
    if sys.platform == "win32":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW
    else:
        kwargs["start_new_session"] = True
    return subprocess.Popen(
        list(command), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
    )


def _groupAlive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (cannot happen for our own group)
        return True
    return True


def signalTree(process: PopenLike, sig: int) -> None:
    """Send ``sig`` to the child's whole process group (POSIX); on Windows any ``sig`` means
    ``taskkill /T /F`` (the tree is forced at once)."""
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True,
                       creationflags=CREATE_NO_WINDOW)  # no console window flashes up
        return
    try:
        os.killpg(process.pid, sig)  # new session: the child leads its own group
    except (ProcessLookupError, PermissionError):
        pass


def killProcessTree(process: PopenLike, terminateTimeout: float = 5.0) -> None:
    """End ``process`` and everything it started, blocking until it is gone.

    POSIX: SIGTERM to the process group (the child started it with ``start_new_session``), wait
    up to ``terminateTimeout`` seconds for the group to empty, then SIGKILL to the group (which also
    ends grandchildren that outlived their parent). Windows: ``taskkill /T /F``.
    """
    signalTree(process, signal.SIGTERM)
    deadline = time.monotonic() + max(0.0, terminateTimeout)
    while time.monotonic() < deadline:
        if process.poll() is not None and (sys.platform == "win32" or not _groupAlive(process.pid)):
            return
        time.sleep(0.05)
    signalTree(process, getattr(signal, "SIGKILL", signal.SIGTERM))
    try:
        process.wait(timeout=5.0)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
        log.error("process %s did not exit after SIGKILL", process.pid)


class ProcessRunner:
    """One child process, its progress and its end.

    Args:
        launcher: starts the command (default :func:`defaultLauncher`); inject another in tests.
        terminateTimeout: seconds between SIGTERM and SIGKILL on :meth:`cancel`.
        stderrLines: how many of the last standard-error lines to keep for error messages.

    Attributes:
        state: ``idle``, ``running``, ``succeeded``, ``failed`` or ``cancelled``.
        stage, fraction, overall: the last progress event (``overall`` in 0..1 over all stages).
        errorMessage: why the run failed (the child's ``error`` event, else its exit status and
            last standard-error line); empty otherwise.
        doneData: the child's ``done`` event.
        returnCode: the child's exit status once it ended.
        logLines: non-JSON standard-output lines (kept, bounded).
    """

    def __init__(self, launcher: Optional[Launcher] = None, terminateTimeout: float = 5.0, stderrLines: int = 200):
        self.launcher = launcher or defaultLauncher
        self.terminateTimeout = float(terminateTimeout)
        self.state = IDLE
        self.stage = ""
        self.fraction = 0.0
        self.overall = 0.0
        self.errorMessage = ""
        self.doneData: dict = {}
        self.returnCode: Optional[int] = None
        self.events: list[RunnerEvent] = []
        self.logLines: collections.deque = collections.deque(maxlen=500)
        self.stderrTail: collections.deque = collections.deque(maxlen=stderrLines)
        self.command: list[str] = []
        self._process: Optional[PopenLike] = None
        self._queue: "queue.Queue" = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._cancelRequested = False
        self._errorEvent: Optional[dict] = None
        self._stdoutClosed = False
        self._killDeadline: Optional[float] = None
        self._exitSeen: Optional[float] = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def pid(self) -> Optional[int]:
        return None if self._process is None else self._process.pid

    @property
    def finished(self) -> bool:
        return self.state in _FINAL

    def start(self, command: Sequence[str], cwd: Optional[str] = None, env: Optional[dict] = None) -> None:
        """Start the child. Raises ``RuntimeError`` when this runner was already started and
        ``OSError`` (with the command named) when the program cannot be started."""
        if self.state != IDLE:
            raise RuntimeError("a ProcessRunner runs one process; make a new one")
        self.command = [str(c) for c in command]
        try:
            self._process = self.launcher(self.command, cwd, env)
        except OSError as exc:
            self.state = FAILED
            self.errorMessage = f"cannot start {self.command[0]}: {exc}"
            raise OSError(self.errorMessage) from exc
        self.state = RUNNING
        log.info("started pid %s: %s", self._process.pid, " ".join(self.command))
        self._threads = [
            threading.Thread(target=self._readStdout, name="BasalSegSAM-stdout", daemon=True),
            threading.Thread(target=self._readStderr, name="BasalSegSAM-stderr", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _readStdout(self) -> None:
        stream = self._process.stdout
        try:
            for line in iter(stream.readline, ""):
                self._queue.put(line)
        except (OSError, ValueError):  # pipe closed under us while killing
            pass
        finally:
            self._queue.put(_EOF)

    def _readStderr(self) -> None:
        stream = self._process.stderr
        try:
            for line in iter(stream.readline, ""):
                line = line.rstrip()
                if line:
                    self.stderrTail.append(line)
        except (OSError, ValueError):
            pass

    def poll(self) -> list[RunnerEvent]:
        """Events since the last call (never blocks). The last event of a run is ``"finished"``.

        After :meth:`cancel`, it also sends SIGKILL to the process group once ``terminateTimeout``
        seconds have passed without the group ending.
        """
        if self.state != RUNNING:
            return []
        out: list[RunnerEvent] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _EOF:
                self._stdoutClosed = True
                continue
            event = parseLine(item)
            self._apply(event)
            out.append(event)
        now = time.monotonic()
        exited = self._process.poll() is not None
        if self._cancelRequested and self._killDeadline is not None and now >= self._killDeadline:
            if not exited or (sys.platform != "win32" and _groupAlive(self._process.pid)):
                log.info("pid %s: no exit %.1f s after SIGTERM, sending SIGKILL", self._process.pid, self.terminateTimeout)
                signalTree(self._process, getattr(signal, "SIGKILL", signal.SIGTERM))
            self._killDeadline = None
        if exited and self._exitSeen is None:
            self._exitSeen = now
        # Finish when the child exited and its output is read; do not wait forever for EOF when a
        # grandchild kept the pipe open after the child ended.
        if exited and (self._stdoutClosed or now - self._exitSeen > 2.0):
            out.append(self._finish())
        self.events.extend(out)
        return out

    def _apply(self, event: RunnerEvent) -> None:
        if event.kind == "progress":
            self.stage = str(event.data.get("stage", self.stage))
            self.fraction = _unit(event.data.get("fraction", self.fraction))
            self.overall = max(self.overall, _unit(event.data.get("overall", self.overall)))
        elif event.kind == "done":
            self.doneData = dict(event.data)
            self.overall = 1.0
        elif event.kind == "error":
            self._errorEvent = dict(event.data)
        elif event.kind == "log":
            self.logLines.append(event.data.get("line", ""))

    def _finish(self) -> RunnerEvent:
        for thread in self._threads:
            thread.join(timeout=1.0)
        self.returnCode = self._process.poll()
        if self._cancelRequested:
            signalTree(self._process, getattr(signal, "SIGKILL", signal.SIGTERM))  # leftovers of the group
            self.state = CANCELLED
            self.errorMessage = ""
        elif self.returnCode == 0 and self._errorEvent is None and self.doneData:
            self.state = SUCCEEDED
        else:
            self.state = FAILED
            self.errorMessage = self._failureMessage()
        log.info("pid %s ended: %s (exit status %s)", self._process.pid, self.state, self.returnCode)
        return RunnerEvent("finished", {"state": self.state, "returnCode": self.returnCode, "message": self.errorMessage})

    def _failureMessage(self) -> str:
        if self._errorEvent is not None:
            return str(self._errorEvent.get("message") or self._errorEvent.get("kind") or "the process reported an error")
        lastErr = next((line for line in reversed(self.stderrTail) if line.strip()), "")
        if self.returnCode == 0:
            return "the process ended without reporting a result" + (f" ({lastErr})" if lastErr else "")
        status = f"exit status {self.returnCode}"
        if self.returnCode is not None and self.returnCode < 0:
            try:
                status = f"killed by signal {signal.Signals(-self.returnCode).name}"
            except ValueError:
                pass
        return f"the process failed ({status})" + (f": {lastErr}" if lastErr else "")

    def cancel(self, wait: bool = False) -> None:
        """Stop the child and everything it started; the run then ends in state ``cancelled``.

        Sends SIGTERM to the process group now (the ``basalseg`` command exits cleanly on it) and
        SIGKILL ``terminateTimeout`` seconds later if the group is still there (from :meth:`poll`,
        so a GUI never blocks). With ``wait=True`` it blocks until the run is over. Does nothing
        when the run is not running.
        """
        if self.state != RUNNING or self._process is None:
            return
        if not self._cancelRequested:
            self._cancelRequested = True
            self._killDeadline = time.monotonic() + self.terminateTimeout
            signalTree(self._process, signal.SIGTERM)
        if wait:
            self.wait()

    def wait(self, timeout: Optional[float] = None, pollInterval: float = 0.05,
             onEvent: Optional[Callable[[RunnerEvent], None]] = None) -> str:
        """Poll until the run is over (or ``timeout`` seconds passed); return the state."""
        return pollUntilFinished(self, timeout, pollInterval, onEvent)

    def details(self) -> str:
        """The command and the last standard-error lines (for an error dialog's details)."""
        lines = ["command: " + " ".join(self.command)]
        if self.returnCode is not None:
            lines.append(f"exit status: {self.returnCode}")
        if self.stderrTail:
            lines.append("standard error (last lines):")
            lines.extend(list(self.stderrTail)[-40:])
        return "\n".join(lines)


def _unit(value) -> float:
    try:
        return min(1.0, max(0.0, float(value)))
    except (TypeError, ValueError):
        return 0.0


def pollUntilFinished(job, timeout: Optional[float] = None, pollInterval: float = 0.05,
                      onEvent: Optional[Callable[[RunnerEvent], None]] = None) -> str:
    """Call ``job.poll()`` (a :class:`ProcessRunner` or anything with ``poll``, ``finished`` and
    ``state``) until ``job.finished`` or ``timeout`` seconds; hand every event to ``onEvent``;
    return ``job.state``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not job.finished:
        for event in job.poll():
            if onEvent is not None:
                onEvent(event)
        if job.finished or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(pollInterval)
    return job.state
