"""``basalseg segment`` with a slice-mask cache kept on disk between runs (child-process side).

The Slicer module runs every job in a fresh child process, so the foundation model's per-slice
masks (``basalseg.foundation.slice_cache.SliceMaskCache``) would be lost between two clicks on
Segment. This command is ``basalseg segment`` plus ``--cache FILE``: it loads the masks of the
previous run, reruns the foundation model only for slices whose prompts changed, and saves the
cache again after a successful run. Everything else (arguments, outputs, JSON progress, exit
status, errors) is the ``basalseg segment`` command's own::

    python -m BasalSegSAMLib.segmentworker IMAGE --out DIR --cache FILE [basalseg segment options]

Before the ``done`` event it writes one extra JSON line::

    {"event": "cache", "slices": 31, "reused": 29, "computed": 2}

A cache is only reused for the same image (voxels and affine), foundation backend, checkpoint
and crop setting (see :func:`cacheKey`); otherwise it starts empty. The file is an ``.npz``
(no pickle): one JSON ``meta`` entry plus one boolean array per slice and structure, for the
slices of every plane; :class:`basalseg.foundation.slice_cache.SliceMaskCache` owns the format
(``save``/``load``). A cache that cannot be written is reported on stderr, never silently.

Imports no Slicer or Qt; runs with any Python that has the pipeline's dependencies.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

__all__ = ["main", "cacheKey", "loadCache", "saveCache", "CACHE_FORMAT"]

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


def _run(args: argparse.Namespace, cachePath: str | None) -> int:
    from basalseg.imageio import load_volume
    from basalseg.outputs import StagedOutputDir
    from basalseg.cli import _config
    from basalseg.pipeline import Pipeline
    from basalseg.progress import emit_json, make_reporter
    from basalseg.prompts import load_prompts
    from basalseg.results import write_result

    from basalseg.outputs import RESULT_FILES

    # refuse an occupied folder (or result files that are not ours) before any work
    StagedOutputDir(args.out, overwrite=args.overwrite, owned=RESULT_FILES, protect=[args.image, args.prompts])
    if args.band is not None and args.band <= 0:
        from basalseg.errors import BasalSegError

        raise BasalSegError(f"--band must be > 0, got {args.band}")
    volume = load_volume(args.image)
    prompts = load_prompts(args.prompts) if args.prompts else None
    config = _config(args)  # the same options as `basalseg segment` (stride, encoder, context, planes ...)
    key = cacheKey(volume, config.foundation, config.checkpoint, config.crop)
    cache = loadCache(cachePath, key) if cachePath else None
    before = dict(cache.entries) if cache is not None else {}
    mode = "json" if args.progress == "json" else ("bar" if args.progress == "bar" or (args.progress == "auto" and sys.stderr.isatty()) else "none")
    reporter, close = make_reporter(mode)
    try:
        result = Pipeline(config).segment(volume, prompts=prompts, progress=reporter, cache=cache)
        write_result(result, args.out, overwrite=args.overwrite, qc=not args.no_qc)
    finally:
        close()
    slices = result.prompts.slices()
    reused = sum(1 for k in slices if cache is not None and k in before and before[k] is cache.entries.get(k))
    if cache is not None:
        try:
            saveCache(cachePath, cache, key)
        except Exception as exc:  # the result is written; a cache that cannot be saved only costs time
            log.warning("could not save the slice-mask cache %s (%s)", cachePath, exc)
    if mode == "json":
        emit_json(event="cache", slices=len(slices), reused=reused, computed=len(slices) - reused)
        emit_json(event="done", out=str(args.out))
    else:
        print(f"wrote {args.out}/; foundation masks reused for {reused} of {len(slices)} slices")
    return 0


def _onSigterm(signum, frame):  # pragma: no cover - exercised through a subprocess
    from basalseg.errors import Cancelled

    raise Cancelled("cancelled (terminated)")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 success, 2 expected error, 130 cancelled, 1 bug)."""
    from basalseg.cli import build_parser
    from basalseg.errors import BasalSegError, Cancelled
    from basalseg.progress import emit_json

    cachePath, rest = _split(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(["segment", *rest])
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="basalseg: %(message)s")
    os.environ.setdefault("SAM2_BUILD_CUDA", "0")
    try:
        signal.signal(signal.SIGTERM, _onSigterm)
    except (ValueError, AttributeError):  # not the main thread, or no SIGTERM
        pass
    jsonMode = args.progress == "json"

    def fail(message: str, kind: str, code: int) -> int:
        print(f"basalseg: error: {message}", file=sys.stderr)
        if jsonMode:
            emit_json(event="error", message=message, kind=kind)
        return code

    try:
        return _run(args, cachePath)
    except KeyboardInterrupt:
        return fail("cancelled (interrupted)", "Cancelled", Cancelled.exit_code)
    except BasalSegError as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        return fail(str(exc), type(exc).__name__, exc.exit_code)
    except MemoryError:
        return fail("out of memory; try a smaller image or --device cuda", "MemoryError", 2)
    except Exception as exc:
        if args.debug:
            raise
        return fail(f"{type(exc).__name__}: {exc}", "internal", 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
