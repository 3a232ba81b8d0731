"""``qt`` as Slicer's PythonQt presents it, built on PySide6 (installed as ``sys.modules["qt"]``).

What PythonQt does differently from PySide6, and this module reproduces for the widget's code:

* A Qt property is read and written as a Python attribute (``button.enabled``,
  ``table.rowCount``, ``combo.currentText``), shadowing a getter of the same name; setter
  methods (``setEnabled``) stay. :func:`pythonQtClass` makes such a subclass of any widget class
  (the .ui loader below builds every widget from one), plus ``name`` for ``objectName``.
* ``QFileDialog.getOpenFileName`` / ``getSaveFileName`` return a path string (PySide6: a tuple).
* ``QUiLoader`` knows the custom widgets of the .ui (:mod:`.mrmlwidgets`).

Dialogs never block: ``QMessageBox.exec_`` and the file dialogs take their answers from
:data:`ANSWERS` (filled by a test) and record what they were asked in :data:`ASKED`.
"""

from __future__ import annotations

import functools

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

for _module in (QtCore, QtGui, QtWidgets):
    globals().update({name: getattr(_module, name) for name in dir(_module) if name.startswith("Q")})
Qt = QtCore.Qt

#: Answers for dialogs, by kind: ``"file"`` (path or "" for cancel), ``"messagebox"`` (button text).
ANSWERS: dict[str, list] = {"file": [], "messagebox": []}
#: What the dialogs were asked: ``(kind, text)``.
ASKED: list[tuple[str, str]] = []


def _propertyAttribute(name: str):
    return property(lambda self: QtCore.QObject.property(self, name),
                    lambda self, value: QtCore.QObject.setProperty(self, name, value))


@functools.lru_cache(maxsize=None)
def pythonQtClass(base):
    """A subclass of ``base`` whose Qt properties are Python attributes, as in PythonQt."""
    namespace = {"name": property(lambda self: QtCore.QObject.objectName(self),
                                  lambda self, value: QtCore.QObject.setObjectName(self, value)),
                 "className": lambda self: self.metaObject().className()}
    meta = base.staticMetaObject
    for n in range(meta.propertyCount()):
        prop = meta.property(n).name()
        if prop not in ("objectName",):
            namespace[prop] = _propertyAttribute(prop)
    return type(base.__name__, (base,), namespace)


class QUiLoader(QtUiTools.QUiLoader):
    """Builds every widget of a .ui file as a PythonQt-style class (custom widgets included)."""

    def createWidget(self, className, parent=None, name=""):
        from . import mrmlwidgets

        cls = mrmlwidgets.CUSTOM_WIDGETS.get(className) or pythonQtClass(getattr(QtWidgets, className))
        widget = cls(parent)
        widget.setObjectName(name)
        return widget


class QFileDialog(QtWidgets.QFileDialog):
    @staticmethod
    def _answer(title):
        ASKED.append(("file", title))
        if not ANSWERS["file"]:
            raise AssertionError(f"unexpected file dialog: {title}")
        return ANSWERS["file"].pop(0)

    @staticmethod
    def getOpenFileName(parent=None, caption="", directory="", filter=""):
        return QFileDialog._answer(caption)

    @staticmethod
    def getSaveFileName(parent=None, caption="", directory="", filter=""):
        ASKED.append(("file-default", directory))
        return QFileDialog._answer(caption)


class QMessageBox(pythonQtClass(QtWidgets.QMessageBox)):
    """Answers with the button whose text is the next ``ANSWERS["messagebox"]`` entry."""

    def exec_(self):
        ASKED.append(("messagebox", QtWidgets.QMessageBox.text(self)))
        if not ANSWERS["messagebox"]:
            raise AssertionError(f"unexpected question: {QtWidgets.QMessageBox.text(self)}")
        wanted = ANSWERS["messagebox"].pop(0)
        self._clicked = next((b for b in self.buttons() if b.text().replace("&", "") == wanted), None)
        if self._clicked is None:
            raise AssertionError(f"no button {wanted!r} in {[b.text() for b in self.buttons()]}")
        return 0

    exec = exec_

    def clickedButton(self):
        return getattr(self, "_clicked", None)
