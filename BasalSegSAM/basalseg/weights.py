"""Versioned weight files and their manifest.

A weights folder holds checkpoint files (:mod:`basalseg.networks`) and ``manifest.json``::

    {"format": "basalseg-weights-manifest", "version": 1,
     "models": [{"name": "student-litemedsam", "kind": "student", "foundation": "litemedsam",
                 "file": "student_litemedsam.pt", "sha256": "...", "trained": true,
                 "training": {...data and settings...}, "date": "2026-11-23"}, ...]}

The shipped folder is ``basalseg/weights/`` inside the package; ``$BASALSEG_WEIGHTS`` or
``--weights DIR`` points elsewhere. Loading checks the file's sha256 against the manifest, so a
corrupted or swapped file is refused, and a student is only used with the foundation backend it
was trained with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .networks import load_checkpoint
from .download import sha256_file  # the one implementation (stdlib only)

__all__ = ["WeightsEntry", "default_weights_dir", "read_manifest", "find_entry", "load_model", "sha256_file",
           "write_manifest_entry", "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "basalseg-weights-manifest"


def default_weights_dir() -> Path:
    """``$BASALSEG_WEIGHTS`` if set, else the ``weights`` folder shipped inside the package."""
    env = os.environ.get("BASALSEG_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parent / "weights"


@dataclass
class WeightsEntry:
    name: str
    kind: str
    file: str
    sha256: str
    foundation: str | None
    trained: bool
    info: dict

    def path(self, folder: Path) -> Path:
        return folder / self.file


def read_manifest(folder: str | os.PathLike | None = None) -> list[WeightsEntry]:
    """Entries of a weights folder's manifest.

    Raises:
        CheckpointError: no manifest, or a malformed one.
    """
    folder = Path(folder) if folder is not None else default_weights_dir()
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"no weights manifest at {path}; train networks with 'basalseg train' or pass --weights DIR")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        return [
            WeightsEntry(m["name"], m["kind"], m["file"], m["sha256"], m.get("foundation"), bool(m.get("trained", False)), m)
            for m in data["models"]
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: malformed weights manifest ({exc})") from exc


def find_entry(kind: str, foundation: str | None = None, folder: str | os.PathLike | None = None) -> WeightsEntry:
    """The manifest entry for a prompter, or for the student trained with ``foundation``."""
    entries = read_manifest(folder)
    for entry in entries:
        if entry.kind == kind and (kind == "prompter" or entry.foundation == foundation):
            return entry
    what = "prompt generator" if kind == "prompter" else f"student trained with the {foundation!r} foundation backend"
    have = ", ".join(f"{e.name}" for e in entries) or "none"
    raise CheckpointError(f"no {what} in {Path(folder) if folder else default_weights_dir()} (it has: {have}); "
                          "train one with 'basalseg train' or pass its checkpoint file")


def load_model(kind: str, foundation: str | None = None, folder: str | os.PathLike | None = None,
               checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """Load the prompter or a student, verified.

    Args:
        kind: ``"prompter"`` or ``"student"``.
        foundation: for a student, the backend it must have been trained with.
        folder: weights folder with a manifest (default :func:`default_weights_dir`).
        checkpoint: a checkpoint file to use instead of the manifest (no sha256 to check against;
            its recorded foundation must still match).
        device: where to put the network.

    Returns:
        ``(network, info)``; ``info`` has the file, its sha256, and the checkpoint's meta.

    Raises:
        CheckpointError: missing, corrupt, mismatched sha256 or foundation.
    """
    if checkpoint is not None:
        path = Path(checkpoint)
        expected = None
        trained = None
    else:
        folder = Path(folder) if folder is not None else default_weights_dir()
        entry = find_entry(kind, foundation, folder)
        path = entry.path(folder)
        expected = entry.sha256
        trained = entry.trained
    if not path.is_file():
        raise CheckpointError(f"{kind} weights file missing: {path}")
    actual = sha256_file(path)
    if expected is not None and actual != expected:
        raise CheckpointError(f"{path}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}... (corrupt or replaced file)")
    net, meta = load_checkpoint(path, kind, device=device)
    if kind == "student" and foundation is not None and meta.get("foundation") not in (None, foundation):
        raise CheckpointError(f"{path}: this student was trained with the {meta.get('foundation')!r} backend, "
                              f"not {foundation!r}; use the matching --foundation or another student")
    info = {"kind": kind, "file": str(path), "sha256": actual, "meta": meta,
            "trained": meta.get("trained", trained)}
    return net, info


def write_manifest_entry(folder: str | os.PathLike, entry: dict) -> None:
    """Add or replace (by name) one model in a folder's manifest, computing its sha256. Atomic."""
    from .outputs import atomic_write_text

    folder = Path(folder)
    path = folder / MANIFEST_NAME
    data = {"format": MANIFEST_FORMAT, "version": 1, "models": []}
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
    entry = dict(entry)
    entry["sha256"] = sha256_file(folder / entry["file"])
    data["models"] = [m for m in data["models"] if m.get("name") != entry["name"]] + [entry]
    atomic_write_text(path, json.dumps(data, indent=1))
