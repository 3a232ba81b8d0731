"""The widget's Setup section: what is missing, and the explicit Install dependencies step.

Used by ``BasalSegSAMWidget`` only (imports Qt and Slicer); the installing itself is
:func:`.dependencies.installDependencies` (torch and torchvision through the PyTorch extension,
the rest with pip, torch/torchvision/numpy pinned). Here:

* the button is disabled while installing, and a second click (e.g. from events processed while
  pip runs) is ignored, so installs never nest;
* a failure shows **one** error dialog with the cause (not a second one on top of it);
* when packages this session had already loaded were changed, the user is told that Slicer
  must be restarted and offered the restart.
"""

from __future__ import annotations

import logging
from typing import Callable

import slicer
from slicer.i18n import tr as _

from . import dependencies

__all__ = ["DependencyPanel"]


class DependencyPanel:
    """Args: ``ui``; ``showStatus(text, error=False)``; ``changed()`` called when readiness may
    have changed (the widget updates its buttons)."""

    def __init__(self, ui, showStatus: Callable[..., None], changed: Callable[[], None]):
        self.ui = ui
        self._showStatus = showStatus
        self._changed = changed
        self.ready = False
        self.installing = False
        self.restartNeeded = False

    def setup(self) -> None:
        self.ui.installDependenciesButton.clicked.connect(self.onInstall)
        self.refresh()

    def refresh(self) -> None:
        missing = dependencies.missingRequirements()
        torch = dependencies.torchVersion()
        self.ready = torch is not None and not missing and not self.restartNeeded
        if self.restartNeeded:
            self.ui.dependenciesLabel.setText(_("Dependencies were installed. Restart Slicer to use BasalSegSAM."))
            self.ui.dependenciesCollapsibleButton.setCollapsed(False)
        elif self.ready:
            self.ui.dependenciesLabel.setText(_("All dependencies are installed (PyTorch {version}).").format(version=torch))
            self.ui.dependenciesCollapsibleButton.setCollapsed(True)
        else:
            needed = ([] if torch is not None else [_("PyTorch and torchvision (through the PyTorch extension)")]) + \
                [f"{req}" + (f" (have {have})" if have else "") for req, have in missing]
            self.ui.dependenciesLabel.setText(_("Missing: {names}. Click Install dependencies.").format(names=", ".join(needed)))
            self.ui.dependenciesCollapsibleButton.setCollapsed(False)
        self.ui.installDependenciesButton.setEnabled(not self.installing)
        self._changed()

    def _progress(self, text: str) -> None:
        """Show an install step now: repaint, but deliver no clicks (they could start a second install)."""
        import qt

        self._showStatus(text)
        slicer.app.processEvents(qt.QEventLoop.ExcludeUserInputEvents)

    def onInstall(self) -> None:
        if self.installing:  # a click delivered while pip runs: never a nested install
            return
        missing = dependencies.missingRequirements()
        torchMissing = dependencies.torchVersion() is None
        if not missing and not torchMissing:
            slicer.util.infoDisplay(_("All BasalSegSAM dependencies are already installed."))
            return
        listing = ([_("PyTorch and torchvision, through the PyTorch extension")] if torchMissing else []) + \
            [str(req) for req, _have in missing]
        if not slicer.util.confirmOkCancelDisplay(
                _("BasalSegSAM will now install these Python packages into Slicer:\n\n  {listing}\n\nPyTorch, "
                  "torchvision and numpy are kept as they are. This downloads several hundred MB and can take "
                  "several minutes. Continue?").format(listing="\n  ".join(listing)),
                windowTitle=_("Install BasalSegSAM dependencies")):
            return
        self.installing = True
        self.ui.installDependenciesButton.setEnabled(False)
        self._changed()
        report = None
        try:
            with slicer.util.WaitCursor():
                report = dependencies.installDependencies(slicer.util.pip_install, dependencies.pyTorchExtensionInstaller(),
                                                          log=self._progress)
        except Exception as exc:  # one dialog with the cause, nothing else
            logging.exception("BasalSegSAM: installing dependencies failed")
            self._showStatus(_("Installing the dependencies failed: {error}").format(error=exc), error=True)
            slicer.util.errorDisplay(_("Installing the BasalSegSAM dependencies failed.\n\n{error}").format(error=exc),
                                     windowTitle=_("Install BasalSegSAM dependencies"))
        finally:
            self.installing = False
        if report is not None:
            self.restartNeeded = report.restartNeeded
            self._showStatus(report.message())
        self.refresh()
        if report is not None and report.restartNeeded and slicer.util.confirmYesNoDisplay(
                _("Packages that Slicer had already loaded were changed. Restart Slicer now?"),
                windowTitle=_("Restart needed")):
            slicer.util.restart()
