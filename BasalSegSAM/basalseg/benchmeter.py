"""What ``basalseg bench`` measures with: :class:`StageMeter` (wall time, CPU time and the
resident-set high-water mark of a stage: ``VmHWM`` reset through ``/proc/self/clear_refs``, else
the process-wide ``ru_maxrss``; optionally the Python heap peak and torch's CUDA peak) and
:class:`TimedBackend` (a foundation backend wrapper that splits the foundation stage into encoder
and decoder time; :class:`TimedBatchedBackend` for batched backends, chosen by
:func:`timed_backend`).
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
import tracemalloc

__all__ = ["StageMeter", "TimedBackend", "TimedBatchedBackend", "timed_backend"]


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


def _vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            match = re.search(r"VmHWM:\s+(\d+)\s+kB", handle.read())
        return int(match.group(1)) if match else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_kib() -> int:
    import resource  # POSIX only: imported here so the CLI parser loads on Windows

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss // 1024) if sys.platform == "darwin" else int(rss)


class StageMeter:
    """Peak memory and CPU time per stage: call :meth:`mark` (or pass :meth:`progress` as a pipeline
    progress callback) whenever a stage ends; the peak and the process CPU time since the previous
    mark are charged to that stage.

    Args:
        device: torch device of the run (CUDA peaks are read from torch).
        python_heap: also trace the Python/numpy heap (``tracemalloc``; slows Python code a little).
    """

    def __init__(self, device=None, python_heap: bool = False):
        import torch

        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.peaks: dict[str, dict[str, float]] = {}
        self.resettable = _reset_hwm() and _vm_hwm_kib() is not None
        self.python_heap = python_heap
        if python_heap and not tracemalloc.is_tracing():
            tracemalloc.start()
        self._reset()

    def _reset(self) -> None:
        self._cpu0 = time.process_time()
        if self.resettable:
            _reset_hwm()
        if self.python_heap:
            tracemalloc.reset_peak()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def mark(self, stage: str) -> None:
        """Charge the peak since the last mark to ``stage`` (max over repeated marks) and reset."""
        rss = (_vm_hwm_kib() if self.resettable else _ru_maxrss_kib()) or 0
        entry = self.peaks.setdefault(stage, {})
        entry["cpu_s"] = entry.get("cpu_s", 0.0) + time.process_time() - self._cpu0
        entry["rss_mb"] = max(entry.get("rss_mb", 0.0), rss / 1024.0)
        if self.python_heap:
            entry["python_mb"] = max(entry.get("python_mb", 0.0), tracemalloc.get_traced_memory()[1] / 2**20)
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            entry["cuda_mb"] = max(entry.get("cuda_mb", 0.0), torch.cuda.max_memory_allocated() / 2**20)
        self._reset()

    def progress(self, stage: str, fraction: float) -> None:
        self.mark(stage)

    @contextlib.contextmanager
    def section(self, stage: str):
        self._reset()
        try:
            yield
        finally:
            self.mark(stage)

    def close(self) -> None:
        if self.python_heap and tracemalloc.is_tracing():
            tracemalloc.stop()


class TimedBackend:
    """Wraps a foundation backend; adds up encoder (``set_image``) and decoder (``predict``) wall
    time, passes and boxes. Same ``name``, so slice caches and students see the wrapped backend.
    :func:`timed_backend` picks :class:`TimedBatchedBackend` for a batched one."""

    def __init__(self, inner):
        import torch

        self.inner = inner
        self.name = inner.name
        self.native_size = inner.native_size
        self._cuda = getattr(getattr(inner, "device", None), "type", "cpu") == "cuda"
        self._sync = torch.cuda.synchronize if self._cuda else (lambda: None)
        self.encoder_s = self.decoder_s = self.encoder_cpu_s = self.decoder_cpu_s = 0.0
        self.encoder_passes = self.decoder_calls = self.boxes = 0

    def reset(self) -> None:
        self.encoder_s = self.decoder_s = self.encoder_cpu_s = self.decoder_cpu_s = 0.0
        self.encoder_passes = self.decoder_calls = self.boxes = 0

    def _timed(self, kind: str, fn, *args):
        self._sync()
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args)
        self._sync()
        dt, dc = time.perf_counter() - t, time.process_time() - c
        if kind == "encoder":
            self.encoder_s += dt
            self.encoder_cpu_s += dc
        else:
            self.decoder_s += dt
            self.decoder_cpu_s += dc
        return out

    def set_image(self, image):
        self.encoder_passes += 1
        return self._timed("encoder", self.inner.set_image, image)

    def predict(self, boxes, points=None, point_labels=None):
        self.decoder_calls += 1
        self.boxes += len(boxes)
        return self._timed("decoder", self.inner.predict, boxes, points, point_labels)

    def describe(self) -> dict:
        return self.inner.describe()


class TimedBatchedBackend(TimedBackend):
    """:class:`TimedBackend` of a :class:`~basalseg.foundation.base.BatchedFoundationBackend`:
    ``encode`` and ``predict_on`` are timed too (and the runner batches through them)."""

    def encode(self, images):
        self.encoder_passes += len(images)
        return self._timed("encoder", self.inner.encode, images)

    def predict_on(self, embedding, boxes, points=None, point_labels=None):
        self.decoder_calls += 1
        self.boxes += len(boxes)
        return self._timed("decoder", self.inner.predict_on, embedding, boxes, points, point_labels)


def timed_backend(inner) -> TimedBackend:
    """The timer of ``inner``: batched (:class:`TimedBatchedBackend`) when ``inner`` is a
    :class:`~basalseg.foundation.base.BatchedFoundationBackend`, else :class:`TimedBackend`."""
    from .foundation.base import BatchedFoundationBackend

    return TimedBatchedBackend(inner) if isinstance(inner, BatchedFoundationBackend) else TimedBackend(inner)
