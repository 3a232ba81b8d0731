"""Errors the pipeline raises on purpose.

Each carries a one-line message that names the problem; the command line prints it as
``basalseg: error: <message>`` and exits non-zero, the Slicer module shows it in the UI.
"""

from __future__ import annotations

__all__ = [
    "BasalSegError",
    "InputImageError",
    "CheckpointError",
    "PromptsError",
    "UnknownStructureError",
    "OutputExistsError",
    "OutputWriteError",
    "DownloadError",
    "BackendUnavailableError",
    "Cancelled",
]


class BasalSegError(Exception):
    """Base class: an expected failure with a message fit for the user."""

    exit_code = 2


class InputImageError(BasalSegError, ValueError):
    """The input image is unreadable or unusable (dimensionality, empty, constant, NaN/Inf)."""


class CheckpointError(BasalSegError):
    """A weights file is missing, corrupt, of the wrong architecture or fails its checksum."""


class PromptsError(BasalSegError, ValueError):
    """A prompts.json file is malformed or out of range."""


class UnknownStructureError(PromptsError, KeyError):
    """A structure name or label value that BasalSegSAM does not segment."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OutputExistsError(BasalSegError):
    """The output folder already holds results and overwriting was not asked for."""


class OutputWriteError(BasalSegError):
    """Outputs could not be written (permissions, disk full); nothing partial is left."""


class DownloadError(BasalSegError):
    """A model download failed or its checksum did not match."""


class BackendUnavailableError(BasalSegError):
    """A foundation backend cannot run here (package missing, no checkpoint while offline)."""


class Cancelled(BasalSegError):
    """The user cancelled the run."""

    exit_code = 130
