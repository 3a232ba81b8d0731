"""Writing results without ever leaving half a result, and without touching what is not ours.

* Single files are written to a temporary file in the same folder and renamed into place
  (:func:`atomic_write_bytes`): readers see the old file or the new one, never a torn one.
* A result folder is assembled in a hidden staging folder (:class:`StagedOutputDir`):

  - a **new** folder: staged beside it (``.<name>.staging-*``) and renamed into place at once;
  - an **existing** folder (the user's own, a symbolic link to one, the current folder): staged
    inside it (``.basalseg.staging-*``); on commit only the result files named in ``owned`` are
    replaced, one rename each, ``provenance.json`` last (so an interrupted commit reads as an
    incomplete result, never as a complete one). Every other file in the folder is left exactly
    as it was; a symbolic link stays a link and the results land where it points.

  Without ``overwrite`` a folder that already holds any of the result files is refused. With
  ``overwrite`` a result file is replaced only when it is verifiably BasalSegSAM's
  (``replace="verified"``: ``provenance.json`` is a BasalSegSAM record and lists the file with its
  current sha256), or, for an explicit redo of a damaged result, whenever it has a result file's
  name (``replace="named"``). An input of the run (``protect``) is never replaced.
* Each staging folder holds an ``.owner`` record (process id and host). A later run into the same
  folder removes the leftovers of a run that died (killed, power loss) and says so; leftovers of a
  process that may still run are reported and left alone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Collection, Iterable

from .errors import OutputExistsError, OutputWriteError

__all__ = ["atomic_write_bytes", "atomic_write_text", "StagedOutputDir", "clean_leftovers", "OWNER_FILE"]

log = logging.getLogger("basalseg")

#: the record of the process that made a staging folder (never part of a result)
OWNER_FILE = ".owner"
_INNER_STAGING = ".basalseg.staging-"
_INNER_OLD = ".basalseg.old-"


def _reason(exc: OSError) -> str:
    return "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))


def _write_error(path: Path, exc: OSError) -> OutputWriteError:
    return OutputWriteError(f"cannot write {path}: {_reason(exc)}")


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _unwritable(where: Path, exc: OSError) -> OutputWriteError:
    """The error for a folder that cannot be made or written, naming the real obstacle."""
    missing = _missing_folders(where)
    existing = missing[-1].parent if missing else where  # the deepest ancestor that exists
    if existing.exists() and not existing.is_dir():
        return OutputWriteError(f"cannot write {where}: {existing} is a file, not a folder")
    return OutputWriteError(f"cannot write {where}: no folder can be made in it ({_reason(exc)})")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename.

    Raises:
        OutputWriteError: the folder is not writable or the disk is full; no file is left behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder itself is unusable: nothing was created
            pass
        raise _write_error(path, exc) from exc


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM until the block is done, then deliver them: a cancel arriving between the
    renames of a commit must not leave half the old and half the new results.
    (Python runs signal handlers in the main thread only, so elsewhere there is nothing to defer.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
        if signum is not None and signal.getsignal(signum) is not None:  # None: set outside Python, left alone
            previous[signum] = signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


# ---------------------------------------------------------------------------------------------
# leftovers of runs that died
# ---------------------------------------------------------------------------------------------


def _owner_alive(folder: Path) -> tuple[bool | None, str]:
    """Whether the process that made ``folder`` may still run: True, False, or None (unknown)."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, "no owner record"
    if host != socket.gethostname():
        return None, f"made on host {host}"
    if pid == os.getpid():
        return True, "this process"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, f"process {pid} has ended"
    except (PermissionError, OSError):
        return True, f"process {pid} is running"
    return True, f"process {pid} is running"


def clean_leftovers(final: str | os.PathLike, owned: Collection[str] = (), assume_dead: bool = False) -> list[dict]:
    """Remove what interrupted writes of ``final`` left; return one record per leftover:
    ``{"action": "removed" | "restored" | "kept", "name": <folder name>, "message": <one line>}``.

    Staging folders of a process that has ended are removed (a caller that holds a lock on the
    whole output tree may pass ``assume_dead``, which also removes records without an owner).
    A set-aside folder of old results (``.basalseg.old-*`` inside ``final``, or the older
    ``.<name>.old-*`` beside it) is put back when ``final`` holds none of the ``owned`` files any
    more (the commit died between the two halves), else removed. Anything whose owner may still
    be running is reported and kept.
    """
    final = Path(final)
    messages: list[dict] = []
    candidates: list[Path] = []
    if final.parent.is_dir():
        candidates += sorted(final.parent.glob(f".{final.name}.staging-*"))
        candidates += sorted(final.parent.glob(f".{final.name}.old-*"))
    if final.is_dir():
        candidates += sorted(p for p in final.iterdir() if p.name.startswith((_INNER_STAGING, _INNER_OLD)))
    for leftover in candidates:
        if not leftover.is_dir() or leftover.is_symlink():
            continue
        alive, why = _owner_alive(leftover)
        is_old = leftover.name.startswith(_INNER_OLD) or ".old-" in leftover.name
        if alive or (alive is None and not assume_dead and not is_old):
            messages.append({"action": "kept", "name": leftover.name,
                             "message": f"left {leftover} alone: it may belong to a run still writing there ({why}); "
                                        "remove it by hand if no other run is"})
            continue
        if is_old:
            holds_ours = final.is_dir() and any((final / name).exists() for name in owned)
            if not holds_ours and (not final.exists() or final.is_dir()):
                final.mkdir(exist_ok=True)
                for item in leftover.iterdir():
                    if item.name != OWNER_FILE and not (final / item.name).exists():
                        os.replace(item, final / item.name)
                messages.append({"action": "restored", "name": leftover.name,
                                 "message": f"put back the results an interrupted run had set aside in {leftover.name}"})
            else:
                messages.append({"action": "removed", "name": leftover.name,
                                 "message": f"removed {leftover.name}, old results an interrupted run had set aside ({why})"})
        else:
            messages.append({"action": "removed", "name": leftover.name,
                             "message": f"removed {leftover.name}, left by an interrupted run ({why})"})
        shutil.rmtree(leftover, ignore_errors=True)
    return messages


# ---------------------------------------------------------------------------------------------
# the staged result folder
# ---------------------------------------------------------------------------------------------


class _ProbeDone(Exception):
    """Ends :meth:`StagedOutputDir.check_writable` without committing anything."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _signature(path: Path) -> tuple:
    st = path.lstat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _resolve_final(final: Path) -> Path:
    if final.is_symlink():
        target = final.resolve()
        if not target.exists():
            raise OutputWriteError(f"{final} is a symbolic link to {target}, which does not exist")
        return target
    return final.absolute() if final.name in ("", ".", "..") else final


class StagedOutputDir:
    """A result folder that appears complete or not at all, and leaves every other file alone.

    Usage::

        with StagedOutputDir(out, overwrite=False) as stage:
            (stage.path / "volumes.csv").write_text("...")
        # out/ now holds volumes.csv; on an exception inside the block, out/ is untouched.

    Args:
        final: the folder the results should end up in (a symbolic link is followed).
        overwrite: replace result files already in ``final``. Without it, a folder holding any of
            the ``owned`` files raises :class:`OutputExistsError` (checked at construction).
        owned: the names of the files this kind of result folder holds (see
            :data:`basalseg.results.RESULT_FILES`); the only ones ever replaced or removed in an
            existing folder. ``None``: any name (a folder wholly the caller's, e.g. a cache).
        replace: ``"verified"`` (default): an existing result file is replaced only if
            ``provenance.json`` records it with its current sha256; ``"named"``: any file with a
            result file's name (an explicit redo of a damaged result).
        protect: inputs of the run; refused if one of them would be replaced.

    Raises:
        OutputExistsError: see ``overwrite`` and ``replace``; also a file where the folder should be.
        OutputWriteError: an empty name or a broken link.
    """

    def __init__(self, final: str | os.PathLike, overwrite: bool = False, owned: Collection[str] | None = None,
                 replace: str = "verified", protect: Iterable[str | os.PathLike] = ()):
        if replace not in ("verified", "named"):
            raise ValueError(f"replace must be 'verified' or 'named', got {replace!r}")
        if isinstance(final, str) and not final.strip():  # Path("") would silently mean "."
            raise OutputWriteError("no output folder given (an empty name); name a folder, e.g. --out results")
        self.requested = Path(final)
        self.final = _resolve_final(self.requested)
        self.overwrite = overwrite
        self.owned = None if owned is None else frozenset(owned)
        self.replace = replace
        self.path: Path | None = None
        self._made: list[Path] = []  # parent folders __enter__ created (removed again on failure)
        if self.final.exists() and not self.final.is_dir():
            raise OutputExistsError(f"{self.final} exists and is a file, not a folder")
        for record in clean_leftovers(self.final, self.owned or ()):
            log.warning("%s", record["message"])
        self.existing = self.final.is_dir()
        self.ours = self._present_results() if self.existing else []
        if self.ours:  # first: a file --overwrite would not replace is named as such, not met with "pass --overwrite"
            self._check_replaceable([Path(p) for p in protect if p])
        if self.ours and not overwrite:
            raise OutputExistsError(f"{self.requested} already holds results ({', '.join(self.ours)}); choose another "
                                    "--out or pass --overwrite (which replaces only these files)")
        self.snapshot = {name: _signature(self.final / name) for name in self.ours}

    # -- what is in the folder -------------------------------------------------------------
    def _present_results(self) -> list[str]:
        names = []
        for entry in sorted(self.final.iterdir(), key=lambda p: p.name):
            if entry.name.startswith((_INNER_STAGING, _INNER_OLD)):
                continue
            if self.owned is None or entry.name in self.owned:
                names.append(entry.name)
        return names

    def _check_replaceable(self, protect: list[Path]) -> None:
        for path in protect:
            try:
                resolved = path.resolve()
            except OSError:
                continue
            for name in self.ours:
                if (self.final / name).resolve() == resolved:
                    raise OutputExistsError(f"{path} is an input of this run and lies in the output folder, where it "
                                            "would be replaced; choose another --out")
        if self.replace == "named" or self.owned is None:
            return
        record: dict = {}
        prov_path = self.final / "provenance.json"
        if prov_path.is_file() and not prov_path.is_symlink():
            try:
                record = json.loads(prov_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                record = {}
        is_ours = isinstance(record, dict) and "basalseg" in record
        files = record.get("files") if is_ours and isinstance(record.get("files"), dict) else {}
        for name in self.ours:
            path = self.final / name
            if name == "provenance.json":
                ok = is_ours
            else:
                ok = (is_ours and path.is_file() and not path.is_symlink() and isinstance(files.get(name), str)
                      and _sha256(path) == files[name])
            if not ok:
                why = ("it is not listed with its current sha256 in a BasalSegSAM provenance.json: written by "
                       "something else, or changed since" if name != "provenance.json" else
                       "it is not a BasalSegSAM record")
                raise OutputExistsError(f"{self.requested}: {name} is in the way and --overwrite replaces only "
                                        f"BasalSegSAM's own unchanged result files ({why}); move it away or choose "
                                        "another --out")

    # -- staging ---------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Fail now, before any long work, if the results could not be written to ``final``.

        Raises:
            OutputWriteError: the folder (or its parent) cannot be created or written.
        """
        with self:
            probe = self.path / ".probe"
            try:
                probe.write_bytes(b"")
            except OSError as exc:
                raise _write_error(self.final if self.existing else self.final.parent, exc) from exc
            raise _ProbeDone

    def __enter__(self) -> "StagedOutputDir":
        where = self.final if self.existing else self.final.parent
        prefix = _INNER_STAGING if self.existing else f".{self.final.name}.staging-"
        self._made = _missing_folders(where)  # created here; removed again if this run leaves nothing in them
        try:
            where.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
            umask = os.umask(0)
            os.umask(umask)
            self.path.chmod(0o777 & ~umask)  # mkdtemp makes it private; results are ordinary folders
            (self.path / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}),
                                                encoding="utf-8")
        except OSError as exc:
            if self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
            self._remove_made()
            raise _unwritable(where, exc) from exc
        return self

    def _discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self.path.exists():
            log.warning("could not remove the staging folder %s; remove it by hand", self.path)
        self._remove_made()

    def _remove_made(self) -> None:
        """Remove the parent folders :meth:`__enter__` created, deepest first, while they are empty
        (a failed or probing run leaves no trace; a folder someone filled meanwhile stays)."""
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:
                break

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        if exc_type is not None:
            self._discard()
            if issubclass(exc_type, OSError):  # a write inside the block failed: disk full, read-only, ...
                raise _write_error(self.final, exc) from exc
            return exc_type is _ProbeDone  # a finished probe is swallowed, other errors propagate
        try:
            with _signals_deferred():
                if self.final.is_dir():
                    self._commit_into()
                else:
                    self._commit_new()
        except OSError as err:
            self._discard()
            raise _write_error(self.final, err) from err
        except BaseException:
            self._discard()
            raise

    # -- commit ----------------------------------------------------------------------------
    def _commit_new(self) -> None:
        """``final`` did not exist: one rename makes the whole folder appear."""
        (self.path / OWNER_FILE).unlink()
        try:
            os.replace(self.path, self.final)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) or self.final.exists():
                raise OutputExistsError(f"{self.requested} was filled by something else while this run worked; "
                                        "nothing was changed") from exc
            raise

    def _commit_into(self) -> None:
        """``final`` exists: replace our files in it, one rename each, ``provenance.json`` last."""
        present = self._present_results()
        if not self.existing and present:
            raise OutputExistsError(f"{self.requested} was filled by something else while this run worked; "
                                    "nothing was changed")
        now = {}
        for name in present:
            now[name] = _signature(self.final / name)
        if now != self.snapshot:
            raise OutputExistsError(f"{self.requested}: its results were changed by something else while this run "
                                    "worked; nothing was changed")
        new = sorted((p.name for p in self.path.iterdir() if p.name not in (OWNER_FILE, ".probe")),
                     key=lambda n: (n == "provenance.json", n))
        foreign = [n for n in new if n not in present and (self.final / n).exists()]
        if foreign:  # a writer wrote a name outside ``owned`` that the folder already holds
            raise OutputExistsError(f"{self.requested}: {foreign[0]} is already there and is not a result file of "
                                    "this run's kind; nothing was changed")
        old_dir = Path(tempfile.mkdtemp(prefix=_INNER_OLD, dir=self.final))
        (old_dir / OWNER_FILE).write_text((self.path / OWNER_FILE).read_text(encoding="utf-8"), encoding="utf-8")
        moved_old: list[str] = []
        moved_new: list[str] = []
        try:
            # set the old results aside, provenance first: from here until the end the folder
            # does not read as a complete result
            for name in sorted(present, key=lambda n: (n != "provenance.json", n)):
                os.replace(self.final / name, old_dir / name)
                moved_old.append(name)
            for name in new:
                os.replace(self.path / name, self.final / name)
                moved_new.append(name)
        except OSError:
            for name in reversed(moved_new):  # undo: the new files out, the old ones back
                with contextlib.suppress(OSError):
                    os.replace(self.final / name, self.path / name)
            for name in reversed(moved_old):
                with contextlib.suppress(OSError):
                    os.replace(old_dir / name, self.final / name)
            shutil.rmtree(old_dir, ignore_errors=True)
            raise
        shutil.rmtree(old_dir, ignore_errors=True)
        shutil.rmtree(self.path, ignore_errors=True)
