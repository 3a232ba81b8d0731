"""``basalseg segment`` with a slice-mask cache kept on disk between runs (child-process side).

The Slicer module runs every job in a fresh child process, so the foundation model's per-slice
masks (``basalseg.foundation.slice_cache.SliceMaskCache``) would be lost between two clicks on
Segment. This command is ``basalseg segment`` plus ``--cache FILE``: it loads the masks of the
previous run, reruns the foundation model only for slices whose prompts changed, and saves the
cache again after a successful run. Everything else (arguments, outputs, JSON progress, exit
status, errors) is the ``basalseg segment`` command's own: :func:`main` runs
:func:`basalseg.commands.segment.run` through :func:`basalseg.commands.run_command` and adds only
the cache (:class:`DiskCache`)::

    python -m BasalSegSAMLib.segmentworker IMAGE --out DIR --cache FILE [basalseg segment options]

Before the ``done`` event it writes one extra JSON line::

    {"event": "cache", "slices": 31, "reused": 29, "computed": 2, "saved": true}

A cache is only reused for the same image (voxels and affine), foundation backend, checkpoint
and crop setting (see :func:`cacheKey`); otherwise it starts empty. The file is an ``.npz``
(no pickle): one JSON ``meta`` entry plus one boolean array per slice and structure, for the
slices of every plane; :class:`basalseg.foundation.slice_cache.SliceMaskCache` owns the format
(``save``/``load``). A cache that cannot be written is reported on stderr, never silently.

Imports no Slicer or Qt; runs with any Python that has the pipeline's dependencies.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["main", "DiskCache", "cacheKey", "loadCache", "saveCache", "CACHE_FORMAT"]

log = logging.getLogger("basalseg")


def __getattr__(name: str):
    """``CACHE_FORMAT``: the cache file's format string, owned by
    :data:`basalseg.foundation.slice_cache.FORMAT` (read on first use: importing this module
    stays free of torch)."""
    if name == "CACHE_FORMAT":
        from basalseg.foundation.slice_cache import FORMAT

        return FORMAT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cacheKey(volume, foundation: str, checkpoint: str | None, crop: bool) -> dict:
    """What cached masks depend on besides the prompts (which each entry's signature covers):
    :meth:`basalseg.foundation.slice_cache.SliceMaskCache.file_key`."""
    from basalseg.foundation.slice_cache import SliceMaskCache

    return SliceMaskCache.file_key(volume, foundation, checkpoint, crop)


def loadCache(path: str | os.PathLike, key: dict):
    """The cache saved at ``path`` when it was made for ``key``, else an empty one (never raises
    for a missing, stale or unreadable file: the masks are simply recomputed);
    :meth:`~basalseg.foundation.slice_cache.SliceMaskCache.load`."""
    from basalseg.foundation.slice_cache import SliceMaskCache

    return SliceMaskCache.load(path, key)


def saveCache(path: str | os.PathLike, cache, key: dict) -> bool:
    """Write the cache atomically, entries of every plane
    (:meth:`~basalseg.foundation.slice_cache.SliceMaskCache.save`). A file that cannot be written
    only costs time on the next run: it is reported on stderr (``basalseg: warning: ...``) and
    False returned; anything else (a bug) raises."""
    from basalseg.errors import OutputWriteError

    try:
        cache.save(path, key)
    except OutputWriteError as exc:
        print(f"basalseg: warning: could not save the slice-mask cache {path} ({exc}); "
              "the next run recomputes every slice", file=sys.stderr)
        return False
    return True


def _split(argv: list[str]) -> tuple[str | None, list[str]]:
    cachePath, rest, n = None, [], 0
    while n < len(argv):
        if argv[n] == "--cache" and n + 1 < len(argv):
            cachePath = argv[n + 1]
            n += 2
            continue
        if argv[n].startswith("--cache="):
            cachePath = argv[n].split("=", 1)[1]
        else:
            rest.append(argv[n])
        n += 1
    return cachePath, rest


class DiskCache:
    """The slice-mask cache in a file (:class:`basalseg.commands.segment.SliceCacheStore`): loaded
    for the run's image and backend, saved after a successful run, its reuse reported."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self.key: dict | None = None
        self.cache = None
        self.before: dict = {}

    def open(self, volume, config):
        self.key = cacheKey(volume, config.foundation, config.checkpoint, config.crop)
        self.cache = loadCache(self.path, self.key)
        self.before = dict(self.cache.entries)
        return self.cache

    def close(self, result, mode: str) -> None:
        from basalseg.progress import emit_json

        slices = result.prompts.slices()
        reused = sum(1 for k in slices if k in self.before and self.before[k] is self.cache.entries.get(k))
        saved = saveCache(self.path, self.cache, self.key)  # a write failure is reported there
        if mode == "json":
            emit_json(event="cache", slices=len(slices), reused=reused, computed=len(slices) - reused, saved=saved)
        else:
            print(f"foundation masks reused for {reused} of {len(slices)} slices")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 success, 2 expected error, 130 cancelled, 1 bug),
    exactly as ``basalseg segment`` (:func:`basalseg.commands.run_command`)."""
    from basalseg.commands import build_parser, run_command
    from basalseg.commands import segment

    cachePath, rest = _split(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(["segment", *rest])
    store = DiskCache(cachePath) if cachePath else None
    return run_command(args, lambda a: segment.run(a, slice_cache=store))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
