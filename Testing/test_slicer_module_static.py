"""What can be checked of the Slicer module without Slicer: the .ui, imports, CMake lists, setup commands, links."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET

import pytest

from CTReasonerLib.errors import CTReasonerError
from CTReasonerLib.slicer import backend_setup
from CTReasonerLib.slicer.transcript import TranscriptLink, message_html, parse_link

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(ROOT, "CTReasoner")
MODULE_FILE = os.path.join(MODULE_DIR, "CTReasoner.py")
UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "CTReasoner.ui")

with open(MODULE_FILE, encoding="utf-8") as _handle:
    MODULE_SOURCE = _handle.read()
MODULE_TREE = ast.parse(MODULE_SOURCE)

# What CTReasoner.py may import at module level: Slicer/Qt/VTK and light standard-library modules.
ALLOWED_TOP_LEVEL = {"logging", "os", "queue", "threading", "concurrent", "typing", "qt", "ctk", "vtk", "slicer",
                     "CTReasonerLib"}


def ui_widgets():
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def test_ui_defines_every_widget_the_module_uses():
    widgets = ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_SOURCE))
    assert used, "the widget uses no ui elements?"
    missing = sorted(used - set(widgets))
    assert not missing, f"CTReasoner.py uses widgets missing from CTReasoner.ui: {missing}"


def test_ui_connections_and_custom_widgets_are_consistent():
    root = ET.parse(UI_FILE).getroot()
    widgets = ui_widgets()
    for connection in root.iter("connection"):
        assert connection.findtext("sender") in widgets, connection.findtext("sender")
        assert connection.findtext("receiver") in widgets, connection.findtext("receiver")
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    qt_classes = {"QWidget", "QLabel", "QPushButton", "QLineEdit", "QTextBrowser", "QComboBox", "QCheckBox",
                  "QProgressBar", "QSpinBox", "QStackedWidget", "QPlainTextEdit"}
    for widget in widgets.values():
        assert widget.get("class") in declared | qt_classes, widget.get("class")
    # every qMRML/qSlicer widget that needs the scene gets it from the top-level widget
    scene_receivers = {c.findtext("receiver") for c in root.iter("connection")
                       if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    needs_scene = {name for name, w in widgets.items()
                   if w.get("class") in {"qMRMLNodeComboBox", "qSlicerMarkupsPlaceWidget"}}
    assert needs_scene <= scene_receivers, needs_scene - scene_receivers


def test_parameter_names_in_ui_match_the_parameter_node():
    widgets = ui_widgets()
    in_ui = set()
    for widget in widgets.values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                in_ui.add(prop.findtext("string"))
    node_class = next(n for n in MODULE_TREE.body if isinstance(n, ast.ClassDef) and n.name == "CTReasonerParameterNode")
    fields = {stmt.target.id for stmt in node_class.body if isinstance(stmt, ast.AnnAssign)}
    assert in_ui == fields == {"inputVolume", "closerLook", "conflictPolicy"}
    choices = re.search(r'conflictPolicy: Annotated\[str, Choice\((\[.*?\])\)\]', MODULE_SOURCE).group(1)
    combo = widgets["conflictPolicyComboBox"]
    assert ast.literal_eval(choices) == [i.find("property/string").text for i in combo.findall("item")]


def top_level_imports():
    names = set()
    ctreasoner_modules = set()
    for node in MODULE_TREE.body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module.split(".")[0])
            if node.module.startswith("CTReasonerLib"):
                ctreasoner_modules.add(node.module)
    return names, ctreasoner_modules


def test_module_imports_nothing_heavy_at_module_level():
    names, _ = top_level_imports()
    assert names <= ALLOWED_TOP_LEVEL, names - ALLOWED_TOP_LEVEL


def slicer_side_modules():
    """CTReasonerLib modules loaded by the Slicer module's imports and by every client/bridge module (some are
    imported lazily, e.g. the client in ``connect``), and which heavy libraries that pulled in."""
    _, modules = top_level_imports()
    code = ("import sys, importlib, pkgutil\n"
            "import CTReasonerLib.client, CTReasonerLib.slicer\n"
            "names = [m.name for p in (CTReasonerLib.client, CTReasonerLib.slicer)\n"
            "         for m in pkgutil.iter_modules(p.__path__, p.__name__ + '.')]\n"
            f"for name in names + {sorted(modules)!r}: importlib.import_module(name)\n"
            "print(';'.join(sorted(m for m in sys.modules if m.startswith('CTReasonerLib'))))\n"
            "print(';'.join(sorted(m for m in ('torch', 'transformers', 'SimpleITK', 'monai', 'sam2', 'scipy')"
            " if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded, heavy = out.stdout.split("\n")[:2]
    return loaded.split(";"), heavy


def test_slicer_side_imports_stay_light_and_are_all_packaged():
    loaded, heavy = slicer_side_modules()
    assert heavy == "", f"the Slicer side imports {heavy}"
    with open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8") as handle:
        cmake = handle.read()
    listed = set(re.search(r"set\(CTREASONERLIB_SLICER_SCRIPTS(.*?)\)", cmake, re.S).group(1).split())
    for path in listed:
        assert os.path.isfile(os.path.join(ROOT, path)), f"CMakeLists.txt lists a missing file {path}"
    for module in loaded:
        parts = module.split(".")
        package_init = "/".join(parts) + "/__init__.py"
        file_path = "/".join(parts) + ".py"
        assert package_init in listed or file_path in listed, f"{module} is imported by Slicer but not packaged"


def test_extension_cmake_metadata_and_resources():
    with open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8") as handle:
        top = handle.read()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key} \"[^\"]+\"\)", top), key
    for needed in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(CTReasoner)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needed in top, needed
    with open(os.path.join(MODULE_DIR, "CMakeLists.txt"), encoding="utf-8") as handle:
        module_cmake = handle.read()
    assert "WITH_GENERIC_TESTS" in module_cmake and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module_cmake
    resources = re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", module_cmake, re.S).group(1).split()
    for resource in resources:
        assert os.path.isfile(os.path.join(MODULE_DIR, resource.replace("${MODULE_NAME}", "CTReasoner"))), resource
    from PIL import Image
    with Image.open(os.path.join(MODULE_DIR, "Resources", "Icons", "CTReasoner.png")) as icon:
        assert icon.size == (128, 128)


def test_module_file_follows_the_template_and_its_test_calls_real_logic_methods():
    classes = {n.name: n for n in MODULE_TREE.body if isinstance(n, ast.ClassDef)}
    bases = {name: [ast.unparse(b) for b in node.bases] for name, node in classes.items()}
    assert bases["CTReasoner"] == ["ScriptedLoadableModule"]
    assert bases["CTReasonerWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert bases["CTReasonerLogic"] == ["ScriptedLoadableModuleLogic", "SceneLogic"]
    assert bases["CTReasonerTest"] == ["ScriptedLoadableModuleTest"]
    from CTReasonerLib.slicer.logic import SceneLogic
    called = {node.func.attr for node in ast.walk(MODULE_TREE)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and isinstance(node.func.value, (ast.Name, ast.Attribute))
              and ast.unparse(node.func.value) in ("logic", "self.logic")}
    assert called, "the widget/test never calls the logic?"
    missing = sorted(name for name in called if not hasattr(SceneLogic, name) and name != "getParameterNode")
    assert not missing, f"CTReasoner.py calls logic methods that do not exist: {missing}"
    compile(MODULE_SOURCE, MODULE_FILE, "exec")


# ------------------------------------------------------------------------------------------------ backend setup


def test_setup_steps_pin_what_pyproject_pins_and_keep_the_install_order(tmp_path):
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as handle:
        pyproject = handle.read()
    for pin in backend_setup.PINNED_TORCH + (backend_setup.PINNED_SAM2,):
        assert f'"{pin}"' in pyproject, f"{pin} differs from pyproject.toml's backend extra"
    venv = str(tmp_path / "env")
    steps = backend_setup.backend_setup_steps(venv, base_python="/usr/bin/python3", package=ROOT,
                                              torch_index_url="https://download.pytorch.org/whl/cu124")
    assert steps[0].argv == ["/usr/bin/python3", "-m", "venv", venv]
    python = backend_setup.venv_python(venv)
    assert all(step.argv[0] == python for step in steps[1:])
    torch_step, sam2_step, package_step = steps[2], steps[3], steps[4]
    assert torch_step.argv[-4:] == ["torch==2.14.1", "torchvision==0.29.1", "--index-url",
                                    "https://download.pytorch.org/whl/cu124"]
    assert "--no-build-isolation" in sam2_step.argv and sam2_step.env == {"SAM2_BUILD_CUDA": "0"}
    assert package_step.argv[-3:] == ["install", "-e", ROOT + "[backend]"]
    assert steps[-1].argv[-2:] == ["serve", "--check"]
    assert backend_setup.backend_setup_steps(venv)[4].argv[-2:] == ["install", "ctreasoner[backend]"]
    with pytest.raises(CTReasonerError, match="choose a folder"):
        backend_setup.backend_setup_steps("")


def py_step(code, description="step"):
    return backend_setup.SetupStep(description, [sys.executable, "-c", code])


def test_setup_runner_streams_output_and_reports_steps():
    lines, steps = [], []
    backend_setup.run_setup([py_step("print('one')"), py_step("print('two')")],
                            on_output=lines.append, on_step=lambda i, n, d: steps.append((i, n)))
    assert lines[1] == "one" and lines[3] == "two" and steps == [(0, 2), (1, 2), (2, 2)]
    with_env = backend_setup.SetupStep("env", [sys.executable, "-c", "import os; print(os.environ['MARK'])"],
                                       env={"MARK": "set-by-step"})
    lines.clear()
    backend_setup.run_setup([with_env], on_output=lines.append)
    assert "set-by-step" in lines


def test_setup_runner_names_the_failed_step_and_stops():
    lines = []
    with pytest.raises(CTReasonerError, match=r"could not install things \(exit code 3\)") as info:
        backend_setup.run_setup([py_step("import sys; print('no space left'); sys.exit(3)", "install things"),
                                 py_step("print('never')")], on_output=lines.append)
    assert "no space left" in info.value.hint and "never" not in lines


def test_setup_runner_cancels_the_running_process():
    cancel = threading.Event()
    lines = []

    def on_output(line):
        lines.append(line)
        if line == "started":
            cancel.set()
    with pytest.raises(backend_setup.SetupCancelled):
        backend_setup.run_setup([py_step("import time; print('started', flush=True); time.sleep(60)"),
                                 py_step("print('never')")], on_output=on_output, cancel_event=cancel,
                                poll_seconds=0.05)
    assert "never" not in lines


# ------------------------------------------------------------------------------------------------ transcript


def test_transcript_escapes_model_text_and_links_round_trip():
    link = TranscriptLink("liver 2", "segment", "vtkMRMLSegmentationNode1", "Segment_1/x")
    entry = message_html("assistant", "<script>alert(1)</script>\nline two", [link], hint="")
    assert "<script>" not in entry and "&lt;script&gt;" in entry and "<br>line two" in entry
    href = re.search(r'href="([^"]+)"', entry).group(1)
    assert parse_link(href) == ("segment", "vtkMRMLSegmentationNode1", "Segment_1/x")
    assert parse_link(TranscriptLink("box", "node", "vtkMRMLMarkupsROINode3").href) == \
        ("node", "vtkMRMLMarkupsROINode3", None)
    assert parse_link("https://example.org") is None
    assert "Fix: install it" in message_html("error", "backend missing", hint="install it")
