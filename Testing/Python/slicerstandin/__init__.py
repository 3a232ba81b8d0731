"""Stand-ins for the parts of 3D Slicer that PyPI does not have, to run the module's widget.

Real: the MRML scene and logics (``slicer-core``: the same C++ classes as Slicer), Slicer's own
``slicer.util`` (shipped in ``slicer-core``) except the functions below, Qt widgets (PySide6,
rendered offscreen), the module's ``.ui`` file and all of the module's code.

Stand-ins (each a small module here):

* ``qt``: PySide6 presented as PythonQt does it (:mod:`.qtshim`); dialogs answer from a queue.
* ``ctk`` and the ``qMRML*`` widgets of the .ui (:mod:`.mrmlwidgets`).
* ``slicer.parameterNodeWrapper`` (:mod:`.parameterwrapper`), ``slicer.ScriptedLoadableModule``,
  ``slicer.i18n`` (identity translation that records what was translated), ``slicer.app``.
* In ``slicer.util``: the message and confirmation displays (answers from
  :attr:`StandIn.confirmations`, messages kept in :attr:`StandIn.messages`), ``mainWindow``,
  ``setSliceViewerLayers`` (sets the slice composite nodes' background), ``pip_install``, ``restart``.
* The Red, Yellow and Green slice nodes and their composite nodes (Slicer's layout makes them).

What this cannot show: Slicer's look, the slice views with the Markups drawn in them, mouse
interaction with handles, PythonQt's own conversions. Those need a run inside Slicer
(``BasalSegSAMTest``).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

__all__ = ["StandIn"]

MODULE_DIR = Path(__file__).resolve().parents[3] / "BasalSegSAM"
#: Modules that import qt or the stand-ins: dropped from sys.modules before and after a session.
_FRESH = ("BasalSegSAM", "BasalSegSAMLib.promptpanel", "BasalSegSAMLib.resultpanel", "BasalSegSAMLib.installpanel",
          "BasalSegSAMLib.selftest")


class _App:
    applicationName = "Slicer"

    def __init__(self, temporaryPath: str, translated: list):
        self.temporaryPath = temporaryPath
        self._translated = translated

    def processEvents(self, flags=None):
        from PySide6 import QtCore, QtWidgets

        QtWidgets.QApplication.processEvents(QtCore.QEventLoop.AllEvents if flags is None else flags)

    def testingEnabled(self):
        return False

    def setOverrideCursor(self, cursor):
        from PySide6 import QtWidgets

        QtWidgets.QApplication.setOverrideCursor(cursor)

    def restoreOverrideCursor(self):
        from PySide6 import QtWidgets

        QtWidgets.QApplication.restoreOverrideCursor()

    def translate(self, context, text):
        self._translated.append((context, text))
        return text

    def layoutManager(self):
        import slicer

        return _LayoutManager(slicer.mrmlScene)


class _LayoutManager:
    """``slicer.app.layoutManager()``: only ``sliceWidget(name).mrmlSliceNode()``."""

    def __init__(self, scene):
        self._scene = scene

    def sliceWidget(self, name):
        node = self._scene.GetNodeByID(f"vtkMRMLSliceNode{name}")
        return types.SimpleNamespace(mrmlSliceNode=lambda: node)


class _Module:
    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


class StandIn:
    """Installs the stand-ins around a fresh scene; :meth:`uninstall` puts everything back.

    Attributes:
        scene: the MRML scene (also ``slicer.mrmlScene``).
        messages: ``(kind, text)`` of every message and confirmation shown.
        confirmations: answers (True/False) for the next confirmations, in order.
        layers: the ``setSliceViewerLayers`` calls (their keyword arguments).
        pipCalls, restarts: what ``pip_install`` and ``restart`` were called with.
        translated: ``(context, text)`` of every string translated.
    """

    def __init__(self, tempDir: str):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        from PySide6 import QtWidgets

        self.qapp = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["BasalSegSAM-test"])
        self.tempDir = tempDir
        self.messages: list[tuple[str, str]] = []
        self.confirmations: list[bool] = []
        self.layers: list[dict] = []
        self.pipCalls: list = []
        self.restarts = 0
        self.translated: list[tuple[str, str]] = []
        self._saved: dict = {}
        self._savedUtil: dict = {}

    # -- install / uninstall ------------------------------------------------------------------
    def install(self):
        import slicer
        import slicer.util

        from test_slicer_helpers import make_scene

        from . import parameterwrapper, qtshim, scripted

        for name in _FRESH:
            sys.modules.pop(name, None)
        self._saved = {name: sys.modules.get(name) for name in ("qt", "ctk", "slicer.ScriptedLoadableModule",
                                                                "slicer.parameterNodeWrapper", "slicer.i18n")}
        self._savedSlicer = {name: getattr(slicer, name) for name in ("mrmlScene", "modules", "app", "i18n",
                                                                      "ScriptedLoadableModule", "parameterNodeWrapper")
                             if hasattr(slicer, name)}
        qtshim.ANSWERS["file"].clear()
        qtshim.ANSWERS["messagebox"].clear()
        qtshim.ASKED.clear()
        sys.modules["qt"] = qtshim
        sys.modules["ctk"] = types.ModuleType("ctk")
        i18n = types.ModuleType("slicer.i18n")
        i18n.translate = lambda context, text: slicer.app.translate(context, text)
        i18n.tr = lambda text: slicer.app.translate("BasalSegSAM", text)
        for name, module in (("slicer.ScriptedLoadableModule", scripted), ("slicer.parameterNodeWrapper", parameterwrapper),
                             ("slicer.i18n", i18n)):
            sys.modules[name] = module
            setattr(slicer, name.split(".")[1], module)

        self.scene, logics = make_scene()
        self.logics = logics  # the application logic must outlive the install: module logics ask it
        slicer.mrmlScene = self.scene
        slicer.modules = types.SimpleNamespace(**{k: _Module(v) for k, v in logics.items() if k != "app"})
        slicer.app = _App(self.tempDir, self.translated)
        self._addSliceViews()
        self._patchUtil(slicer.util)
        return self

    def uninstall(self):
        import slicer
        import slicer.util

        self.scene.Clear(1)
        for name, value in self._savedUtil.items():
            setattr(slicer.util, name, value)
        for name in ("mrmlScene", "modules", "app", "i18n", "ScriptedLoadableModule", "parameterNodeWrapper"):
            if name in self._savedSlicer:
                setattr(slicer, name, self._savedSlicer[name])
            elif hasattr(slicer, name):
                delattr(slicer, name)
        for name, module in self._saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name in _FRESH:
            sys.modules.pop(name, None)

    # -- pieces ---------------------------------------------------------------------------------
    def _addSliceViews(self):
        import slicer

        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene)
        for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
            node = self.scene.CreateNodeByClass("vtkMRMLSliceNode")
            node.UnRegister(None)
            node.SetName(name)
            node.SetLayoutName(name)
            node.SetSingletonTag(name)
            node.SetDimensions(256, 256, 1)
            node.SetFieldOfView(250.0, 250.0, 1.0)
            self.scene.AddNode(node)
            node.SetOrientation(orientation)
            composite = self.scene.CreateNodeByClass("vtkMRMLSliceCompositeNode")
            composite.UnRegister(None)
            composite.SetLayoutName(name)
            composite.SetSingletonTag(name)
            self.scene.AddNode(composite)

    def registerWidget(self, widget):
        """Make ``slicer.modules.basalsegsam.widgetRepresentation().self()`` return ``widget``."""
        import slicer

        representation = types.SimpleNamespace(self=lambda: widget)
        slicer.modules.basalsegsam = types.SimpleNamespace(widgetRepresentation=lambda: representation)

    def sliceNode(self, name="Red"):
        return self.scene.GetNodeByID(f"vtkMRMLSliceNode{name}")

    def compositeNode(self, name="Red"):
        return self.scene.GetNodeByID(f"vtkMRMLSliceCompositeNode{name}")

    def _patchUtil(self, util):
        names = ("errorDisplay", "infoDisplay", "warningDisplay", "confirmOkCancelDisplay", "confirmYesNoDisplay",
                 "mainWindow", "setSliceViewerLayers", "pip_install", "restart")
        self._savedUtil = {name: getattr(util, name) for name in names}

        def show(kind):
            def display(text, *args, **kwargs):
                self.messages.append((kind, text))
            return display

        def confirm(kind):
            def ask(text, *args, **kwargs):
                self.messages.append((kind, text))
                if not self.confirmations:
                    raise AssertionError(f"unexpected confirmation: {text}")
                return self.confirmations.pop(0)
            return ask

        def setSliceViewerLayers(background="keep-current", **kwargs):
            self.layers.append(dict(background=background, **kwargs))
            if background != "keep-current":
                for name in ("Red", "Yellow", "Green"):
                    self.compositeNode(name).SetBackgroundVolumeID(background.GetID() if background else None)

        def restart():
            self.restarts += 1

        util.errorDisplay = show("error")
        util.infoDisplay = show("info")
        util.warningDisplay = show("warning")
        util.confirmOkCancelDisplay = confirm("confirm")
        util.confirmYesNoDisplay = confirm("confirm")
        util.mainWindow = lambda: None
        util.setSliceViewerLayers = setSliceViewerLayers
        util.pip_install = lambda args, **kwargs: self.pipCalls.append((args, kwargs))
        util.restart = restart

    # -- helpers for tests ------------------------------------------------------------------------
    def answerFile(self, path: str):
        from . import qtshim

        qtshim.ANSWERS["file"].append(path)

    def answerQuestion(self, buttonText: str):
        from . import qtshim

        qtshim.ANSWERS["messagebox"].append(buttonText)

    @property
    def asked(self):
        from . import qtshim

        return qtshim.ASKED

    def processEvents(self, seconds: float = 0.0):
        """Let Qt run (timers fire) for about ``seconds``."""
        import time

        from PySide6 import QtWidgets

        end = time.monotonic() + seconds
        while True:
            QtWidgets.QApplication.processEvents()
            if time.monotonic() >= end:
                return
            time.sleep(0.02)

    def waitFor(self, condition, timeout: float = 60.0) -> bool:
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.processEvents()
            if condition():
                return True
            time.sleep(0.05)
        return condition()
