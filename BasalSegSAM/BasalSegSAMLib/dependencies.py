"""Which Python packages BasalSegSAM still needs, and the explicit install step.

Nothing is installed at import time or behind the user's back: the widget shows what is
missing and installs only when the user clicks *Install dependencies*.

* **torch** comes from the PyTorch extension (``PyTorchUtils``), which picks a build that fits
  the computer's GPU driver; when that extension is missing, the user is told to install it
  (Extensions Manager -> PyTorch) and restart Slicer. torch is never pip-installed here.
* Everything else comes from ``Resources/requirements.txt`` (``>=`` floors) through
  ``slicer.util.pip_install``, in one call, after torch (so pip sees torch as satisfied).

The functions take their installers as arguments, so they are tested without Slicer. Only the
standard library is imported (``packaging`` is used when present for version comparison).
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

__all__ = [
    "Requirement",
    "readRequirements",
    "missingRequirements",
    "torchVersion",
    "installDependencies",
    "pyTorchExtensionInstaller",
    "DependencyError",
    "requirementsFile",
    "TORCH_REQUIREMENT",
]

log = logging.getLogger("BasalSegSAM")

#: torch version the pipeline needs (passed to PyTorchUtils).
TORCH_REQUIREMENT = ">=2.2"

_SPLIT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")


class DependencyError(RuntimeError):
    """A dependency is missing and cannot be installed here; the message says what to do."""


@dataclass(frozen=True)
class Requirement:
    """One ``requirements.txt`` line: distribution ``name`` and its specifier (``">=1.3"``)."""

    name: str
    specifier: str = ""
    line: str = ""

    def __str__(self) -> str:
        return self.line or f"{self.name}{self.specifier}"


def requirementsFile() -> Path:
    """The module's ``Resources/requirements.txt``."""
    return Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"


def readRequirements(path: Optional[Path] = None) -> list[Requirement]:
    """Parse a requirements file (comments and blank lines skipped; markers are ignored)."""
    text = Path(path or requirementsFile()).read_text(encoding="utf-8")
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = _SPLIT.match(line)
        if match is None:
            raise ValueError(f"cannot read requirement line {raw!r}")
        out.append(Requirement(match.group(1), match.group(3).replace(" ", ""), line))
    return out


def _versionTuple(text: str) -> tuple:
    parts = []
    for piece in re.split(r"[.+-]", text):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def _satisfies(installed: str, specifier: str) -> bool:
    if not specifier:
        return True
    try:
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(specifier).contains(installed, prereleases=True)
    except ImportError:  # pragma: no cover - packaging ships with pip/Slicer
        pass
    for clause in specifier.split(","):
        match = re.match(r"(>=|==|>|<=|<|!=)(.+)", clause.strip())
        if match is None:
            continue
        op, wanted = match.group(1), _versionTuple(match.group(2))
        have = _versionTuple(installed)
        ok = {">=": have >= wanted, ">": have > wanted, "==": have == wanted, "<=": have <= wanted,
              "<": have < wanted, "!=": have != wanted}[op]
        if not ok:
            return False
    return True


def _installedVersion(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missingRequirements(requirements: Optional[list[Requirement]] = None,
                        versionOf: Callable[[str], Optional[str]] = _installedVersion) -> list[tuple[Requirement, Optional[str]]]:
    """Requirements that are not installed or too old: ``[(requirement, installed version or None)]``."""
    out = []
    for req in requirements if requirements is not None else readRequirements():
        installed = versionOf(req.name)
        if installed is None or not _satisfies(installed, req.specifier):
            out.append((req, installed))
    return out


def torchVersion(versionOf: Callable[[str], Optional[str]] = _installedVersion) -> Optional[str]:
    """The installed torch version, or None."""
    return versionOf("torch")


def pyTorchExtensionInstaller() -> Optional[Callable[[], object]]:
    """A function that installs torch through the PyTorch extension's ``PyTorchUtils`` logic, or
    None when that extension is not installed (only works inside Slicer)."""
    try:
        import PyTorchUtils  # noqa: F401  (the PyTorch extension's module)
    except ImportError:
        return None

    def install():
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise DependencyError("PyTorch was not installed (the PyTorch extension reported a failure)")
        return torch

    return install


def installDependencies(pipInstall: Callable[[str], object], torchInstaller: Optional[Callable[[], object]] = None,
                        requirements: Optional[list[Requirement]] = None,
                        versionOf: Callable[[str], Optional[str]] = _installedVersion,
                        log: Callable[[str], None] = log.info) -> list[str]:
    """Install what is missing: torch first (PyTorch extension), then the requirements (pip).

    Args:
        pipInstall: installs a space-separated requirement string (``slicer.util.pip_install``).
        torchInstaller: installs torch (see :func:`pyTorchExtensionInstaller`); None when the
            PyTorch extension is not available.
        requirements: default ``Resources/requirements.txt``.
        versionOf: distribution name -> installed version (injectable for tests).
        log: progress messages for the user.

    Returns:
        What was installed (``"torch"`` and requirement lines).

    Raises:
        DependencyError: torch is missing and the PyTorch extension is not installed (the
        message says how to get it), or an install step failed (with its cause).
    """
    installed: list[str] = []
    if torchVersion(versionOf) is None:
        if torchInstaller is None:
            raise DependencyError(
                "PyTorch is not installed and the PyTorch extension is missing. Install the 'PyTorch' "
                "extension from the Extensions Manager, restart Slicer, then click Install dependencies again.")
        log("Installing PyTorch through the PyTorch extension (this can take several minutes)...")
        try:
            torchInstaller()
        except DependencyError:
            raise
        except Exception as exc:
            raise DependencyError(f"PyTorch installation failed: {exc}") from exc
        installed.append("torch")
    missing = missingRequirements(requirements, versionOf)
    if missing:
        lines = [str(req) for req, _ in missing]
        log("Installing " + ", ".join(lines) + " with pip...")
        try:
            # Requirement lines hold no spaces, so one space-separated string reads the same whether
            # slicer.util.pip_install splits it on spaces or with shlex (no shell is involved).
            pipInstall(" ".join(line.replace(" ", "") for line in lines))
        except Exception as exc:
            raise DependencyError(f"pip could not install {', '.join(lines)}: {exc}") from exc
        installed.extend(lines)
    log("All BasalSegSAM dependencies are installed." if not installed else "Installed: " + ", ".join(installed))
    return installed
