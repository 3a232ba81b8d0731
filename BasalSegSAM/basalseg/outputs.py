"""Writing results without ever leaving half a result, and the result files themselves.

* Single files are written to a temporary file in the same folder and renamed into place
  (:func:`atomic_write_bytes`): readers see the old file or the new one, never a torn one.
* A result folder is assembled in a hidden sibling folder and renamed into place as a whole
  (:class:`StagedOutputDir`). An existing folder with files in it is refused unless overwriting
  was asked for; then the old folder is moved aside, the new one moved in, and only then is the
  old one deleted. On any error the staging folder is removed and the old results stay.

Files of a ``segment`` result (see :func:`write_segmentation_outputs`):

``segmentation.nii.gz``
    int16 labelmap on the input grid and affine, FreeSurfer values (10-13, 49-52).
``segmentation.seg.nrrd``
    the same as a 3D Slicer segmentation: 8 named, coloured segments (label value = FreeSurfer value).
``volumes.csv``
    ``structure,label,voxels,volume_mm3,volume_ml``: voxel counts of the labelmap times the
    input voxel volume (|det| of the affine), so the table always matches the labelmap exactly;
    then ``volume_ml_low,volume_ml_high,expected_ml,band_ml``: the 95 % volume interval and its
    ingredients (:mod:`basalseg.uncertainty`; blank with ``--no-uncertainty``).
``prompts.json``
    the prompts used (see :mod:`basalseg.prompts`).
``qc.png``
    overlay of the result on the image for a quick visual check.
``provenance.json``
    versions, backend, weights sha256, options, timings.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import shutil
import signal
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np

from .errors import OutputExistsError, OutputWriteError
from .structures import STRUCTURES

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "StagedOutputDir",
    "volume_rows",
    "volumes_csv_text",
    "nifti_bytes",
    "seg_nrrd_bytes",
    "VOLUME_COLUMNS",
    "json_text",
]

VOLUME_COLUMNS = ["structure", "label", "voxels", "volume_mm3", "volume_ml"]


def _write_error(path: Path, exc: OSError) -> OutputWriteError:
    reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return OutputWriteError(f"cannot write {path}: {reason}")


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
    renames of a commit must not leave the old results set aside and the new ones in staging.
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


class _ProbeDone(Exception):
    """Ends :meth:`StagedOutputDir.check_writable` without committing anything."""


class StagedOutputDir:
    """A result folder that appears complete or not at all.

    Usage::

        with StagedOutputDir(out, overwrite=False) as stage:
            (stage.path / "a.txt").write_text("...")
        # out/ now holds a.txt; on an exception inside the block, out/ is untouched.

    Args:
        final: the folder the results should end up in.
        overwrite: replace an existing non-empty folder. Without it, such a folder raises
            :class:`OutputExistsError` before any work is done (checked at construction).
    """

    def __init__(self, final: str | os.PathLike, overwrite: bool = False):
        self.final = Path(final)
        self.overwrite = overwrite
        if self.final.exists() and not self.final.is_dir():
            raise OutputExistsError(f"{self.final} exists and is a file, not a folder")
        if self.final.is_dir() and any(self.final.iterdir()) and not overwrite:
            raise OutputExistsError(f"{self.final} already holds results; choose another --out or pass --overwrite")
        self.path: Path | None = None

    def check_writable(self) -> None:
        """Fail now, before any long work, if the results could not be written next to ``final``.

        Raises:
            OutputWriteError: the parent folder cannot be created or written.
        """
        with self:
            probe = self.path / ".probe"
            try:
                probe.write_bytes(b"")
            except OSError as exc:
                raise _write_error(self.final.parent, exc) from exc
            raise _ProbeDone

    def __enter__(self) -> "StagedOutputDir":
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.staging-", dir=parent))
            umask = os.umask(0)
            os.umask(umask)
            self.path.chmod(0o777 & ~umask)  # mkdtemp makes it private; results are ordinary folders
        except OSError as exc:
            raise _write_error(parent, exc) from exc
        return self

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            if issubclass(exc_type, OSError):  # a write inside the block failed: disk full, read-only, ...
                raise _write_error(self.final, exc) from exc
            return exc_type is _ProbeDone  # a finished probe is swallowed, other errors propagate
        try:
            self._commit()
        except OSError as err:
            shutil.rmtree(self.path, ignore_errors=True)
            raise _write_error(self.final, err) from err

    def _commit(self) -> None:
        assert self.path is not None
        with _signals_deferred():
            self._rename_into_place()

    def _rename_into_place(self) -> None:
        if self.final.is_dir():
            if any(self.final.iterdir()) and not self.overwrite:  # appeared while we worked
                shutil.rmtree(self.path, ignore_errors=True)
                raise OutputExistsError(f"{self.final} was filled by something else while this run worked; nothing was changed")
            old = self.final.with_name(f".{self.final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.final, old)
            try:
                os.replace(self.path, self.final)
            except OSError:
                os.replace(old, self.final)  # put the old results back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.final)


def volume_rows(labels: np.ndarray, voxel_volume_mm3: float) -> list[dict]:
    """One row per structure: voxel count of its FreeSurfer label and the volume it makes.

    Args:
        labels: labelmap with FreeSurfer values (any shape).
        voxel_volume_mm3: volume of one voxel.
    """
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    count = dict(zip(values.tolist(), counts.tolist()))
    rows = []
    for s in STRUCTURES:
        n = int(count.get(s.label, 0))
        mm3 = n * float(voxel_volume_mm3)
        rows.append({"structure": s.name, "label": s.label, "voxels": n,
                     "volume_mm3": round(mm3, 3), "volume_ml": round(mm3 / 1000.0, 6)})
    return rows


def volumes_csv_text(rows: list[dict], extra_columns: list[str] | None = None,
                     trailing_columns: list[str] | None = None) -> str:
    """CSV of volume rows: ``extra_columns`` first, then :data:`VOLUME_COLUMNS`, then
    ``trailing_columns`` (the interval columns of :mod:`basalseg.uncertainty`)."""
    columns = (extra_columns or []) + VOLUME_COLUMNS + (trailing_columns or [])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def nifti_bytes(labels: np.ndarray, affine: np.ndarray, header=None) -> bytes:
    """A gzipped NIfTI-1 file (int16 labelmap) as bytes, qform and sform set to ``affine``."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(labels, dtype=np.int16), np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.nii.gz"
        nib.save(img, str(path))
        return path.read_bytes()


def seg_nrrd_bytes(labels: np.ndarray, affine_ras: np.ndarray) -> bytes:
    """A 3D Slicer ``.seg.nrrd`` as bytes: one layer, 8 segments named and coloured as FreeSurfer.

    Written with ``slicerio``; segments keep their FreeSurfer label values, so the file also
    reads as a plain labelmap.
    """
    import slicerio

    from .imageio import LPS_TO_RAS

    present = set(np.unique(labels).tolist())
    segmentation = {
        "voxels": np.asarray(labels, dtype=np.int16),
        "ijkToLPS": LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64),
        "segments": [],
    }
    for s in STRUCTURES:
        segment = {"id": s.name, "name": s.name, "color": list(s.color_float), "labelValue": s.label, "layer": 0}
        if s.label in present:
            idx = np.nonzero(labels == s.label)
            segment["extent"] = [int(v) for pair in zip([i.min() for i in idx], [i.max() for i in idx]) for v in pair]
        segmentation["segments"].append(segment)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.seg.nrrd"
        slicerio.write_segmentation(str(path), segmentation)
        raw = path.read_bytes()
    # pynrrd stamps the header with the time of writing; drop it so identical results are identical files
    header, sep, body = raw.partition(b"\n\n")
    header = b"\n".join(line for line in header.split(b"\n") if not line.startswith(b"# on "))
    return header + sep + body


def json_text(data: dict) -> str:
    return json.dumps(data, indent=1, default=_json_default)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
