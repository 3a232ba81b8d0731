"""A small ``slicer.ScriptedLoadableModule``: the base classes a scripted module derives from.

* ``ScriptedLoadableModuleWidget``: ``parent`` (a panel widget with a vertical layout and
  ``isEntered``), ``layout``, ``moduleName``, ``resourcePath()``; ``setup()`` adds nothing (the
  real one adds the Reload/Test buttons in developer mode).
* ``ScriptedLoadableModuleLogic.getParameterNode()``: the scene's singleton
  ``vtkMRMLScriptedModuleNode`` tagged with the module name, made on first use, as in Slicer.
"""

from __future__ import annotations

import unittest
from pathlib import Path

from PySide6 import QtWidgets

from .qtshim import pythonQtClass

MODULE_DIR = Path(__file__).resolve().parents[3] / "BasalSegSAM"


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        if parent is None:
            parent = pythonQtClass(QtWidgets.QWidget)()
            parent.setLayout(QtWidgets.QVBoxLayout())
            parent.isEntered = True
        self.parent = parent
        self.layout = parent.layout()
        self.moduleName = self.__class__.__name__[: -len("Widget")]

    def resourcePath(self, filename: str) -> str:
        return str(MODULE_DIR / "Resources" / filename)

    def setup(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        name = self.__class__.__name__
        self.moduleName = name[: -len("Logic")] if name.endswith("Logic") else name

    def getParameterNode(self):
        import slicer

        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=0):
        print(message)
