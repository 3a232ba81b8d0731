"""The SAM-2.1 model catalogue: official checkpoint URLs and the matching ``sam2`` configs.

Pure data, no network and no heavy imports (the Slicer module and the command line both read
it). Checkpoints are fetched into the user cache by :func:`basalseg.download.fetch_cached`.

Meta publishes no checksums for these files, so every entry has ``sha256=None``: the first
download is trusted and its sha256 recorded in ``<cache>/checksums.json`` (trust on first use);
later loads are verified against that record. Sizes are approximate (for progress messages and
disk-space hints), not a check.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CheckpointError

__all__ = ["ModelEntry", "UnknownModelError", "CATALOGUE", "get_entry", "list_entries", "entry_for_filename"]

_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"


class UnknownModelError(CheckpointError, KeyError):
    """A model name that is not in the catalogue (the message lists the valid names)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelEntry:
    """One downloadable checkpoint.

    Attributes:
        name: catalogue name, also the checkpoint file's stem (``"sam2.1_hiera_tiny"``).
        url: official download address of the ``.pt`` file.
        sha256: expected lowercase hex digest, or ``None`` when the publisher gives none (then
            the first download's digest is recorded and trusted, see :mod:`basalseg.download`).
        config: the config name inside the ``sam2`` package, as ``sam2.build_sam.build_sam2``
            takes it (``"configs/sam2.1/sam2.1_hiera_t.yaml"``).
        size_mb: approximate download size in megabytes (10^6 bytes).
        description: one line for menus and ``--help``.
    """

    name: str
    url: str
    sha256: str | None
    config: str
    size_mb: float
    description: str

    @property
    def filename(self) -> str:
        """The file name the checkpoint is stored under in the cache (last part of the URL)."""
        return self.url.rsplit("/", 1)[-1]


def _entry(name: str, config_suffix: str, size_mb: float, description: str) -> ModelEntry:
    return ModelEntry(
        name=name,
        url=f"{_BASE_URL}/{name}.pt",
        sha256=None,  # not published by Meta; recorded on first download (trust on first use)
        config=f"configs/sam2.1/sam2.1_hiera_{config_suffix}.yaml",
        size_mb=size_mb,
        description=description,
    )


#: name -> entry, smallest model first.
CATALOGUE: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        _entry("sam2.1_hiera_tiny", "t", 156.0, "SAM 2.1 Hiera-T (39 M parameters): fastest, the CPU choice"),
        _entry("sam2.1_hiera_small", "s", 185.0, "SAM 2.1 Hiera-S (46 M parameters)"),
        _entry("sam2.1_hiera_base_plus", "b+", 324.0, "SAM 2.1 Hiera-B+ (81 M parameters)"),
        _entry("sam2.1_hiera_large", "l", 898.0, "SAM 2.1 Hiera-L (224 M parameters): most accurate, needs a GPU"),
    )
}


def list_entries() -> list[ModelEntry]:
    """All catalogue entries, smallest model first."""
    return list(CATALOGUE.values())


def get_entry(name: str) -> ModelEntry:
    """The catalogue entry called ``name``; a trailing ``.pt`` is accepted.

    Raises:
        UnknownModelError: ``name`` is not in the catalogue; the message lists the valid names.
            It is a :class:`~basalseg.errors.CheckpointError` and a ``KeyError``.
    """
    key = str(name).strip()
    if key.endswith(".pt"):
        key = key[:-3]
    try:
        return CATALOGUE[key]
    except KeyError:
        raise UnknownModelError(
            f"unknown SAM-2 model {name!r}; choose one of {', '.join(CATALOGUE)}"
        ) from None


def entry_for_filename(filename: str) -> ModelEntry | None:
    """The entry whose checkpoint file is called ``filename`` (a name or path), else ``None``.

    Used to infer the config of a checkpoint given as a path (``.../sam2.1_hiera_small.pt``).
    """
    base = str(filename).replace("\\", "/").rsplit("/", 1)[-1]
    for entry in CATALOGUE.values():
        if base == entry.filename:
            return entry
    return None
