"""The module's files as Slicer will load them: the .ui against the code that uses it, the module
file's import with stand-ins for Slicer's GUI modules, Qt-free helpers, CMake lists, the icon.

Only a real Slicer run (``BasalSegSAMTest``) checks the real UI; these tests catch the mistakes
that would otherwise only show there (a widget name typo, a parameter bound to nothing, a
helper that pulls in Qt).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

from test_slicer_helpers import MODULE_DIR

REPO = MODULE_DIR.parent
UI = MODULE_DIR / "Resources" / "UI" / "BasalSegSAM.ui"
MODULE = MODULE_DIR / "BasalSegSAM.py"

STANDARD_QT = {"QWidget", "QLabel", "QPushButton", "QToolButton", "QComboBox", "QLineEdit", "QDoubleSpinBox",
               "QSpinBox", "QTableWidget", "QProgressBar", "QCheckBox", "QPlainTextEdit", "QTextEdit"}


def _ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def _parameter_bindings() -> dict[str, str]:
    out = {}
    for name, w in _ui_widgets().items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out[name] = prop.find("string").text
    return out


def _parameter_fields() -> dict[str, str]:
    tree = ast.parse(MODULE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "BasalSegSAMParameterNode")
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


#: Files that use the widget's ``ui``: the module file and the panel sections in BasalSegSAMLib.
UI_USERS = [MODULE] + [MODULE_DIR / "BasalSegSAMLib" / f"{name}.py"
                       for name in ("promptpanel", "resultpanel", "installpanel", "selftest")]


def _ui_attributes_used() -> set[str]:
    """``X`` of every ``<something>.ui.X`` in the module file and the panel sections."""
    used = set()
    for path in UI_USERS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
                used.add(node.attr)
    return used


def test_every_widget_the_code_uses_is_in_the_ui_file():
    widgets = _ui_widgets()
    used = _ui_attributes_used()
    missing = sorted(used - set(widgets))
    assert missing == []
    assert {"undoButton", "previousSliceButton", "nextSliceButton", "promptsTable", "structureComboBox"} <= used


def test_ui_widget_classes_are_qt_or_declared_custom_widgets():
    root = ET.parse(UI).getroot()
    custom = {c.find("class").text for c in root.iter("customwidget")}
    assert custom == {"ctkCollapsibleButton", "qMRMLNodeComboBox", "qMRMLTableView", "qMRMLWidget"}
    used = {w.get("class") for w in root.iter("widget")}
    assert used <= STANDARD_QT | custom
    receivers = {c.find("receiver").text for c in root.iter("connection")}
    assert receivers == {n for n, w in _ui_widgets().items() if w.get("class") in ("qMRMLNodeComboBox", "qMRMLTableView")}


def test_parameter_node_fields_and_gui_bindings_match():
    fields = _parameter_fields()
    assert set(fields) == {"inputVolume", "foundation", "sam2Checkpoint", "device", "sdmBand", "mirrorTta",
                           "outputSegmentation", "volumesTable", "promptsJson", "generatedPromptsJson", "promptsVolume"}
    bindings = _parameter_bindings()
    assert set(bindings.values()) <= set(fields)
    assert set(bindings.values()) == {"inputVolume", "foundation", "sam2Checkpoint", "device", "sdmBand", "mirrorTta",
                                      "outputSegmentation"}
    widgets = _ui_widgets()
    expected_class = {"inputVolume": "qMRMLNodeComboBox", "outputSegmentation": "qMRMLNodeComboBox", "foundation": "QComboBox",
                      "device": "QComboBox", "sdmBand": "QDoubleSpinBox", "sam2Checkpoint": "QLineEdit",
                      "mirrorTta": "QCheckBox"}
    for widget, parameter in bindings.items():
        assert widgets[widget].get("class") == expected_class[parameter], widget
    assert "Choice" in fields["foundation"] and "Choice" in fields["device"] and "WithinRange" in fields["sdmBand"]


def test_combo_items_in_the_ui_match_the_parameter_choices():
    from BasalSegSAMLib.parameters import DEVICES, FOUNDATIONS

    widgets = _ui_widgets()

    def items(name):
        return [i.find("property/string").text for i in widgets[name].findall("item")]

    assert items("foundationComboBox") == list(FOUNDATIONS)
    assert items("deviceComboBox") == list(DEVICES)


def test_lib_imports_no_qt_and_its_init_imports_nothing():
    code = textwrap.dedent(
        """
        import sys
        before = set(sys.modules)
        import BasalSegSAMLib
        assert set(sys.modules) - before == {"BasalSegSAMLib"}, set(sys.modules) - before
        import BasalSegSAMLib.parameters, BasalSegSAMLib.processrunner, BasalSegSAMLib.dependencies
        import BasalSegSAMLib.jobs, BasalSegSAMLib.segmentworker
        assert "slicer" not in sys.modules, "a stdlib-only helper imported slicer"
        import BasalSegSAMLib.mrmlbridge, BasalSegSAMLib.promptmarkups, BasalSegSAMLib.prompteditor, BasalSegSAMLib.logic
        gui = [m for m in ("qt", "ctk", "PythonQt", "PySide6", "PySide2", "PyQt5", "PyQt6", "slicer.ScriptedLoadableModule")
               if m in sys.modules]
        assert not gui, gui
        heavy = [m for m in ("torch", "scipy", "monai") if m in sys.modules]
        assert not heavy, heavy  # the module loads in Slicer before dependencies are installed
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=MODULE_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_module_file_loads_with_stand_ins_for_slicers_gui_modules():
    """Import BasalSegSAM.py with tiny stand-ins for qt, ctk, ScriptedLoadableModule and the
    parameter node wrapper (real slicer-core MRML otherwise), then use its module and logic classes."""
    code = textwrap.dedent(
        """
        import sys, types
        import slicer

        def module(name, **attrs):
            m = types.ModuleType(name)
            m.__dict__.update(attrs)
            sys.modules[name] = m
            return m

        class Base:
            def __init__(self, parent=None):
                self.parent = parent
        class Logic(Base):
            def getParameterNode(self):
                return "raw-parameter-node"
        class Annotation:
            def __init__(self, *args):
                self.args = args
        wrapped = []
        def parameterNodeWrapper(cls):
            wrapped.append(cls)
            return cls

        module("qt")
        module("ctk")
        slicer.ScriptedLoadableModule = module("slicer.ScriptedLoadableModule", ScriptedLoadableModule=Base,
            ScriptedLoadableModuleWidget=Base, ScriptedLoadableModuleLogic=Logic, ScriptedLoadableModuleTest=Base)
        slicer.parameterNodeWrapper = module("slicer.parameterNodeWrapper", parameterNodeWrapper=parameterNodeWrapper,
            Choice=Annotation, WithinRange=Annotation)
        translated = []
        def translate(context, text):
            translated.append((context, text))
            return text
        slicer.i18n = module("slicer.i18n", tr=lambda text: translate("BasalSegSAM", text), translate=translate)

        import BasalSegSAM as m

        parent = types.SimpleNamespace()
        m.BasalSegSAM(parent)
        assert parent.title == "BasalSegSAM" and parent.categories == ["Segmentation"] and parent.contributors
        assert ("qSlicerAbstractCoreModule", "Segmentation") in translated and ("BasalSegSAM", "BasalSegSAM") in translated
        for word in ("Dice", "HD95", "volume_ml", "signed-distance", "Cancel", "Left-Putamen 12"):
            assert word in parent.helpText, word
        assert wrapped == [m.BasalSegSAMParameterNode]
        import typing  # what Slicer's wrapper reads: every annotation resolves
        hints = typing.get_type_hints(m.BasalSegSAMParameterNode, include_extras=True)
        assert hints["inputVolume"] is slicer.vtkMRMLScalarVolumeNode and hints["foundation"].__metadata__[0].args == (["litemedsam", "sam2"],)
        from BasalSegSAMLib.logic import SegmentationLogic
        logic = m.BasalSegSAMLogic()
        assert isinstance(logic, SegmentationLogic) and logic.tempRoot is None
        params = types.SimpleNamespace(foundation="sam2", sam2Checkpoint=" sam2.1_hiera_tiny ", device="cpu", sdmBand=4.0,
                                       mirrorTta=True)
        options = logic.runOptions(params)
        assert options.segmentArgs()[-5:] == ["--checkpoint", "sam2.1_hiera_tiny", "--band", "4", "--no-qc"], options.segmentArgs()
        params.mirrorTta = False
        assert logic.runOptions(params).segmentArgs()[-2:] == ["--no-qc", "--no-mirror-tta"]
        try:
            logic.process(None)
        except ValueError as exc:
            assert "inputVolume" in str(exc)
        else:
            raise AssertionError("process(None) did not raise")
        assert issubclass(m.BasalSegSAMTest, Base) and hasattr(m.BasalSegSAMTest, "runTest")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=MODULE_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_cmake_lists_name_existing_files_and_the_extension_metadata():
    module = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in module and "WITH_GENERIC_TESTS" in module
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module
    for resource in re.findall(r"^\s+(Resources/\S+)$", module, flags=re.M):
        path = MODULE_DIR / resource.replace("${MODULE_NAME}", "BasalSegSAM")
        assert path.is_file(), path
    assert "${MODULE_NAME}Lib/*.py" in module and "basalseg/*.py" in module
    top = (REPO / "CMakeLists.txt").read_text()
    for needle in ("cmake_minimum_required", "project(BasalSegSAM)", 'EXTENSION_DEPENDS "PyTorch"', "EXTENSION_HOMEPAGE",
                   'EXTENSION_CATEGORY "Segmentation"', "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                   "EXTENSION_SCREENSHOTURLS", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                   "add_subdirectory(BasalSegSAM)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                   "include(${Slicer_EXTENSION_CPACK})"):
        assert needle in top, needle
    # Slicer treats every .py beside the module file as a module: the helpers live in BasalSegSAMLib/
    assert sorted(p.name for p in MODULE_DIR.glob("*.py")) == ["BasalSegSAM.py"]


def test_icon_is_a_real_128px_picture_in_both_places():
    from PIL import Image

    icons = [MODULE_DIR / "Resources" / "Icons" / "BasalSegSAM.png", REPO / "BasalSegSAM.png"]
    assert icons[0].read_bytes() == icons[1].read_bytes()
    image = Image.open(icons[0]).convert("RGB")
    assert image.size == (128, 128)
    colours = image.getcolors(maxcolors=128 * 128)
    assert len(colours) > 50
    pixels = set(image.getdata())
    near = lambda c: any(sum(abs(a - b) for a, b in zip(c, p)) < 40 for p in pixels)  # noqa: E731
    assert near((236, 13, 176)) and near((122, 186, 220)) and near((12, 48, 255))  # putamen, caudate, pallidum


@pytest.mark.parametrize("path", sorted(p.name for p in (MODULE_DIR / "BasalSegSAMLib").glob("*.py")))
def test_lib_modules_have_docstrings_and_camel_case_public_api(path):
    tree = ast.parse((MODULE_DIR / "BasalSegSAMLib" / path).read_text())
    assert ast.get_docstring(tree), path
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            assert "_" not in node.name.strip("_") or node.name.isupper(), f"{path}: {node.name} is not camelCase"


def test_extension_urls_point_at_files_of_this_repository_and_placeholders_are_said():
    top = (REPO / "CMakeLists.txt").read_text()
    prefix = "https://raw.githubusercontent.com/basalsegsam/SlicerBasalSegSAM/main/"
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        urls = re.search(rf'set\({key} "([^"]+)"\)', top).group(1).split()
        assert urls, key
        for url in urls:
            assert url.startswith(prefix), url
            assert (REPO / url[len(prefix):]).is_file(), url  # the file exists where the URL says
    assert "PLACEHOLDERS" in top and "placeholder" in re.search(r'EXTENSION_CONTRIBUTORS "([^"]+)"', top).group(1)
    readme = (REPO / "README.md").read_text()
    assert "Publishing the extension" in readme and "placeholder" in readme.split("Publishing the extension")[1][:1500]


def test_the_screenshot_is_a_real_render_of_the_panel():
    from PIL import Image

    shot = Image.open(REPO / "Resources" / "Screenshots" / "1.png").convert("RGB")
    assert shot.size[0] >= 400 and shot.size[1] >= 800
    assert len(shot.getcolors(maxcolors=1 << 20)) > 200  # text, widgets, the highlighted rows
