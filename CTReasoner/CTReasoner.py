"""CTReasoner: chat-driven CT interpretation in 3D Slicer.

Module, Widget, Logic and Test classes as in Slicer's scripted-module template. The Widget is thin: every
button calls the Logic (``CTReasonerLib.slicer.logic.SceneLogic``), which also works without the GUI::

    import CTReasoner
    logic = CTReasoner.CTReasonerLogic()
    logic.connect(mode="local", pythonExecutable="/path/to/backend/bin/python")
    outcome = logic.process(volumeNode, "segment the pancreas", sliceIndex=None, closerLook=True)
    logic.processVolumes(["/data/a.nrrd", "/data/b.nii.gz"], ["segment the liver"], "/tmp/out")

Nothing heavy is imported here: the model runs in a separate backend process (torch never enters Slicer).
"""
import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from CTReasonerLib.errors import CTReasonerError
from CTReasonerLib.organs import ORGANS
from CTReasonerLib.slicer.backend_setup import DEFAULT_PACKAGE, backend_setup_steps, run_setup, venv_python
from CTReasonerLib.slicer.jobs import JobCancelled
from CTReasonerLib.slicer.logic import SceneLogic, check_local_backend, describe_backend
from CTReasonerLib.slicer.segments import SegmentConflict
from CTReasonerLib.slicer.transcript import TranscriptLink, message_html, parse_link

SETTINGS_PREFIX = "CTReasoner/"
MODES = ("local", "ssh", "url")           # index order of modeComboBox
POLL_MS = 100


#
# CTReasoner
#


class CTReasoner(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CTReasoner"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Markups", "Segmentations"]
        self.parent.contributors = ["CTReasoner contributors"]
        self.parent.helpText = (
            "Chat with a CT: ask to segment or detect abdominal organs, read the model's reasoning, "
            "look closer at small organs, refine with clicks or a box, and propagate in 3D. "
            "The model runs in a separate backend process (local, over SSH, or at a URL). "
            "See docs/slicer_module.md in the CTReasoner repository.")
        self.parent.acknowledgementText = (
            "CTReasoner implements reasoning-driven segmentation and detection with routing tokens "
            "([SEG], [DET], [CLOSER]) on a vision-language model with a SAM mask decoder.")


#
# Parameter node
#


@parameterNodeWrapper
class CTReasonerParameterNode:
    """Scene-saved GUI state. Backend settings and tokens are NOT here: they live in Slicer's settings."""
    inputVolume: vtkMRMLScalarVolumeNode
    closerLook: bool = True
    conflictPolicy: Annotated[str, Choice(["ask", "new", "replace"])] = "ask"


#
# CTReasonerWidget
#


class CTReasonerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._jobs = {}                  # volume node id -> running SceneJob
        self._transcripts = {}           # volume node id -> [html]
        self._pendingRefine = set()      # volume ids whose prompts changed while a request ran
        self._backgroundExecutor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctreasoner-widget")
        self._connectFuture = None
        self._setupFuture = None
        self._setupCancel = None
        self._setupMessages = queue.Queue()
        self._promptNodes = {}
        self._setupTarget = ""

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTReasoner.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CTReasonerLogic()

        self.ui.refineOrganComboBox.addItem("(last answer's organ)", "")
        for organ in ORGANS:
            self.ui.refineOrganComboBox.addItem(organ.name, organ.key)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.sendButton.connect("clicked(bool)", self.onSend)
        self.ui.messageLineEdit.connect("returnPressed()", self.onSend)
        self.ui.closerLookButton.connect("clicked(bool)", self.onCloserLook)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.clearChatButton.connect("clicked(bool)", self.onClearChat)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.transcriptBrowser.connect("anchorClicked(QUrl)", self.onLinkClicked)
        self.ui.volumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged)
        self.ui.refineCollapsibleButton.connect("contentsCollapsed(bool)", self.onRefineCollapsed)
        self.ui.refineButton.connect("clicked(bool)", self.onRefine)
        self.ui.clearPromptsButton.connect("clicked(bool)", self.onClearPrompts)
        self.ui.wholeVolumeCheckBox.connect("toggled(bool)", self.onWholeVolumeToggled)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.setupButton.connect("clicked(bool)", self.onSetupBackend)
        self.ui.setupCancelButton.connect("clicked(bool)", self.onCancelSetup)

        self._loadBackendSettings()
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_MS)
        self._pollTimer.connect("timeout()", self._poll)
        self._pollTimer.start()
        self.initializeParameterNode()
        self._updateButtons()

    def cleanup(self) -> None:
        self.removeObservers()
        self._pollTimer.stop()
        for job in list(self._jobs.values()):
            self.logic.cancelJob(job)
        if self._setupCancel is not None:
            self._setupCancel.set()
        self.logic.disconnect()
        self._backgroundExecutor.shutdown(wait=False)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        for job in list(self._jobs.values()):
            self.logic.cancelJob(job)
        self._jobs.clear()
        self._transcripts.clear()
        self._promptNodes.clear()
        self.logic.clearChat()
        self.logic.undoStack.clear()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode: Optional[CTReasonerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # ------------------------------------------------------------------------------------------ helpers

    def _volume(self):
        return self.ui.volumeSelector.currentNode()

    def _say(self, role: str, text: str, links=None, hint: str = "", volume=None) -> None:
        volume = volume or self._volume()
        key = volume.GetID() if volume else ""
        entry = message_html(role, text, links, hint)
        self._transcripts.setdefault(key, []).append(entry)
        if volume is self._volume():
            self.ui.transcriptBrowser.append(entry)

    def _sayError(self, error: Exception, volume=None) -> None:
        if isinstance(error, CTReasonerError):
            self._say("error", error.message, hint=error.hint, volume=volume)
        else:
            logging.exception("CTReasoner: unexpected error")
            self._say("error", f"{type(error).__name__}: {error}", hint="see the Python console for details",
                      volume=volume)

    def _updateButtons(self) -> None:
        volume = self._volume()
        busy = volume is not None and volume.GetID() in self._jobs
        ready = volume is not None and self.logic.connected and not busy
        for button in (self.ui.sendButton, self.ui.closerLookButton, self.ui.refineButton, self.ui.propagateButton):
            button.enabled = ready
        self.ui.cancelButton.enabled = busy
        self.ui.progressBar.visible = busy
        self.ui.undoButton.enabled = len(self.logic.undoStack) > 0 and not busy
        self.ui.stopButton.enabled = self.logic.connected
        self.ui.startButton.enabled = self._connectFuture is None and not self.logic.connected

    def _setBackendStatus(self, state: str, info: str = "") -> None:
        colors = {"ready": "#2e7d32", "starting": "#f9a825", "error": "#b71c1c", "stopped": "#9e9e9e"}
        self.ui.backendStatusLabel.text = f"\u25cf {state}"
        self.ui.backendStatusLabel.styleSheet = f"color: {colors.get(state, '#9e9e9e')}"
        self.ui.backendInfoLabel.text = info

    def _currentSliceOrSay(self, volume) -> Optional[int]:
        try:
            return self.logic.currentSliceIndex(volume)
        except CTReasonerError as error:
            self._sayError(error, volume)
            return None

    # ------------------------------------------------------------------------------------------ jobs

    def _start(self, makeJob) -> None:
        """Build a job (reads the scene now) and run its backend part in the background."""
        volume = self._volume()
        if volume is None:
            self._say("error", "select a CT volume first")
            return
        if volume.GetID() in self._jobs:
            return
        try:
            job = makeJob(volume)
        except CTReasonerError as error:
            self._sayError(error, volume)
            return
        self._jobs[volume.GetID()] = self.logic.startJob(job)
        self.ui.progressBar.setRange(0, 0)
        self.ui.statusLabel.text = f"Working: {job.label}"
        self._updateButtons()

    def _poll(self) -> None:
        for volumeId, job in list(self._jobs.items()):
            done, total, message = job.context.progress
            if volumeId == (self._volume().GetID() if self._volume() else None) and total:
                self.ui.progressBar.setRange(0, total)
                self.ui.progressBar.value = done
                self.ui.statusLabel.text = f"{job.label}: {message}"
            if job.done():
                del self._jobs[volumeId]
                self._finish(job)
                if volumeId in self._pendingRefine:
                    self._pendingRefine.discard(volumeId)
                    self.onRefine()
        self._pollConnection()
        self._pollSetup()

    def _finish(self, job) -> None:
        volume = slicer.mrmlScene.GetNodeByID(job.volume_node_id)
        try:
            self._showOutcome(job.finish(self._parameterNode.conflictPolicy if self._parameterNode else None))
        except SegmentConflict as conflict:
            choice = self._askConflict(conflict)
            if choice is None:
                self.logic.discardPending()
                self._say("info", "Answer discarded; your segments are unchanged.", volume=volume)
            else:
                try:
                    self._showOutcome(self.logic.resolveConflict(choice))
                except CTReasonerError as error:
                    self._sayError(error, volume)
        except JobCancelled as cancelled:
            self._say("info", cancelled.message, volume=volume)
        except Exception as error:  # shown in the transcript; the GUI must survive any backend failure
            self._sayError(error, volume)
        self.ui.statusLabel.text = ""
        self._updateButtons()

    def _askConflict(self, conflict: SegmentConflict) -> Optional[str]:
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle("CTReasoner: existing segment")
        box.setText(conflict.message)
        box.setInformativeText("Add the answer as a new segment, or replace those slices of the existing one? "
                               "(Undo can revert either.)")
        newButton = box.addButton("New segment", qt.QMessageBox.AcceptRole)
        replaceButton = box.addButton("Replace slices", qt.QMessageBox.DestructiveRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.exec_()
        if box.clickedButton() == newButton:
            return "new"
        if box.clickedButton() == replaceButton:
            return "replace"
        return None

    def _showOutcome(self, outcome) -> None:
        volume = slicer.mrmlScene.GetNodeByID(outcome.volume_node_id)
        links = []
        applied = outcome.applied
        if applied is not None and applied.segmentation_node_id:
            segmentation = slicer.mrmlScene.GetNodeByID(applied.segmentation_node_id).GetSegmentation()
            for segmentId in applied.segment_ids.values():
                segment = segmentation.GetSegment(segmentId)
                if segment is not None:
                    links.append(TranscriptLink(segment.GetName(), "segment", applied.segmentation_node_id, segmentId))
        for nodeId in outcome.roi_node_ids:
            node = slicer.mrmlScene.GetNodeByID(nodeId)
            if node is not None:
                links.append(TranscriptLink(node.GetName(), "node", nodeId))
        self._say("assistant", outcome.text, links, volume=volume)

    # ------------------------------------------------------------------------------------------ chat

    def onSend(self) -> None:
        query = self.ui.messageLineEdit.text.strip()
        volume = self._volume()
        if not query or volume is None or volume.GetID() in self._jobs:
            return
        if not self.logic.connected:
            self._say("error", "not connected to a CTReasoner backend",
                      hint="open the Backend section and press Start")
            return
        scan = self.ui.scopeComboBox.currentIndex == 1
        sliceIndex = None
        if not scan:
            sliceIndex = self._currentSliceOrSay(volume)
            if sliceIndex is None:
                return
        self._say("user", query + ("" if scan else f"  [slice {sliceIndex}]"))
        self.ui.messageLineEdit.clear()
        closerLook = True if self._parameterNode.closerLook else None
        self._start(lambda v: self.logic.chatJob(v, query, sliceIndex, closerLook))

    def onCloserLook(self) -> None:
        roi = self._definedRoi()
        organ = self.ui.refineOrganComboBox.currentData or None
        self._start(lambda v: self.logic.closerLookJob(v, roiNode=roi, organ=organ))

    def onUndo(self) -> None:
        label = self.logic.undo()
        self._say("info", f"Undid: {label}" if label else "Nothing to undo.")
        self._updateButtons()

    def onClearChat(self) -> None:
        volume = self._volume()
        self.logic.clearChat(volume)
        self._transcripts.pop(volume.GetID() if volume else "", None)
        self.ui.transcriptBrowser.clear()

    def onCancel(self) -> None:
        volume = self._volume()
        job = self._jobs.get(volume.GetID()) if volume else None
        if job is not None:
            self.logic.cancelJob(job)
            self.ui.statusLabel.text = "Cancelling..."

    def onVolumeChanged(self, volume) -> None:
        self.ui.transcriptBrowser.clear()
        for entry in self._transcripts.get(volume.GetID() if volume else "", []):
            self.ui.transcriptBrowser.append(entry)
        if volume is not None and volume.GetImageData() is not None:
            last = volume.GetImageData().GetDimensions()[2] - 1
            for spinBox in (self.ui.rangeStartSpinBox, self.ui.rangeEndSpinBox):
                spinBox.maximum = last
            self.ui.rangeEndSpinBox.value = last
        self._updateButtons()

    def onLinkClicked(self, url) -> None:
        target = parse_link(url.toString())
        if target is None:
            return
        kind, nodeId, segmentId = target
        try:
            node, center = self.logic.linkTarget(kind, nodeId, segmentId)
        except CTReasonerError as error:
            self._sayError(error)
            return
        if kind == "segment":
            displayNode = node.GetDisplayNode()
            if displayNode is not None:
                displayNode.SetSegmentVisibility(segmentId, True)
            editorNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentEditorNode")
            if editorNode is not None and editorNode.GetSegmentationNode() is node:
                editorNode.SetSelectedSegmentID(segmentId)
        else:
            slicer.modules.markups.logic().SetActiveList(node)
        slicer.modules.markups.logic().JumpSlicesToLocation(center[0], center[1], center[2], True)

    # ------------------------------------------------------------------------------------------ refine

    def _promptNode(self, role: str):
        """The include/exclude point lists and the box ROI, created on demand, observed for auto-refine."""
        node = self._promptNodes.get(role)
        if node is not None and slicer.mrmlScene.IsNodePresent(node):
            return node
        className, color = {"include": ("vtkMRMLMarkupsFiducialNode", (0.1, 0.8, 0.2)),
                            "exclude": ("vtkMRMLMarkupsFiducialNode", (0.9, 0.1, 0.1)),
                            "box": ("vtkMRMLMarkupsROINode", (1.0, 0.85, 0.0))}[role]
        node = slicer.mrmlScene.AddNewNodeByClass(className, f"CTReasoner {role}")
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor(*color)
        node.SetSaveWithScene(False)
        event = (slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent if role == "box"
                 else slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent)
        self.addObserver(node, event, self.onPromptPlaced)
        self._promptNodes[role] = node
        return node

    def _ensurePromptWidgets(self) -> None:
        for role, widget in (("include", self.ui.includePlaceWidget), ("exclude", self.ui.excludePlaceWidget),
                             ("box", self.ui.roiPlaceWidget)):
            node = self._promptNode(role)
            if widget.currentNode() is not node:
                widget.setCurrentNode(node)
                if role != "box":
                    widget.placeMultipleMarkups = widget.ForcePlaceMultipleMarkups

    def onRefineCollapsed(self, collapsed: bool) -> None:
        if not collapsed:
            self._ensurePromptWidgets()

    def _definedRoi(self):
        roi = self._promptNodes.get("box")
        if roi is None or not slicer.mrmlScene.IsNodePresent(roi) or roi.GetNumberOfDefinedControlPoints() == 0:
            return None
        return roi

    def onPromptPlaced(self, caller, event) -> None:
        if self.ui.autoRefineCheckBox.checked:
            volume = self._volume()
            if volume is not None and volume.GetID() in self._jobs:
                self._pendingRefine.add(volume.GetID())      # refine again with every click once this ends
            else:
                self.onRefine()

    def onRefine(self) -> None:
        self._ensurePromptWidgets()
        include, exclude, roi = self._promptNodes["include"], self._promptNodes["exclude"], self._definedRoi()
        organ = self.ui.refineOrganComboBox.currentData or None
        self._start(lambda v: self.logic.refineJob(v, includePointsNode=include, excludePointsNode=exclude,
                                                   roiNode=roi, organ=organ))

    def onClearPrompts(self) -> None:
        for role in ("include", "exclude"):
            self._promptNode(role).RemoveAllControlPoints()
        self._promptNode("box").RemoveAllControlPoints()

    # ------------------------------------------------------------------------------------------ propagate

    def onWholeVolumeToggled(self, whole: bool) -> None:
        self.ui.rangeStartSpinBox.enabled = not whole
        self.ui.rangeEndSpinBox.enabled = not whole

    def onPropagate(self) -> None:
        direction = self.ui.directionComboBox.currentText
        sliceRange = None
        if not self.ui.wholeVolumeCheckBox.checked:
            sliceRange = (self.ui.rangeStartSpinBox.value, self.ui.rangeEndSpinBox.value)
        organ = self.ui.refineOrganComboBox.currentData or None
        self._start(lambda v: self.logic.propagateJob(v, organ=organ, direction=direction, sliceRange=sliceRange))

    # ------------------------------------------------------------------------------------------ backend

    def _settings(self):
        return qt.QSettings()

    def _loadBackendSettings(self) -> None:
        settings = self._settings()

        def value(key, default=""):
            return str(settings.value(SETTINGS_PREFIX + key, default) or default)

        mode = value("mode", "local")
        self.ui.modeComboBox.currentIndex = MODES.index(mode) if mode in MODES else 0
        self.ui.backendStackedWidget.currentIndex = self.ui.modeComboBox.currentIndex
        self.ui.pythonPathLineEdit.currentPath = value("pythonExecutable")
        self.ui.modelPathLineEdit.currentPath = value("modelPath")
        self.ui.deviceComboBox.currentText = value("device", "auto")
        self.ui.sshHostLineEdit.text = value("sshHost")
        self.ui.sshCommandLineEdit.text = value("sshCommand", "ctreasoner serve --stdio")
        self.ui.urlLineEdit.text = value("url")
        self.ui.tokenLineEdit.text = value("token")
        self.ui.setupFolderLineEdit.currentPath = value(
            "setupFolder", os.path.join(os.path.expanduser("~"), "CTReasoner-backend"))
        self.ui.basePythonLineEdit.currentPath = value("basePython")

    def _saveBackendSettings(self) -> dict:
        options = {
            "mode": MODES[self.ui.modeComboBox.currentIndex],
            "pythonExecutable": self.ui.pythonPathLineEdit.currentPath,
            "modelPath": self.ui.modelPathLineEdit.currentPath,
            "device": self.ui.deviceComboBox.currentText,
            "sshHost": self.ui.sshHostLineEdit.text.strip(),
            "sshCommand": self.ui.sshCommandLineEdit.text.strip(),
            "url": self.ui.urlLineEdit.text.strip(),
            "token": self.ui.tokenLineEdit.text.strip(),
        }
        settings = self._settings()
        for key, value in options.items():
            settings.setValue(SETTINGS_PREFIX + key, value)
        return options

    def onStart(self) -> None:
        if self._connectFuture is not None:
            return
        options = self._saveBackendSettings()
        try:
            if options["mode"] == "local":
                check_local_backend(options["pythonExecutable"], options["modelPath"])
        except CTReasonerError as error:
            self._setBackendStatus("error", f"{error.message}\nFix: {error.hint}")
            return
        self._setBackendStatus("starting", "starting the backend and loading the model...")
        self._connectFuture = self._backgroundExecutor.submit(
            self.logic.connect, mode=options["mode"], pythonExecutable=options["pythonExecutable"],
            modelPath=options["modelPath"], device=options["device"], host=options["sshHost"],
            remoteCommand=options["sshCommand"], url=options["url"], token=options["token"])
        self._updateButtons()

    def _pollConnection(self) -> None:
        if self._connectFuture is None or not self._connectFuture.done():
            return
        future, self._connectFuture = self._connectFuture, None
        error = future.exception()
        if error is None:
            self._setBackendStatus("ready", describe_backend(future.result()))
        elif isinstance(error, CTReasonerError):
            self._setBackendStatus("error", f"{error.message}" + (f"\nFix: {error.hint}" if error.hint else ""))
        else:
            logging.error("CTReasoner backend start failed: %s", error)
            self._setBackendStatus("error", f"{type(error).__name__}: {error}")
        self._updateButtons()

    def onStop(self) -> None:
        for job in list(self._jobs.values()):
            self.logic.cancelJob(job)
        self.logic.disconnect()
        self._setBackendStatus("stopped")
        self._updateButtons()

    def onTestConnection(self) -> None:
        if not self.logic.connected:
            self.onStart()
            return
        try:
            self.logic.client.ping(timeout=10)
            self._setBackendStatus("ready", self.logic.backendDescription())
        except CTReasonerError as error:
            self._setBackendStatus("error", f"{error.message}" + (f"\nFix: {error.hint}" if error.hint else ""))
        self._updateButtons()

    # ------------------------------------------------------------------------------------------ backend setup

    def onSetupBackend(self) -> None:
        if self._setupFuture is not None:
            return
        folder = self.ui.setupFolderLineEdit.currentPath
        basePython = self.ui.basePythonLineEdit.currentPath or None
        settings = self._settings()
        settings.setValue(SETTINGS_PREFIX + "setupFolder", folder)
        settings.setValue(SETTINGS_PREFIX + "basePython", basePython or "")
        package = str(settings.value(SETTINGS_PREFIX + "backendPackage", DEFAULT_PACKAGE) or DEFAULT_PACKAGE)
        try:
            steps = backend_setup_steps(folder, base_python=basePython, package=package)
        except CTReasonerError as error:
            self.ui.setupLogEdit.appendPlainText(f"{error.message} ({error.hint})")
            return
        self._setupCancel = threading.Event()
        self.ui.setupProgressBar.setRange(0, len(steps))
        self.ui.setupProgressBar.value = 0
        self.ui.setupButton.enabled = False
        self.ui.setupCancelButton.enabled = True
        messages = self._setupMessages
        self._setupFuture = self._backgroundExecutor.submit(
            run_setup, steps, on_output=lambda line: messages.put(("line", line)),
            on_step=lambda index, total, description: messages.put(("step", index)),
            cancel_event=self._setupCancel)
        self._setupTarget = venv_python(folder)

    def onCancelSetup(self) -> None:
        if self._setupCancel is not None:
            self._setupCancel.set()

    def _pollSetup(self) -> None:
        while not self._setupMessages.empty():
            kind, value = self._setupMessages.get_nowait()
            if kind == "line":
                self.ui.setupLogEdit.appendPlainText(value)
            else:
                self.ui.setupProgressBar.value = value
        if self._setupFuture is None or not self._setupFuture.done():
            return
        future, self._setupFuture = self._setupFuture, None
        self.ui.setupButton.enabled = True
        self.ui.setupCancelButton.enabled = False
        error = future.exception()
        if error is None:
            self.ui.setupLogEdit.appendPlainText("Backend ready. Press Start to use it.")
            self.ui.modeComboBox.currentIndex = 0
            self.ui.pythonPathLineEdit.currentPath = self._setupTarget
            self._saveBackendSettings()
        else:
            message = str(error) if isinstance(error, CTReasonerError) else f"{type(error).__name__}: {error}"
            self.ui.setupLogEdit.appendPlainText(f"Setup stopped: {message}")


#
# CTReasonerLogic
#


class CTReasonerLogic(ScriptedLoadableModuleLogic, SceneLogic):
    """Everything the Widget does, usable from the Python console and scripts (see SceneLogic)."""

    def __init__(self, client=None, conflictPolicy: str = "ask") -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        SceneLogic.__init__(self, client=client, conflictPolicy=conflictPolicy)

    def getParameterNode(self):
        return CTReasonerParameterNode(super().getParameterNode())


#
# CTReasonerTest
#


class CTReasonerTest(ScriptedLoadableModuleTest):
    """End-to-end test inside Slicer against a local backend with CTReasoner-Tiny on a generated phantom.

    Needs a backend environment: set CTREASONER_BACKEND_PYTHON to its python (and optionally
    CTREASONER_MODEL to a model folder). Run with ``Slicer --testing --python-code
    "import CTReasoner; CTReasoner.CTReasonerTest().runTest()"`` or via ctest (slicer_add_python_unittest).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_WidgetLoads()
        self.setUp()
        self.test_PhantomEndToEnd()

    def test_WidgetLoads(self):
        slicer.util.selectModule("CTReasoner")
        widget = slicer.modules.CTReasonerWidget
        self.assertIsNotNone(widget.ui.transcriptBrowser)
        self.assertFalse(widget.ui.sendButton.enabled)     # no backend yet

    def test_PhantomEndToEnd(self):
        import subprocess
        import tempfile
        import numpy as np
        python = os.environ.get("CTREASONER_BACKEND_PYTHON", "")
        if not python:
            self.delayDisplay("Skipped: set CTREASONER_BACKEND_PYTHON to the backend environment's python")
            return
        workdir = tempfile.mkdtemp(prefix="ctreasoner-selftest-")
        subprocess.run([python, "-m", "CTReasonerLib.cli", "phantom", "--seed", "7", "--out", workdir,
                        "--format", "nrrd"], check=True, timeout=600)
        images = [os.path.join(workdir, "phantom_0007_ct.nrrd")]
        self.assertTrue(os.path.isfile(images[0]), f"the phantom command wrote no {images[0]}")
        volume = slicer.util.loadVolume(images[0])
        logic = CTReasonerLogic(conflictPolicy="new")
        try:
            info = logic.connect(mode="local", pythonExecutable=python,
                                 modelPath=os.environ.get("CTREASONER_MODEL") or None, device="cpu")
            self.delayDisplay(f"Connected: {describe_backend(info)}")
            k = volume.GetImageData().GetDimensions()[2] // 2
            outcome = logic.process(volume, "segment the liver", sliceIndex=k, closerLook=True)
            self.assertIn("liver", outcome.segment_ids, outcome.text)
            segmentation = slicer.mrmlScene.GetNodeByID(outcome.applied.segmentation_node_id)
            liver = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, outcome.segment_ids["liver"], volume)
            self.assertTrue(liver[k].any() and not np.delete(liver, k, axis=0).any())

            points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
            center = logic.linkTarget("segment", segmentation.GetID(), outcome.segment_ids["liver"])[1]
            points.AddControlPointWorld(*center)
            logic.refine(volume, includePointsNode=points, sliceIndex=k)
            self.assertEqual(logic.undo(), f"refine liver (slice {k}, 1 point(s))")

            propagated = logic.propagate(volume, organ="liver", direction="both", sliceRange=(k - 2, k + 2),
                                         seedSlice=k)
            self.delayDisplay(propagated.text)
            summary = logic.processVolumes([images[0]], ["segment the liver"], os.path.join(workdir, "out"),
                                           sliceIndex=k)
            self.assertEqual(summary[0].status, "ok", summary[0].error)
        finally:
            logic.disconnect()
        self.delayDisplay("CTReasoner end-to-end test passed")
