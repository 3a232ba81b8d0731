"""Downloading model checkpoints into the user cache, safely.

Guarantees of :func:`download_file`:

* The body is streamed into a temporary ``<dest name>.<random>.part`` file in ``dest``'s folder
  and renamed onto ``dest`` (``os.replace``, atomic on one file system) only after every byte
  announced by ``Content-Length`` arrived and the sha256 (when given) matched.
* Anything else — HTTP error, connection drop, a body shorter than ``Content-Length``, a
  checksum mismatch, an exception raised by the progress callback, ``KeyboardInterrupt`` —
  deletes the ``.part`` file and leaves ``dest`` untouched (absent if it was absent), so a
  truncated file can never be picked up later.

:func:`fetch_cached` adds the cache policy for catalogue entries
(:class:`basalseg.catalogue.ModelEntry`):

* The cache folder is ``$BASALSEG_CACHE`` when set, else ``~/.cache/basalseg``.
* ``BASALSEG_OFFLINE=1`` (or ``offline=True``) forbids any network access; a missing file is
  then a :class:`~basalseg.errors.BackendUnavailableError`.
* **Trust on first use.** Official SAM-2 releases publish no sha256 that could be checked
  offline. For entries with ``sha256=None`` the digest of the first download (or of a file
  found in the cache with no record) is written to ``<cache>/checksums.json``; every later
  load, and any re-download, must match that record. A mismatch is refused
  (:class:`~basalseg.errors.CheckpointError`), never silently replaced: delete the file (and
  its line in ``checksums.json`` if the publisher really changed it) to start over. This
  catches corruption and tampering after the first download, not a bad first download.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import BackendUnavailableError, CheckpointError, DownloadError

__all__ = [
    "ProgressCallback",
    "CHUNK_SIZE",
    "cache_dir",
    "is_offline",
    "sha256_file",
    "download_file",
    "tqdm_progress",
    "fetch_cached",
    "load_checksums",
    "record_checksum",
]

log = logging.getLogger(__name__)

#: ``progress(bytes_done, bytes_total_or_None)``; called after every chunk (and once at 0).
ProgressCallback = Callable[[int, "int | None"], None]

#: bytes read per ``read()`` call while streaming.
CHUNK_SIZE = 1 << 20

_USER_AGENT = "basalseg-downloader/1 (+python-urllib)"
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_CHECKSUMS_NAME = "checksums.json"
_TRUE = {"1", "true", "yes", "on"}


def cache_dir() -> Path:
    """The user cache folder: ``$BASALSEG_CACHE`` if set and non-empty, else ``~/.cache/basalseg``.

    The folder is not created here; downloads create it when needed.
    """
    env = os.environ.get("BASALSEG_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "basalseg"


def is_offline(offline: bool | None = None) -> bool:
    """Whether network access is forbidden: ``offline`` is true or ``BASALSEG_OFFLINE`` is 1/true/yes/on.

    The environment variable wins over ``offline=False``: it is how an administrator or a test
    run forces offline behaviour.
    """
    env = os.environ.get("BASALSEG_OFFLINE", "").strip().lower() in _TRUE
    return bool(offline) or env


def sha256_file(path: str | os.PathLike) -> str:
    """Lowercase hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256_arg(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not _HEX64.match(sha256.strip()):
        raise ValueError(f"sha256 must be 64 hexadecimal characters or None, got {sha256!r}")
    return sha256.strip().lower()


def _content_length(response: Any) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        return None
    return length if length >= 0 else None


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    progress: ProgressCallback | None = None,
    timeout: float = 60,
) -> Path:
    """Download ``url`` to ``dest`` atomically, optionally verifying its sha256.

    Args:
        url: ``http(s)://`` (or ``file://``) address.
        dest: final file path; its folder is created if needed. An existing file is replaced
            only by a complete, verified download.
        sha256: expected lowercase or uppercase hex digest, or ``None`` to skip the check.
        progress: called as ``progress(bytes_done, bytes_total)`` once with 0 and after every
            chunk; ``bytes_total`` is ``None`` when the server sends no ``Content-Length``.
            An exception it raises aborts the download (and propagates unchanged).
        timeout: seconds to wait for the connection and for each read.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``url`` is empty, ``sha256`` is malformed or ``timeout`` is not positive.
        DownloadError: HTTP error, network failure, interrupted or short body, or a sha256
            mismatch (message names the expected and the received digest). In every case the
            partial file is deleted and nothing is written at ``dest``.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"url must be a non-empty string, got {url!r}")
    expected = _check_sha256_arg(sha256)
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return _download(url, Path(dest), expected, progress, timeout)[0]


def _download(url: str, dest: Path, expected: str | None, progress: ProgressCallback | None,
              timeout: float) -> tuple[Path, str]:
    """:func:`download_file` after argument checks; also returns the sha256 of the body."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise DownloadError(f"cannot write into {dest.parent}: {exc.strerror or exc}") from exc
    part = Path(tmp_name)
    ok = False
    try:
        with os.fdopen(fd, "wb") as out:
            digest = hashlib.sha256()
            request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            try:
                response = urllib.request.urlopen(request, timeout=timeout)
            except urllib.error.HTTPError as exc:
                raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
            except urllib.error.URLError as exc:
                raise DownloadError(f"cannot reach {url}: {exc.reason}") from exc
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise DownloadError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from exc
            with response:
                total = _content_length(response)
                done = 0
                if progress is not None:
                    progress(0, total)
                while True:
                    try:
                        chunk = response.read(CHUNK_SIZE)
                    except (OSError, http.client.HTTPException) as exc:
                        raise DownloadError(
                            f"download of {url} interrupted after {done} bytes: {type(exc).__name__}: {exc}"
                        ) from exc
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            # http.client returns b"" (no exception) when the peer closes before Content-Length.
            if total is not None and done != total:
                raise DownloadError(f"download of {url} interrupted: received {done} of {total} bytes")
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if expected is not None and got != expected:
            raise DownloadError(f"sha256 mismatch for {url}: expected {expected}, got {got}")
        try:
            os.replace(part, dest)
        except OSError as exc:
            raise DownloadError(f"cannot move the download into place at {dest}: {exc.strerror or exc}") from exc
        ok = True
        log.info("downloaded %s (%d bytes, sha256 %s) to %s", url, done, got, dest)
        return dest, got
    finally:
        if not ok:
            _unlink_quietly(part)


@contextlib.contextmanager
def tqdm_progress(desc: str = "download", disable: bool | None = None) -> Iterator[ProgressCallback]:
    """A tqdm byte progress bar for the command line, as a ``progress`` callback.

    Usage::

        with tqdm_progress("sam2.1_hiera_tiny") as bar:
            download_file(url, dest, progress=bar)

    Args:
        desc: label shown left of the bar.
        disable: ``True`` hides the bar; ``None`` hides it when stderr is not a terminal.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=disable, leave=True)

    def update(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
            bar.refresh()
        if done > bar.n:
            bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


# ----------------------------------------------------------------------------------- cache


def _checksums_path(root: Path) -> Path:
    return root / _CHECKSUMS_NAME


def load_checksums(root: str | os.PathLike | None = None) -> dict[str, dict]:
    """The trust-on-first-use records: cached file name -> ``{"sha256", "url", "bytes", "recorded"}``.

    Args:
        root: cache folder; ``None`` means :func:`cache_dir`.

    Raises:
        CheckpointError: ``checksums.json`` exists but is unreadable or malformed (it is never
            silently reset, as that would drop the protection it gives).
    """
    path = _checksums_path(Path(root) if root is not None else cache_dir())
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values()
        ):
            raise ValueError("'files' must map names to records with a 'sha256'")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is unreadable or malformed ({exc}); fix or delete it") from exc
    return files


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        _unlink_quietly(Path(tmp_name))
        raise


def record_checksum(filename: str, sha256: str, url: str | None = None, size: int | None = None,
                    root: str | os.PathLike | None = None) -> None:
    """Record (trust on first use) the sha256 of cached file ``filename`` in ``checksums.json``.

    The file is rewritten atomically (temporary file + ``os.replace``).
    """
    root_path = Path(root) if root is not None else cache_dir()
    files = dict(load_checksums(root_path))
    files[filename] = {
        "sha256": sha256.lower(),
        "url": url,
        "bytes": size,
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json_atomic(_checksums_path(root_path), {"format": "basalseg-checksums", "version": 1, "files": files})


def _resolve_entry(entry: Any) -> Any:
    if isinstance(entry, str):
        from .catalogue import get_entry

        return get_entry(entry)
    for attr in ("name", "url", "sha256"):
        if not hasattr(entry, attr):
            raise ValueError(f"entry must be a catalogue name or a ModelEntry, got {entry!r}")
    return entry


def _entry_filename(entry: Any) -> str:
    name = getattr(entry, "filename", None) or entry.url.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"entry {entry.name!r}: cannot derive a file name from url {entry.url!r}")
    return name


def fetch_cached(entry: Any, offline: bool | None = None, progress: ProgressCallback | None = None,
                 timeout: float = 60) -> Path:
    """The verified local path of a catalogue entry's file, downloading it when allowed.

    * Cached and a sha256 is known (``entry.sha256``, else the ``checksums.json`` record): the
      file is hashed and returned if it matches.
    * Cached with no known sha256 (copied in by hand): trusted now, its sha256 recorded.
    * Not cached: downloaded (verified against the known sha256 if any), then, if none was
      known, its sha256 is recorded — trust on first use, since SAM-2 releases publish none.

    Args:
        entry: a :class:`~basalseg.catalogue.ModelEntry` (anything with ``name``, ``url``,
            ``sha256``) or a catalogue name.
        offline: forbid downloading; ``BASALSEG_OFFLINE=1`` forces it regardless.
        progress: passed to :func:`download_file`.
        timeout: passed to :func:`download_file`.

    Raises:
        BackendUnavailableError: offline and the file is not in the cache.
        DownloadError: the download failed or did not match the known sha256.
        CheckpointError: the cached file no longer matches its known sha256 (corrupted or
            tampered with), or ``checksums.json`` is malformed; or an unknown catalogue name.
    """
    entry = _resolve_entry(entry)
    root = cache_dir()
    filename = _entry_filename(entry)
    path = root / filename
    records = load_checksums(root)
    record = records.get(filename)
    if entry.sha256:
        expected, source = _check_sha256_arg(entry.sha256), "catalogue"
    elif record is not None:
        expected, source = record["sha256"].lower(), f"recorded (trust on first use, {_checksums_path(root)})"
    else:
        expected, source = None, ""

    if path.is_file():
        got = sha256_file(path)
        if expected is None:
            log.info("trusting cached %s on first use (sha256 %s)", path, got)
            record_checksum(filename, got, url=entry.url, size=path.stat().st_size, root=root)
            return path
        if got != expected:
            raise CheckpointError(
                f"cached {path} fails its checksum: sha256 {got} does not match the {source} {expected}; "
                f"delete the file to download it again"
            )
        return path

    if is_offline(offline):
        raise BackendUnavailableError(
            f"{entry.name} is not in the cache ({path}) and downloads are off (offline); "
            f"download {entry.url} on a connected machine and copy it there"
        )
    log.info("downloading %s from %s to %s", entry.name, entry.url, path)
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    try:
        _, got = _download(entry.url, path, expected, progress, timeout)
    except DownloadError as exc:
        if expected is not None and source != "catalogue" and "sha256 mismatch" in str(exc):
            raise DownloadError(f"{exc} (the {source} hash; delete its entry if the file really changed)") from exc
        raise
    if expected is None:
        record_checksum(filename, got, url=entry.url, size=path.stat().st_size, root=root)
        log.info("recorded sha256 %s for %s (trust on first use)", got, filename)
    return path
