"""The scans of a cohort folder: BIDS or plain-folder discovery, and each scan's session date.

**Inputs.** Either a folder of T1 files (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``; the folder
itself, not its sub-folders) or a BIDS dataset: ``sub-*/ses-*/anat/*_T1w.nii[.gz]`` and
``sub-*/anat/*_T1w.nii[.gz]`` (``derivatives/``, ``sourcedata/`` and hidden folders are not
searched). Giving one subject's folder (``sub-01/``) works too. Each scan's name (its result
folder under a batch's ``OUT_DIR``) is ``sub-XX[_ses-YY]`` for BIDS (with the other entities,
e.g. ``_run-2``, added when a session has several T1w images) and the file name without its
extension otherwise.

**Session dates** (for ``basalseg compare``'s interval), first found: the ``acq_time`` of the
image in the BIDS ``*_scans.tsv``, the session's ``acq_time`` in ``sub-XX_sessions.tsv``, the
``AcquisitionDateTime``/``AcquisitionDate`` of the JSON sidecar, an ISO date (``YYYY-MM-DD``) in
the NIfTI header's ``descrip`` field. Only the date is kept (``YYYY-MM-DD``).

Used by :mod:`basalseg.batch` (discovery) and :mod:`basalseg.longitudinal` (dates, subjects).
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BasalSegError
from .imageio import SUPPORTED_SUFFIXES

_log = logging.getLogger("basalseg")

__all__ = ["Scan", "discover_scans", "session_date", "bids_parts"]

_SKIP_DIRS = {"derivatives", "sourcedata", "code", "stimuli"}
_ISO_DATE = re.compile(r"(?<!\d)((?:19|20)\d\d)-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])(?!\d)")


# ---------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------


@dataclass
class Scan:
    """One input image of the batch.

    Attributes:
        name: its result folder's name under OUT_DIR (unique in the batch).
        path: the image file.
        subject, session: BIDS ``sub-XX`` / ``ses-YY`` (for plain folders, subject = name, no session).
        entities: the BIDS entities of the file name.
        session_date, date_source: ``YYYY-MM-DD`` and where it was read, when known.
    """

    name: str
    path: Path
    subject: str
    session: str = ""
    entities: dict = field(default_factory=dict)
    session_date: str | None = None
    date_source: str | None = None

    def info(self) -> dict:
        return {"scan": self.name, "subject": self.subject, "session": self.session, "session_date": self.session_date,
                "date_source": self.date_source, "bids_entities": self.entities, "input": str(self.path)}


def _strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _safe(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "scan"
    return f"scan-{name}" if name in ("report",) else name


def _entities(filename: str) -> dict:
    stem = _strip_suffix(filename)
    parts = stem.split("_")
    out = {}
    for part in parts[:-1]:  # the last part is the suffix (T1w)
        if "-" in part:
            key, value = part.split("-", 1)
            out[key] = value
    return out


def _is_file(path: Path) -> bool:
    """A file, or a broken symlink (a DataLad/git-annex file not fetched yet: listed, so that it is
    reported as failed rather than silently left out)."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def _is_t1w(path: Path) -> bool:
    name = path.name
    return _is_file(path) and not name.startswith(".") and name.endswith(("_T1w.nii.gz", "_T1w.nii"))


def _bids_scans(root: Path, subject_dirs: list[Path]) -> list[Scan]:
    scans = []
    for sub in subject_dirs:
        before = len(scans)
        anat_dirs = [(sub / "anat", "")] + [(ses / "anat", ses.name) for ses in sorted(sub.glob("ses-*")) if ses.is_dir()]
        for anat, session in anat_dirs:
            if not anat.is_dir():
                continue
            for path in sorted(p for p in anat.iterdir() if _is_t1w(p)):
                ents = _entities(path.name)
                scans.append(Scan(name="", path=path, subject=sub.name, session=session, entities=ents))
        if len(scans) == before:
            _log.warning("skipped %s: no T1w image (looked for %s/[ses-*/]anat/*_T1w.nii[.gz])", sub.name, sub)
    groups: dict[str, list[Scan]] = {}
    for s in scans:
        groups.setdefault(_safe(f"{s.subject}_{s.session}" if s.session else s.subject), []).append(s)
    for base, members in groups.items():
        for s in members:
            extra = [f"{k}-{v}" for k, v in s.entities.items() if k not in ("sub", "ses")]
            s.name = base if len(members) == 1 else _safe("_".join([base, *extra]))
    _make_unique(scans)
    for s in scans:
        s.session_date, s.date_source = session_date(s.path)
    return scans


def _make_unique(scans: list[Scan]) -> None:
    seen: dict[str, int] = {}
    for s in scans:
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name}_{seen[s.name]}"
        else:
            seen[s.name] = 1


def discover_scans(input_dir: str | os.PathLike) -> list[Scan]:
    """The T1 images of a plain folder or a BIDS tree (see the module docstring), in a stable order.

    Raises:
        BasalSegError: not a folder, or no image found.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise BasalSegError(f"{root}: no such folder" if not root.exists() else f"{root} is a file, not a folder of T1 images")
    subjects = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("sub-") and p.name not in _SKIP_DIRS)
    if subjects:
        scans = _bids_scans(root, subjects)
        kind = "BIDS T1w images (sub-*/[ses-*/]anat/*_T1w.nii[.gz])"
    elif root.name.startswith("sub-") and ((root / "anat").is_dir() or any(root.glob("ses-*/anat"))):
        scans = _bids_scans(root.parent, [root])
        kind = "BIDS T1w images"
    else:
        files = sorted(p for p in root.iterdir() if _is_file(p) and not p.name.startswith(".")
                       and any(p.name.lower().endswith(s) for s in SUPPORTED_SUFFIXES))
        scans = [Scan(name=_safe(_strip_suffix(p.name)), path=p, subject=_safe(_strip_suffix(p.name))) for p in files]
        _make_unique(scans)
        for s in scans:
            s.subject = s.name
            s.session_date, s.date_source = session_date(s.path)
        kind = f"images ({', '.join(SUPPORTED_SUFFIXES)})"
    if not scans:
        raise BasalSegError(f"no T1 images found in {root}: looked for {kind}")
    return scans


# ---------------------------------------------------------------------------------------------
# session dates
# ---------------------------------------------------------------------------------------------


def _iso_date(value) -> str | None:
    """``YYYY-MM-DD`` from an ISO date/datetime string (also ``YYYYMMDD``); None otherwise."""
    if value is None:
        return None
    text = str(value).strip()
    if not text or text.lower() in ("n/a", "na", "nan"):
        return None
    m = _ISO_DATE.search(text)
    if m:
        try:
            return datetime.date(int(m.group(1)), int(m.group(2)), int(m.group(3))).isoformat()
        except ValueError:
            return None
    m = re.fullmatch(r"((?:19|20)\d\d)(\d\d)(\d\d)", text)
    if m:
        try:
            return datetime.date(int(m.group(1)), int(m.group(2)), int(m.group(3))).isoformat()
        except ValueError:
            return None
    return None


def _read_tsv(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return list(csv.DictReader(handle, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def bids_parts(path: Path) -> tuple[Path, str, str] | None:
    """``(subject_dir, sub-XX, ses-YY or "")`` for a file inside a BIDS subject folder."""
    parts = Path(os.path.abspath(path)).parts  # not resolve(): annexed files are symlinks out of the tree
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].startswith("sub-") and i < len(parts) - 1:
            sub_dir = Path(*parts[: i + 1])
            session = parts[i + 1] if i + 1 < len(parts) - 1 and parts[i + 1].startswith("ses-") else ""
            return sub_dir, parts[i], session
    return None


def session_date(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """The acquisition date of an image file: ``(YYYY-MM-DD, source)`` or ``(None, None)``.

    Sources, first found: BIDS ``*_scans.tsv`` ``acq_time`` of this file, BIDS ``*_sessions.tsv``
    ``acq_time`` of its session, the JSON sidecar's ``AcquisitionDateTime`` / ``AcquisitionDate``,
    an ISO date in the NIfTI header's ``descrip``.
    """
    path = Path(path)
    bids = bids_parts(path)
    if bids is not None:
        sub_dir, _, ses = bids
        level = sub_dir / ses if ses else sub_dir
        for tsv in sorted(level.glob("*_scans.tsv")):
            for row in _read_tsv(tsv):
                name = (row.get("filename") or "").strip()
                if name and os.path.abspath(level / name) == os.path.abspath(path):
                    date = _iso_date(row.get("acq_time"))
                    if date:
                        return date, f"{tsv.name} acq_time"
        if ses:
            for tsv in sorted(sub_dir.glob("*_sessions.tsv")):
                for row in _read_tsv(tsv):
                    if (row.get("session_id") or "").strip() in (ses, ses[4:]):
                        date = _iso_date(row.get("acq_time"))
                        if date:
                            return date, f"{tsv.name} acq_time"
    sidecar = path.with_name(_strip_suffix(path.name) + ".json")
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
        for key in ("AcquisitionDateTime", "AcquisitionDate"):
            date = _iso_date(meta.get(key)) if isinstance(meta, dict) else None
            if date:
                return date, f"{sidecar.name} {key}"
    if path.name.lower().endswith((".nii", ".nii.gz")) and path.is_file():
        try:
            import nibabel as nib

            descrip = nib.load(str(path)).header["descrip"].tobytes().decode("latin-1")
            m = _ISO_DATE.search(descrip)
            if m:
                return _iso_date(m.group(0)), "NIfTI header descrip"
        except Exception:  # noqa: BLE001 - an unreadable header is the segmentation's problem, not the date's
            pass
    return None, None
