"""``basalseg segment`` with a slice-mask cache kept on disk between runs (child-process side).

The Slicer module runs every job in a fresh child process, so the foundation model's per-slice
masks (``basalseg.foundation.runner.SliceMaskCache``) would be lost between two clicks on
Segment. This command is ``basalseg segment`` plus ``--cache FILE``: it loads the masks of the
previous run, reruns the foundation model only for slices whose prompts changed, and saves the
cache again after a successful run. Everything else (arguments, outputs, JSON progress, exit
status, errors) is the ``basalseg segment`` command's own: :func:`main` runs
:func:`basalseg.commands.segment.run` through :func:`basalseg.commands.run_command` and adds only
the cache (:class:`DiskCache`)::

    python -m BasalSegSAMLib.segmentworker IMAGE --out DIR --cache FILE [basalseg segment options]

Before the ``done`` event it writes one extra JSON line::

    {"event": "cache", "slices": 31, "reused": 29, "computed": 2}

A cache is only reused for the same image (voxels and affine), foundation backend, checkpoint
and crop setting (see :func:`cacheKey`); otherwise it starts empty. The file is an ``.npz``
(no pickle): one JSON ``meta`` entry plus one boolean array per slice and structure.

Imports no Slicer or Qt; runs with any Python that has the pipeline's dependencies.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

__all__ = ["main", "DiskCache", "cacheKey", "loadCache", "saveCache", "CACHE_FORMAT"]

CACHE_FORMAT = "basalseg-slice-mask-cache/1"
log = logging.getLogger("basalseg")


def cacheKey(volume, foundation: str, checkpoint: str | None, crop: bool) -> dict:
    """What cached masks depend on besides the prompts (which each entry's signature covers)."""
    digest = hashlib.sha1()
    digest.update(np.ascontiguousarray(volume.data, dtype=np.float32).tobytes())
    digest.update(np.asarray(volume.affine, dtype=np.float64).round(6).tobytes())
    digest.update(repr(tuple(volume.shape)).encode())
    return {"format": CACHE_FORMAT, "image": digest.hexdigest(), "foundation": foundation,
            "checkpoint": checkpoint or "", "crop": bool(crop)}


def loadCache(path: str | os.PathLike, key: dict):
    """The cache saved at ``path`` when it was made for ``key``, else an empty one (never raises
    for a missing, stale or unreadable file: the masks are simply recomputed)."""
    from basalseg.foundation.runner import SliceMaskCache

    cache = SliceMaskCache()
    path = Path(path)
    if not path.is_file():
        return cache
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("key") != key:
                log.info("slice-mask cache %s was made for another image or backend; starting afresh", path)
                return cache
            for entry in meta["entries"]:
                masks = {item["structure"]: (int(item["x0"]), int(item["y0"]), np.array(data[item["array"]], dtype=bool))
                         for item in entry["masks"]}
                cache.entries[int(entry["slice"])] = (str(entry["signature"]), str(entry["backend"]), masks)
    except Exception as exc:  # a damaged cache only costs time
        log.warning("ignoring unreadable slice-mask cache %s (%s)", path, exc)
        return SliceMaskCache()
    return cache


def saveCache(path: str | os.PathLike, cache, key: dict) -> None:
    """Write the cache atomically (temporary file, then rename)."""
    from basalseg.outputs import atomic_write_bytes

    arrays: dict[str, np.ndarray] = {}
    entries = []
    for k, (signature, backend, masks) in sorted(cache.entries.items()):
        items = []
        for structure, (x0, y0, mask) in sorted(masks.items()):
            name = f"m{len(arrays)}"
            arrays[name] = np.asarray(mask, dtype=bool)
            items.append({"structure": structure, "x0": int(x0), "y0": int(y0), "array": name})
        entries.append({"slice": int(k), "signature": signature, "backend": backend, "masks": items})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, meta=np.array(json.dumps({"key": key, "entries": entries})), **arrays)
    atomic_write_bytes(path, buffer.getvalue())


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
        try:
            saveCache(self.path, self.cache, self.key)
        except Exception as exc:  # the result is written; a cache that cannot be saved only costs time
            log.warning("could not save the slice-mask cache %s (%s)", self.path, exc)
        if mode == "json":
            emit_json(event="cache", slices=len(slices), reused=reused, computed=len(slices) - reused)
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
