"""A small ``slicer.parameterNodeWrapper`` (Slicer's is pure Python on PythonQt and not on PyPI).

Covers what ``BasalSegSAMParameterNode`` uses: typed fields with defaults, stored in the
``vtkMRMLScriptedModuleNode`` (strings and numbers as parameters, MRML nodes as node
references), ``Choice`` / ``WithinRange`` checks on assignment, ``.parameterNode``, ``AddObserver``/``RemoveObserver`` forwarded to it, and
``connectGui(ui)`` / ``disconnectGui(tag)`` binding the widgets whose dynamic property
``SlicerParameterName`` names a field, both ways: ``qMRMLNodeComboBox`` (current node),
``QComboBox`` (current text), ``QLineEdit`` (text), ``QDoubleSpinBox`` (value), ``QCheckBox``
(checked; a ``bool`` field, stored as ``True``/``False``).
"""

from __future__ import annotations

import typing

__all__ = ["parameterNodeWrapper", "Choice", "WithinRange"]


class Choice:
    def __init__(self, choices):
        self.choices = list(choices)

    def check(self, name, value):
        if value not in self.choices:
            raise ValueError(f"{name}: {value!r} is not one of {self.choices}")


class WithinRange:
    def __init__(self, low, high):
        self.low, self.high = low, high

    def check(self, name, value):
        if not (self.low <= value <= self.high):
            raise ValueError(f"{name}: {value!r} is not within [{self.low}, {self.high}]")


def parameterNodeWrapper(cls):
    import slicer

    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {}
    for name, hint in hints.items():
        base, checks = hint, []
        if typing.get_origin(hint) is typing.Annotated:
            base, *checks = typing.get_args(hint)
        fields[name] = (base, checks, getattr(cls, name, None))

    class Wrapper:
        __doc__ = cls.__doc__
        __name__ = cls.__name__

        def __init__(self, parameterNode):
            object.__setattr__(self, "parameterNode", parameterNode)
            object.__setattr__(self, "_guis", {})
            for name, (base, _checks, default) in fields.items():
                if not isinstance(base, type) or not issubclass(base, slicer.vtkMRMLNode):
                    if not parameterNode.GetParameter(name) and default is not None:
                        parameterNode.SetParameter(name, str(default))

        # the real wrapper forwards these, so VTKObservationMixin.addObserver(wrapper, ...) works
        def AddObserver(self, *args):
            return self.parameterNode.AddObserver(*args)

        def RemoveObserver(self, *args):
            return self.parameterNode.RemoveObserver(*args)

        def StartModify(self):
            return self.parameterNode.StartModify()

        def EndModify(self, wasModifying):
            return self.parameterNode.EndModify(wasModifying)

        def __getattr__(self, name):
            if name not in fields:
                raise AttributeError(name)
            base = fields[name][0]
            node = object.__getattribute__(self, "parameterNode")
            if isinstance(base, type) and issubclass(base, slicer.vtkMRMLNode):
                return node.GetNodeReference(name)
            text = node.GetParameter(name)
            if base is bool:
                return text == "True"
            return float(text or 0.0) if base is float else text

        def __setattr__(self, name, value):
            if name not in fields:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            base, checks, _default = fields[name]
            node = self.parameterNode
            if isinstance(base, type) and issubclass(base, slicer.vtkMRMLNode):
                if value is not None and not value.IsA(base.__name__):
                    raise TypeError(f"{name} must be a {base.__name__}")
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
                return
            if base is bool and not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
            value = base(value)
            for check in checks:
                check.check(name, value)
            node.SetParameter(name, str(value))

        # -- GUI ---------------------------------------------------------------------------------
        def connectGui(self, ui):
            from .mrmlwidgets import qMRMLNodeComboBox

            bindings = []
            for widget in vars(ui).values():
                parameter = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
                if parameter not in fields:
                    continue
                if isinstance(widget, qMRMLNodeComboBox):
                    signal, read, write = widget.currentNodeChanged, widget.currentNode, widget.setCurrentNode
                elif widget.metaObject().className() == "QComboBox":
                    signal, read = widget.currentTextChanged, lambda w=widget: w.currentText
                    write = lambda v, w=widget: w.setCurrentIndex(w.findText(v))  # noqa: E731
                elif widget.metaObject().className() == "QLineEdit":
                    signal, read, write = widget.textChanged, (lambda w=widget: w.text), widget.setText
                elif widget.metaObject().className() == "QDoubleSpinBox":
                    signal, read, write = widget.valueChanged, (lambda w=widget: w.value), widget.setValue
                elif widget.metaObject().className() == "QCheckBox":
                    signal, read, write = widget.toggled, (lambda w=widget: w.checked), widget.setChecked
                else:
                    raise TypeError(f"no binding for {widget.metaObject().className()} ({parameter})")
                state = {"busy": False}

                def toNode(*args, parameter=parameter, read=read, state=state):
                    if not state["busy"]:
                        state["busy"] = True
                        try:
                            setattr(self, parameter, read())
                        finally:
                            state["busy"] = False

                def toWidget(*args, parameter=parameter, write=write, state=state):
                    if not state["busy"]:
                        state["busy"] = True
                        try:
                            write(getattr(self, parameter))
                        finally:
                            state["busy"] = False

                signal.connect(toNode)
                bindings.append((signal, toNode, toWidget))
                toWidget()
            import vtk

            tag = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *args: [b[2]() for b in bindings])
            self._guis[tag] = bindings
            return tag

        def disconnectGui(self, tag):
            for signal, toNode, _toWidget in self._guis.pop(tag, []):
                signal.disconnect(toNode)
            if tag is not None:
                self.parameterNode.RemoveObserver(tag)

    Wrapper.__qualname__ = cls.__qualname__
    Wrapper.fields = fields
    return Wrapper
