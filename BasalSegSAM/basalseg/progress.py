"""Progress reporting for long runs: a terminal bar, JSON lines for a parent process, or nothing.

JSON-lines mode (``--progress json``) is what the Slicer module's background runner reads: one
object per line on standard output::

    {"event": "progress", "stage": "foundation", "fraction": 0.42, "overall": 0.31}
    {"event": "done", "out": "/path/to/out"}
    {"event": "error", "message": "...", "kind": "InputImageError"}
"""

from __future__ import annotations

import json
import sys
import time

__all__ = ["STAGE_WEIGHTS", "make_reporter", "JsonReporter", "BarReporter", "emit_json"]

#: share of the whole run each stage takes (rough CPU proportions), for the overall fraction.
STAGE_WEIGHTS = {"prepare": 0.04, "prompter": 0.08, "foundation": 0.68, "sdm": 0.04, "student": 0.12, "resample": 0.04}
_ORDER = list(STAGE_WEIGHTS)


def overall_fraction(stage: str, fraction: float) -> float:
    if stage not in STAGE_WEIGHTS:
        return 0.0
    before = sum(STAGE_WEIGHTS[s] for s in _ORDER[: _ORDER.index(stage)])
    return min(1.0, before + STAGE_WEIGHTS[stage] * max(0.0, min(1.0, fraction)))


def emit_json(stream=None, **fields) -> None:
    stream = stream or sys.stdout
    stream.write(json.dumps(fields) + "\n")
    stream.flush()


class JsonReporter:
    """Writes JSON progress lines (at most one per 0.2 s per stage, always the stage ends)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self._last = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        if fraction not in (0.0, 1.0) and now - self._last < 0.2:
            return
        self._last = now
        emit_json(self.stream, event="progress", stage=stage, fraction=round(float(fraction), 4),
                  overall=round(overall_fraction(stage, fraction), 4))


class BarReporter:
    """A tqdm bar on standard error, advancing through the stages."""

    def __init__(self, desc: str = "segment"):
        from tqdm import tqdm

        self.bar = tqdm(total=100, desc=desc, unit="%", file=sys.stderr, leave=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        self.desc = desc

    def __call__(self, stage: str, fraction: float) -> None:
        target = int(round(overall_fraction(stage, fraction) * 100))
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
