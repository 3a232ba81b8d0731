"""Stand-ins for the custom widgets of ``BasalSegSAM.ui`` (Slicer's are C++: qMRML*, ctk*).

Each does, on a real MRML scene, the part of its real counterpart the module uses:

* ``qMRMLWidget``: ``setMRMLScene`` passes the scene on to its children (in the .ui, its
  ``mrmlSceneChanged`` signal is connected to the selectors' and the table view's ``setMRMLScene``).
* ``qMRMLNodeComboBox``: lists the scene's nodes of ``nodeTypes`` (exact classes unless
  ``showChildNodeTypes``), an entry for none when ``noneEnabled`` (``noneDisplay``), follows
  nodes added and removed, ``currentNode()`` / ``setCurrentNode()`` / ``currentNodeChanged``.
* ``qMRMLTableView``: shows a ``vtkMRMLTableNode`` (column names as headers) and follows its changes.
* ``ctkCollapsibleButton``: a titled box (``text``) whose content hides when ``collapsed``.

Their look is Qt's, not Slicer's: screenshots show the module's layout and state, not Slicer's style.
"""

from __future__ import annotations

from PySide6 import QtCore, QtWidgets

from .qtshim import pythonQtClass

__all__ = ["CUSTOM_WIDGETS"]


class qMRMLWidget(pythonQtClass(QtWidgets.QWidget)):
    mrmlSceneChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene):
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)
        for child in self.findChildren(QtWidgets.QWidget):
            if child is not self and isinstance(child, (qMRMLNodeComboBox, qMRMLTableView)):
                child.setMRMLScene(scene)

    def mrmlScene(self):
        return self._scene


class qMRMLNodeComboBox(pythonQtClass(QtWidgets.QComboBox)):
    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None
        self._types: list[str] = []
        self._showChild = True
        self._none = False
        self._noneDisplay = "None"
        self._addEnabled = self._removeEnabled = False
        self._tags: list[int] = []
        self._filling = False
        self.currentIndexChanged.connect(self._onIndexChanged)

    def _prop(attr, kind):  # noqa: N805  (a helper used in the class body)
        return QtCore.Property(kind, lambda self: getattr(self, attr),
                               lambda self, value: (setattr(self, attr, value), self._fill()))

    nodeTypes = _prop("_types", "QStringList")
    showChildNodeTypes = _prop("_showChild", bool)
    noneEnabled = _prop("_none", bool)
    noneDisplay = _prop("_noneDisplay", str)
    addEnabled = _prop("_addEnabled", bool)
    removeEnabled = _prop("_removeEnabled", bool)
    del _prop

    def setMRMLScene(self, scene):
        import slicer

        if self._scene is not None:
            for tag in self._tags:
                self._scene.RemoveObserver(tag)
        self._scene = scene
        self._tags = [scene.AddObserver(event, lambda *args: self._fill())
                      for event in (slicer.vtkMRMLScene.NodeAddedEvent, slicer.vtkMRMLScene.NodeRemovedEvent)]
        self._fill()

    def _matches(self, node) -> bool:
        if node.GetHideFromEditors():
            return False
        return any(node.IsA(t) if self._showChild else node.GetClassName() == t for t in self._types)

    def _fill(self):
        if self._scene is None:
            return
        current = self.currentNode()
        self._filling = True
        try:
            self.clear()
            if self._none:
                self.addItem(self._noneDisplay, "")
            for n in range(self._scene.GetNumberOfNodes()):
                node = self._scene.GetNthNode(n)
                if self._matches(node):
                    self.addItem(node.GetName(), node.GetID())
            index = self.findData(current.GetID()) if current is not None and current.GetScene() is not None else -1
            self.setCurrentIndex(index if index >= 0 else (0 if self.count else -1))
        finally:
            self._filling = False
        if self.currentNode() is not current:
            self.currentNodeChanged.emit(self.currentNode())

    def currentNode(self):
        if self._scene is None or self.currentIndex < 0:
            return None
        nodeId = self.itemData(self.currentIndex)
        return self._scene.GetNodeByID(nodeId) if nodeId else None

    def setCurrentNode(self, node):
        index = self.findData(node.GetID()) if node is not None else (0 if self._none else -1)
        if index >= 0 and index != self.currentIndex:
            self.setCurrentIndex(index)

    def _onIndexChanged(self, index):
        if not self._filling:
            self.currentNodeChanged.emit(self.currentNode())


class qMRMLTableView(pythonQtClass(QtWidgets.QTableWidget)):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._node = None
        self._tag = None

    def setMRMLScene(self, scene):
        pass

    def mrmlTableNode(self):
        return self._node

    def setMRMLTableNode(self, node):
        import vtk

        if self._node is not None and self._tag is not None:
            self._node.RemoveObserver(self._tag)
        self._node, self._tag = node, None
        if node is not None:
            self._tag = node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *args: self._fill())
        self._fill()

    def _fill(self):
        self.setRowCount(0)
        self.setColumnCount(0)
        if self._node is None:
            return
        table = self._node.GetTable()
        names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
        self.setColumnCount(len(names))
        self.setHorizontalHeaderLabels(names)
        self.setRowCount(table.GetNumberOfRows())
        for r in range(table.GetNumberOfRows()):
            for c in range(len(names)):
                value = table.GetValue(r, c)
                text = f"{value.ToDouble():.3f}" if value.IsDouble() or value.IsFloat() else value.ToString()
                self.setItem(r, c, QtWidgets.QTableWidgetItem(text))
        self.resizeColumnsToContents()


class ctkCollapsibleButton(pythonQtClass(QtWidgets.QGroupBox)):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._collapsed = False
        self._hiddenByCollapse: list = []

    def _getText(self):
        return QtWidgets.QGroupBox.title(self)

    def _setText(self, value):
        QtWidgets.QGroupBox.setTitle(self, value)

    text = QtCore.Property(str, _getText, _setText)

    def _getCollapsed(self):
        return self._collapsed

    def setCollapsed(self, collapsed):
        collapsed = bool(collapsed)
        if collapsed == self._collapsed:
            return
        self._collapsed = collapsed
        children = self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly)
        if collapsed:
            self._hiddenByCollapse = [w for w in children if not w.isHidden()]
            for w in self._hiddenByCollapse:
                w.setVisible(False)
            QtWidgets.QGroupBox.setTitle(self, "> " + self._getText().lstrip("> "))
            self.setMaximumHeight(self.fontMetrics().height() + 8)
        else:
            for w in self._hiddenByCollapse:
                w.setVisible(True)
            self._hiddenByCollapse = []
            QtWidgets.QGroupBox.setTitle(self, self._getText().lstrip("> "))
            self.setMaximumHeight(16777215)

    collapsed = QtCore.Property(bool, _getCollapsed, setCollapsed)


CUSTOM_WIDGETS = {cls.__name__: cls for cls in (qMRMLWidget, qMRMLNodeComboBox, qMRMLTableView, ctkCollapsibleButton)}
