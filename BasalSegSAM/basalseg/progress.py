"""Progress reporting for long runs: a terminal bar, JSON lines for a parent process, or nothing.

JSON-lines mode (``--progress json``) is what the Slicer module's background runner reads: one
object per line on standard output::

    {"event": "progress", "stage": "foundation", "fraction": 0.42, "overall": 0.31}
    {"event": "done", "out": "/path/to/out"}
    {"event": "error", "message": "...", "kind": "InputImageError"}

A batch (:class:`BatchProgress`) adds ``"scan"`` to its progress lines (``overall`` is then the
fraction of the batch) and one line per scan event::

    {"event": "scan", "scan": "sub-01", "index": 0, "total": 8, "status": "start" | "done" | "failed", ...}
"""

from __future__ import annotations

import json
import sys
import time

__all__ = ["STAGE_WEIGHTS", "make_reporter", "JsonReporter", "BarReporter", "BatchProgress", "emit_json"]

#: share of the whole run each stage takes (rough CPU proportions), for the overall fraction.
STAGE_WEIGHTS = {"prepare": 0.04, "prompter": 0.08, "foundation": 0.68, "sdm": 0.04, "student": 0.12, "resample": 0.04}
_ORDER = list(STAGE_WEIGHTS)


def _overall_fraction(stage: str, fraction: float) -> float:
    if stage not in STAGE_WEIGHTS:
        return 0.0
    before = sum(STAGE_WEIGHTS[s] for s in _ORDER[: _ORDER.index(stage)])
    return min(1.0, before + STAGE_WEIGHTS[stage] * max(0.0, min(1.0, fraction)))


def emit_json(stream=None, **fields) -> None:
    stream = stream or sys.stdout
    stream.write(json.dumps(fields) + "\n")
    stream.flush()


class JsonReporter:
    """Writes JSON progress lines (at most one per 0.2 s, always the stage ends).

    Args:
        stream: where (default standard output).
        scan, index, total: in a batch, the scan's name and position: its lines carry ``scan`` and
            ``overall`` is ``(index + the scan's fraction) / total``.
    """

    def __init__(self, stream=None, scan: str | None = None, index: int = 0, total: int = 1):
        self.stream = stream or sys.stdout
        self.scan, self.index, self.total = scan, index, max(1, total)
        self._last = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        if fraction not in (0.0, 1.0) and now - self._last < 0.2:
            return
        self._last = now
        where = {"scan": self.scan} if self.scan is not None else {}
        emit_json(self.stream, event="progress", **where, stage=stage, fraction=round(float(fraction), 4),
                  overall=round((self.index + _overall_fraction(stage, fraction)) / self.total, 4))


class BarReporter:
    """A tqdm bar on standard error, advancing through the stages."""

    def __init__(self, desc: str = "segment"):
        from tqdm import tqdm

        self.bar = tqdm(total=100, desc=desc, unit="%", file=sys.stderr, leave=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        self.desc = desc

    def __call__(self, stage: str, fraction: float) -> None:
        target = int(round(_overall_fraction(stage, fraction) * 100))
        self.bar.set_description(f"{self.desc} ({stage})", refresh=False)
        if target > self.bar.n:
            self.bar.update(target - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def make_reporter(mode: str, desc: str = "segment"):
    """``"bar"``, ``"json"`` or ``"none"``; returns ``(callback, close)``."""
    if mode == "json":
        return JsonReporter(), lambda: None
    if mode == "bar":
        bar = BarReporter(desc)
        return bar, bar.close
    return (lambda stage, fraction: None), lambda: None


class BatchProgress:
    """What a batch shows while it runs (the serial loop and the Dask/SLURM executors alike).

    ``mode`` ``"bar"``: a tqdm bar of scans on standard error (opened by :meth:`open`; lines are
    written above it); ``"json"``: JSON lines (module docstring); ``"none"``: per-scan lines
    through ``echo`` (default: print).
    """

    def __init__(self, mode: str, total: int, echo=None):
        self.mode, self.total = mode, total
        self.echo = echo or (lambda text: print(text, flush=True))
        self.bar = None

    def open(self) -> None:
        """Start the bar (``"bar"`` mode, once there is work)."""
        if self.mode == "bar" and self.total and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="batch", unit="scan", file=sys.stderr, dynamic_ncols=True,
                            mininterval=0.5, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} scans"
                                                        "{postfix} [{elapsed}<{remaining}]")

    def say(self, text: str) -> None:
        """A line for the user (above the bar; not in JSON mode)."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.mode != "json":
            self.echo(text)

    def _event(self, scan: str, index: int, status: str, **fields) -> None:
        if self.mode == "json":
            emit_json(event="scan", scan=scan, index=index, total=self.total, status=status, **fields)

    def _show(self, scan: str, position: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(scan, refresh=False)
            if position > self.bar.n:
                self.bar.update(position - self.bar.n)  # tqdm throttles the redraws (mininterval)

    def started(self, scan: str, index: int):
        """Scan ``index`` (0-based) begins; returns its ``progress(stage, fraction)`` callback."""
        self._show(scan, index)
        self._event(scan, index, "start")
        if self.mode == "json":
            return JsonReporter(scan=scan, index=index, total=self.total)

        def on_progress(stage: str, fraction: float) -> None:
            self._show(scan, index + _overall_fraction(stage, fraction))

        return on_progress

    def done(self, scan: str, index: int, seconds: float, missing=()) -> None:
        self.say(f"[{index + 1}/{self.total}] {scan}: done in {seconds:.1f} s"
                 + (f" (not found: {', '.join(missing)})" if missing else ""))
        self._event(scan, index, "done", seconds=seconds)

    def failed(self, scan: str, index: int, message: str, kind: str) -> None:
        self.say(f"[{index + 1}/{self.total}] {scan}: FAILED: {message}")
        self._event(scan, index, "failed", message=message, kind=kind)

    def finished(self, scan: str, count: int) -> None:
        """``count`` scans are over (an executor's scans finish in any order)."""
        self._show(scan, count)
        if self.bar is None and self.mode == "json":
            emit_json(event="progress", scan=scan, overall=round(count / max(1, self.total), 4))

    def close(self, complete: bool = True) -> None:
        """Close the bar (filled when ``complete``)."""
        if self.bar is not None:
            if complete and self.bar.n < self.total:
                self.bar.update(self.total - self.bar.n)
            self.bar.close()
            self.bar = None
