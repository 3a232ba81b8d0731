"""Foundation masks already computed, per slice, and their file on disk.

A :class:`SliceMaskCache` remembers each slice's prompts and masks, so a rerun after prompt
edits only recomputes the slices whose prompts changed (the Slicer module's Segment button).
Its entries are keyed by plane and slice and tagged with the backend name and the context
setting (:func:`cache_tag`), so masks made with context are never reused without it and
vice versa.

**File format** (:data:`FORMAT`, :meth:`SliceMaskCache.save` / :meth:`SliceMaskCache.load`): an
``.npz`` without pickles. Entry ``meta`` is a JSON object ``{"key": ..., "entries": [...]}``:
``key`` is what the masks depend on besides the prompts (:meth:`SliceMaskCache.file_key`:
format, image digest, backend, checkpoint, crop); each entry is ``{"plane": "axial" |
"coronal" | "sagittal", "slice": k, "signature": ..., "backend": tag, "masks": [{"structure",
"x0", "y0", "array"}]}``, where ``array`` names the boolean ``[x, y]`` array stored beside
``meta``. Files of another key (another image, backend, checkpoint, crop setting or format
version) load as an empty cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..prompts import PLANES, Prompt, plane_name

__all__ = ["FORMAT", "SliceMaskCache", "cache_tag", "prompt_signature"]

#: the ``format`` of :meth:`SliceMaskCache.file_key` (version 2: entries record their plane).
FORMAT = "basalseg-slice-mask-cache/2"

log = logging.getLogger("basalseg")


def cache_tag(backend_name: str, context: bool = False) -> str:
    """What a :class:`SliceMaskCache` entry records besides the prompts: the backend's name, plus
    ``+context3`` for masks made with the 3-slice context."""
    return f"{backend_name}+context3" if context else backend_name


def prompt_signature(prompts: list[Prompt]) -> str:
    """A stable hash of one slice's prompts (structure, box, points, labels)."""
    payload = json.dumps([p.to_dict() for p in sorted(prompts, key=lambda p: p.structure)], sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()


@dataclass
class SliceMaskCache:
    """Masks already computed, per slice: ``{key: (signature, tag, {structure_key: (x0, y0, mask_xy)})}``.

    ``key`` is the slice index ``k`` for an axial slice and ``(plane, k)`` for a coronal or
    sagittal one (:meth:`key`). ``tag`` is :func:`cache_tag` of the backend name and the context
    setting: an entry is reused only for the same prompts, backend and context. ``mask_xy`` is a
    boolean array indexed ``[x, y]`` placed at offset ``(x0, y0)`` of the slice.
    """

    entries: dict = field(default_factory=dict)

    @staticmethod
    def key(k: int, axis: int = 2):
        """The entry key of slice ``k`` across ``axis``."""
        return int(k) if axis == 2 else (plane_name(axis), int(k))

    def get(self, k: int, signature: str, backend: str, *, context: bool = False, axis: int = 2):
        entry = self.entries.get(self.key(k, axis))
        if entry is not None and entry[0] == signature and entry[1] == cache_tag(backend, context):
            return entry[2]
        return None

    def put(self, k: int, signature: str, backend: str, masks: dict, *, context: bool = False, axis: int = 2) -> None:
        self.entries[self.key(k, axis)] = (signature, cache_tag(backend, context), masks)

    # -- on disk ---------------------------------------------------------------------------
    @staticmethod
    def file_key(volume, foundation: str, checkpoint: str | None, crop: bool) -> dict:
        """What saved masks depend on besides the prompts (which each entry's signature covers):
        the format, a digest of the image (voxels, affine, shape; ``volume`` is a
        :class:`basalseg.imageio.Volume`), the backend, its checkpoint and the crop setting."""
        digest = hashlib.sha1()
        digest.update(np.ascontiguousarray(volume.data, dtype=np.float32).tobytes())
        digest.update(np.asarray(volume.affine, dtype=np.float64).round(6).tobytes())
        digest.update(repr(tuple(volume.shape)).encode())
        return {"format": FORMAT, "image": digest.hexdigest(), "foundation": foundation,
                "checkpoint": checkpoint or "", "crop": bool(crop)}

    def save(self, path: str | os.PathLike, key: dict) -> None:
        """Write the cache to ``path`` (module docstring's format), atomically (temporary file,
        then rename), entries of every plane included.

        Raises:
            OutputWriteError: the file cannot be written (no partial file is left).
        """
        from ..staging import atomic_write_bytes

        arrays: dict[str, np.ndarray] = {}
        entries = []
        for entry_key, (signature, tag, masks) in sorted(self.entries.items(), key=lambda kv: _sort_key(kv[0])):
            plane, k = ("axial", entry_key) if isinstance(entry_key, (int, np.integer)) else entry_key
            items = []
            for structure, (x0, y0, mask) in sorted(masks.items()):
                name = f"m{len(arrays)}"
                arrays[name] = np.asarray(mask, dtype=bool)
                items.append({"structure": structure, "x0": int(x0), "y0": int(y0), "array": name})
            entries.append({"plane": str(plane), "slice": int(k), "signature": signature, "backend": tag,
                            "masks": items})
        buffer = io.BytesIO()
        np.savez_compressed(buffer, meta=np.array(json.dumps({"key": key, "entries": entries})), **arrays)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike, key: dict) -> SliceMaskCache:
        """The cache saved at ``path`` when it was made for ``key``, else an empty one (never
        raises for a missing, stale or unreadable file: the masks are simply recomputed; a stale
        or unreadable file is logged)."""
        cache = cls()
        path = Path(path)
        if not path.is_file():
            return cache
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("key") != key:
                    log.info("slice-mask cache %s was made for another image, backend or format; starting afresh",
                             path)
                    return cache
                for entry in meta["entries"]:
                    masks = {item["structure"]: (int(item["x0"]), int(item["y0"]),
                                                 np.array(data[item["array"]], dtype=bool))
                             for item in entry["masks"]}
                    k = cls.key(int(entry["slice"]), PLANES[entry.get("plane", "axial")])
                    cache.entries[k] = (str(entry["signature"]), str(entry["backend"]), masks)
        except Exception as exc:  # a damaged cache only costs time
            log.warning("ignoring unreadable slice-mask cache %s (%s)", path, exc)
            return cls()
        return cache


def _sort_key(entry_key) -> tuple:
    """Axial entries (``k``) first in slice order, then ``(plane, k)`` entries."""
    if isinstance(entry_key, (int, np.integer)):
        return (0, "", int(entry_key))
    return (1, str(entry_key[0]), int(entry_key[1]))
