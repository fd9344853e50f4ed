"""A real MRML scene from slicer-core, set up the way Slicer's application does it, without Qt.

slicer-core gives MRML and the module logics in pure Python, but ``slicer.mrmlScene``, ``slicer.app`` and
``slicer.modules`` only exist inside the Slicer application. :func:`install_slicer_core` creates them
(ARCHITECTURE.md §5):

* a ``vtkMRMLScene`` and a ``vtkSlicerApplicationLogic`` whose color logic is registered as "Colors";
* the Volumes, Segmentations, Markups, CropVolume and SubjectHierarchy logics, each given the scene and the
  application logic, reachable as ``slicer.modules.<name>.logic()``;
* ``slicer.app.coreIOManager()``: a small stand-in that loads and saves volumes, segmentations and markups
  through the real MRML storage nodes, so ``slicer.util.loadVolume`` / ``loadSegmentation`` /
  ``loadMarkups`` / ``saveNode`` work.

Use the ``slicer_scene`` pytest fixture (import it into a test module with
``from slicer_fixtures import slicer_scene``); it yields a fresh, empty scene per test.
"""
from __future__ import annotations

import os
import tempfile
import types
from typing import Dict

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core==5.11.0.6)")
vtk = pytest.importorskip("vtk")
import slicer.util  # noqa: E402  (registers slicer.util next to the wrapped classes)

# slicer.modules.<name> -> logic class, the names Slicer uses for these modules.
MODULE_LOGIC_CLASSES = {
    "volumes": "vtkSlicerVolumesLogic",
    "segmentations": "vtkSlicerSegmentationsModuleLogic",
    "markups": "vtkSlicerMarkupsLogic",
    "cropvolume": "vtkSlicerCropVolumeLogic",
    "subjecthierarchy": "vtkSlicerSubjectHierarchyModuleLogic",
}

# Extension -> (Slicer file type, loader). The longest matching extension wins.
_FILE_TYPES = {
    ".seg.nrrd": "SegmentationFile",
    ".mrk.json": "MarkupsFile",
    ".nrrd": "VolumeFile",
    ".nhdr": "VolumeFile",
    ".nii.gz": "VolumeFile",
    ".nii": "VolumeFile",
    ".mha": "VolumeFile",
    ".mhd": "VolumeFile",
}


class CoreIOManagerStandIn:
    """The part of ``qSlicerCoreIOManager`` that ``slicer.util`` load/save functions call."""

    def __init__(self, scene, module_logics: Dict[str, object]):
        self._scene = scene
        self._logics = module_logics

    def set_scene(self, scene) -> None:
        self._scene = scene

    def fileType(self, filename) -> str:
        name = str(filename).lower()
        for ext in sorted(_FILE_TYPES, key=len, reverse=True):
            if name.endswith(ext):
                return _FILE_TYPES[ext]
        return "NoFile"

    def fileWriterFileType(self, node) -> str:
        if node.IsA("vtkMRMLSegmentationNode"):
            return "SegmentationFile"
        if node.IsA("vtkMRMLMarkupsNode"):
            return "MarkupsFile"
        if node.IsA("vtkMRMLVolumeNode"):
            return "VolumeFile"
        return "NoFile"

    def loadNodes(self, filetype, properties, loaded_nodes, user_messages) -> bool:
        filename = str(properties["fileName"])
        name = properties.get("name") or _base_name(filename)
        if filetype == "VolumeFile":
            node = self._logics["volumes"].AddArchetypeVolume(filename, name, 1 if properties.get("labelmap") else 0)
        elif filetype == "SegmentationFile":
            node = self._logics["segmentations"].LoadSegmentationFromFile(filename, True, name)
        elif filetype == "MarkupsFile":
            node_id = self._logics["markups"].LoadMarkups(filename, name)
            node = self._scene.GetNodeByID(node_id) if node_id else None
        else:
            user_messages.AddMessage(vtk.vtkCommand.ErrorEvent, f"no reader for file type {filetype!r}")
            return False
        if node is None:
            user_messages.AddMessage(vtk.vtkCommand.ErrorEvent, f"could not read {filename}")
            return False
        loaded_nodes.AddItem(node)
        return True

    def saveNodes(self, filetype, properties, user_messages) -> bool:
        node = self._scene.GetNodeByID(properties["nodeID"])
        if node is None:
            user_messages.AddMessage(vtk.vtkCommand.ErrorEvent, f"no node {properties['nodeID']}")
            return False
        storage = node.GetStorageNode()
        if storage is None:
            # AddDefaultStorageNode picks the node's own writer (e.g. vtkMRMLMarkupsROIJsonStorageNode).
            node.AddDefaultStorageNode()
            storage = node.GetStorageNode()
        storage.SetFileName(str(properties["fileName"]))
        ok = bool(storage.WriteData(node))
        if not ok:
            user_messages.AddMessage(vtk.vtkCommand.ErrorEvent, f"could not write {properties['fileName']}")
        return ok


def _base_name(filename: str) -> str:
    base = os.path.basename(filename)
    for ext in sorted(_FILE_TYPES, key=len, reverse=True):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]


class AppStandIn:
    """The part of ``qSlicerApplication`` that slicer.util and the CTReasoner logic use outside Slicer."""

    def __init__(self, app_logic, io_manager: CoreIOManagerStandIn):
        self._app_logic = app_logic
        self._io = io_manager
        self.temporaryPath = tempfile.gettempdir()

    def coreIOManager(self) -> CoreIOManagerStandIn:
        return self._io

    def applicationLogic(self):
        return self._app_logic

    def testingEnabled(self) -> bool:
        return True

    def processEvents(self) -> None:
        pass


class SlicerCore:
    """Application logic, module logics and the ``slicer`` globals, created once and re-pointed per scene."""

    def __init__(self):
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.color_logic = slicer.vtkSlicerColorLogic()
        self.logics: Dict[str, object] = {}
        for name, class_name in MODULE_LOGIC_CLASSES.items():
            logic = getattr(slicer, class_name)()
            logic.SetMRMLApplicationLogic(self.app_logic)
            self.logics[name] = logic
        self.color_logic.SetMRMLApplicationLogic(self.app_logic)
        self.app_logic.SetModuleLogic("Colors", self.color_logic)
        for name, logic in self.logics.items():
            self.app_logic.SetModuleLogic(name, logic)
        self.io_manager = CoreIOManagerStandIn(None, self.logics)
        self.app = AppStandIn(self.app_logic, self.io_manager)
        self.modules = types.SimpleNamespace(**{
            name: types.SimpleNamespace(logic=(lambda logic=logic: logic)) for name, logic in self.logics.items()})
        self.scene = None

    def new_scene(self):
        """Point the application, every logic and the ``slicer`` globals at a fresh scene; return it."""
        scene = slicer.vtkMRMLScene()
        self.app_logic.SetMRMLScene(scene)
        self.color_logic.SetMRMLScene(scene)     # adds the default color tables the label maps use
        for logic in self.logics.values():
            logic.SetMRMLScene(scene)
        self.io_manager.set_scene(scene)
        slicer.mrmlScene = scene
        slicer.app = self.app
        slicer.modules = self.modules
        self.scene = scene
        return scene


_CORE = None


def install_slicer_core():
    """Create (once) the application/module logics and return the :class:`SlicerCore` with a fresh scene."""
    global _CORE
    if _CORE is None:
        _CORE = SlicerCore()
    _CORE.new_scene()
    return _CORE


@pytest.fixture
def slicer_scene():
    """A fresh, empty real ``vtkMRMLScene`` installed as ``slicer.mrmlScene`` (with app/module logics)."""
    core = install_slicer_core()
    yield core.scene
    core.scene.Clear(0)
