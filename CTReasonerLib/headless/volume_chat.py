"""One conversation over the axial slices of a CT volume, run with the in-process pipeline, collected in 3D.

The pipeline (``CTReasonerLib.model.inference.CTReasonerPipeline``) answers on one 2D slice at a time; this
module picks the slices, runs the same turns on each (each slice keeps its own dialogue history, as a user
chatting on that slice in Slicer would), and gathers every slice's masks and boxes with its slice index ``k``
so that ``outputs.py`` can place them in the volume's geometry. Compound queries ("segment the liver and
detect the adrenal glands") are split by the pipeline, not here.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError, CTReasonerError, ModelError
from ..io.slices import AxialSlice, extract_axial_slice, neighbour_offset, neighbour_slices
from ..io.volume import Volume
from ..organs import get_organ
from ..results import BoxPrediction, ChatResult, MaskPrediction

log = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MODEL_DIR = os.path.join(REPO_ROOT, "Resources", "Models", "CTReasoner-Tiny")
TRAIN_HINT = ("train it with `ctreasoner train configs/tiny_cpu.yaml` and merge it into "
              "Resources/Models/CTReasoner-Tiny with `ctreasoner merge`, or pass --model DIR")


@dataclass
class ChatTurn:
    """One user message. ``closer_look``: None lets the model decide ([CLOSER]); True forces; False forbids."""
    query: str
    closer_look: Optional[bool] = None


@dataclass
class SliceChat:
    """The answers on slice ``k``: one ChatResult per turn, and the wall time of all turns."""
    k: int
    results: List[ChatResult]
    seconds: float


@dataclass
class VolumeChat:
    """Every slice's answers to the same turns on one volume."""
    volume: Volume
    turns: List[ChatTurn]
    slices: List[SliceChat] = field(default_factory=list)

    def slice_masks(self) -> Dict[int, Dict[str, MaskPrediction]]:
        """k -> organ key -> the mask that stands on that slice.

        A later turn's answer about an organ replaces an earlier one, and a closer-look mask (round 2)
        replaces the first-pass mask of the same turn: the refined answer is the one a user keeps.
        """
        per_slice: Dict[int, Dict[str, MaskPrediction]] = {}
        for slice_chat in self.slices:
            chosen: Dict[str, MaskPrediction] = {}
            for result in slice_chat.results:
                for prediction in sorted(result.masks, key=lambda m: m.round):
                    key = organ_key(prediction.organ)
                    if key is None:
                        log.warning("slice %d: a mask of no known organ (%r) is left out of the segmentation",
                                    slice_chat.k, prediction.organ)
                        continue
                    chosen[key] = prediction
            per_slice[slice_chat.k] = chosen
        return per_slice

    def organ_masks(self) -> Dict[str, np.ndarray]:
        """organ key -> (K, J, I) bool on the volume grid, each slice's mask at its own k (organs with a mask)."""
        volume_masks: Dict[str, np.ndarray] = {}
        for k, chosen in self.slice_masks().items():
            for key, prediction in chosen.items():
                if key not in volume_masks:
                    volume_masks[key] = np.zeros(self.volume.array.shape, dtype=bool)
                volume_masks[key][k] = _slice_mask(prediction, self.volume, k)
        return volume_masks

    def boxes(self) -> List[Tuple[int, BoxPrediction]]:
        """Every box of a known organ, with its slice index, best score first within a slice."""
        found = []
        for slice_chat in self.slices:
            boxes = [box for result in slice_chat.results for box in result.boxes if organ_key(box.organ)]
            found += [(slice_chat.k, box) for box in sorted(boxes, key=lambda b: -float(b.score))]
        return found

    def most_informative_slice(self) -> int:
        """The slice with the most to see: most mask pixels, then most boxes, then the first one asked."""
        masks = self.slice_masks()

        def content(slice_chat: SliceChat) -> Tuple[int, int]:
            pixels = sum(int(np.count_nonzero(m.mask)) for m in masks[slice_chat.k].values())
            boxes = sum(len(result.boxes) for result in slice_chat.results)
            return pixels, boxes

        if not self.slices:
            raise ValueError("no slices were processed")
        return max(self.slices, key=content).k


def organ_key(name: Optional[str]) -> Optional[str]:
    """An organ's key from whatever the model named it (key, display name or synonym); None when the model
    could not tie its answer to one of the 14 organs (such masks and boxes stay in the transcript only)."""
    try:
        return get_organ(name).key if name else None
    except KeyError:
        return None


def _slice_mask(prediction: MaskPrediction, volume: Volume, k: int) -> np.ndarray:
    mask = np.asarray(prediction.mask, dtype=bool)
    if mask.shape != volume.array.shape[1:]:
        raise ModelError(f"the model returned a {mask.shape} mask for slice {k} of shape {volume.array.shape[1:]}",
                         "this is a bug in the pipeline; please report it")
    return mask


# --------------------------------------------------------------------------------------------- slices
def parse_slices(spec: Optional[str], num_slices: int) -> List[int]:
    """Slice indices from a ``--slices`` value: ``all``, ``A:B`` (A..B-1, Python style), ``A:B:STEP``, ``A:``,
    ``:B``, or a comma list ``12,20,31``. None gives the default: the middle axial slice.

    Indices are 0-based, as Slicer's IJK K (the Red view shows slice ``K`` as "K+1 of N" in its slider).
    """
    if num_slices < 1:
        raise ConfigError("the volume has no slices", "give a 3D CT volume")
    if spec is None:
        return [num_slices // 2]
    text = str(spec).strip().lower()
    if text == "all":
        return list(range(num_slices))
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3 or any(p is not None and p < 0 for p in parts):
                raise ValueError
            start, stop, step = (parts + [None, None])[:3]
            start = 0 if start is None else start
            stop = num_slices if stop is None else stop
            if step is not None and step < 1:
                raise ValueError
            _check_range([start], num_slices, spec)
            indices = list(range(start, stop, step or 1))
        else:
            indices = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"cannot read the slice selection {spec!r}",
                          "use --slice K, or --slices A:B (A..B-1), A:B:STEP, K1,K2,... or all") from None
    if not indices:
        raise ConfigError(f"the slice selection {spec!r} selects no slices", "use --slices A:B with B > A")
    _check_range(indices, num_slices, spec)
    return sorted(set(indices))


def _check_range(indices: Sequence[int], num_slices: int, spec: object) -> None:
    outside = [k for k in indices if not 0 <= k < num_slices]
    if outside:
        raise ConfigError(f"slice {outside[0]} of the selection {spec!r} is outside the volume (0..{num_slices - 1})",
                          "choose slices inside the volume; `ctreasoner info VOLUME` prints its size")


# --------------------------------------------------------------------------------------------- model
def resolve_model_dir(model_dir: Optional[str]) -> str:
    """The model folder to use (``model_dir`` or the bundled CTReasoner-Tiny); refuses a missing one."""
    path = os.path.abspath(model_dir or DEFAULT_MODEL_DIR)
    if not os.path.isdir(path):
        if model_dir is None:
            raise ModelError(f"the bundled model CTReasoner-Tiny is missing ({path} does not exist)", TRAIN_HINT)
        raise ModelError(f"model folder {path} does not exist", "pass --model DIR, a folder written by "
                         "`ctreasoner merge` or CTReasonerModel.save_pretrained")
    return path


def load_pipeline(model_dir: Optional[str] = None, device: str = "auto"):
    """Load a model folder into a ``CTReasonerPipeline`` on ``device`` ("auto" | "cpu" | "cuda" | "cuda:N").

    Under torchrun with CUDA, "auto" and "cuda" mean this rank's own GPU (LOCAL_RANK modulo the GPU count).
    """
    path = resolve_model_dir(model_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..model.device import select_device
    from ..model.inference import CTReasonerPipeline

    device = select_device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        import torch
        # ranks beyond the GPU count share GPUs round-robin rather than fail
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    try:
        return CTReasonerPipeline.from_pretrained(path, device=device)
    except CTReasonerError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to load the files means a broken folder
        raise ModelError(f"model folder {path} cannot be loaded ({type(exc).__name__}: {exc})",
                         "the folder is incomplete or corrupt; re-save it or pass another --model") from exc


# --------------------------------------------------------------------------------------------- chat
def check_turns(turns: Sequence[ChatTurn]) -> List[ChatTurn]:
    turns = list(turns)
    if not turns:
        raise ConfigError("no query was given", 'give a query, e.g. "segment the liver"')
    for turn in turns:
        if not str(turn.query).strip():
            raise ConfigError("the query is empty", 'give a query, e.g. "segment the liver"')
    return turns


def chat_volume(pipeline, volume: Volume, turns: Sequence[ChatTurn], slices: Sequence[int],
                on_slice: Optional[Callable[[SliceChat], None]] = None) -> VolumeChat:
    """Run ``turns`` on each axial slice ``k`` in ``slices`` (in order) and collect the answers.

    pipeline: anything with ``chat(image_hu (H, W), query, history, closer_look=...) -> ChatResult`` whose
    masks are (H, W) bool in the slice's pixel frame; one whose ``neighbour_distance_mm`` is not None also gets
    ``neighbours_hu`` (see ``slice_neighbours``).
    on_slice: called after each slice (progress reporting).
    """
    turns = check_turns(turns)
    outcome = VolumeChat(volume=volume, turns=turns)
    for k in slices:
        axial = extract_axial_slice(volume, k)
        neighbours = slice_neighbours(pipeline, volume, axial)
        # a pipeline that reads no neighbours gets no such argument (stand-ins need not know it)
        context = {} if neighbours is None else {"neighbours_hu": neighbours}
        history: List[Tuple[str, str]] = []
        results = []
        started = time.perf_counter()
        for turn in turns:
            result = pipeline.chat(axial.pixels, turn.query, history=list(history), closer_look=turn.closer_look,
                                   **context)
            results.append(result)
            history.extend(result.history_turns(turn.query))
        slice_chat = SliceChat(k=int(k), results=results, seconds=time.perf_counter() - started)
        outcome.slices.append(slice_chat)
        log.debug("slice %d: %d turn(s) in %.2f s", k, len(turns), slice_chat.seconds)
        if on_slice is not None:
            on_slice(slice_chat)
    return outcome


def slice_neighbours(pipeline, volume: Volume, axial: AxialSlice) -> Optional[np.ndarray]:
    """(2, J, I) HU of the slices about the pipeline's ``neighbour_distance_mm`` below and above ``axial`` (clamped
    to the volume), as the evaluation sends them; None when the pipeline's pixel network reads no neighbours."""
    distance = getattr(pipeline, "neighbour_distance_mm", None)
    if distance is None:
        return None
    return neighbour_slices(volume.array, axial.k, neighbour_offset(axial.slice_spacing, distance))


def read_axial_volume(source: str, series_uid: Optional[str] = None) -> Volume:
    """Read a CT the data layer reads; a volume stored sagittally/coronally gets its axes permuted so that K
    is axial (exact, no resampling: the outputs then use that grid, which Slicer places identically)."""
    from ..io.readers import read_volume
    from ..io.slices import axial_axis, reorient_axial

    volume = read_volume(source, series_uid=series_uid)
    if axial_axis(volume) != 2:
        log.info("%s is not stored as axial slices; permuting its axes so that K is axial", source)
        volume = reorient_axial(volume)
    volume.metadata.setdefault("source", str(source))
    return volume
