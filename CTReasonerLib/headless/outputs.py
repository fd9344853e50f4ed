"""Slicer-ready files of one headless chat on a volume.

* ``<name>.seg.nrrd``: one named, coloured segment per organ on the volume's grid, each slice's mask at its k
  (``io.slicer_files.write_segmentation``), with the provenance tags the Slicer module uses;
* ``<name>_boxes.mrk.json``: one ROI per box, named ``"<organ> box <k> (<score>)"``, the score in its description;
* ``<name>_overlay.png``: the most informative slice, masks and box outlines in organ colours, with a legend;
* ``transcript.json``: the queries, each slice's reasoning text, routing tokens, target organ, absent flag,
  closer-look ROI, masks, boxes and timings.
"""
from __future__ import annotations

import json
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..io.errors import OutputFileError
from ..io.slicer_files import roi_from_pixel_box, write_roi_markups, write_segmentation
from ..io.volume import Volume
from ..io.windowing import apply_window
from ..organs import get_organ
from ..results import BoxPrediction, ChatResult, MaskPrediction
from ..slicer.segments import TAG_MODEL_ID, TAG_QUERY, TAG_REASONING, TAG_SLICES
from .volume_chat import (ChatTurn, VolumeChat, chat_volume, check_turns, organ_key, parse_slices,
                          read_axial_volume)

TRANSCRIPT_NAME = "transcript.json"
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".dcm", ".ima")
_OVERLAY_MIN_SIDE = 512        # small slices are enlarged so that outlines and the legend stay readable
_MASK_ALPHA = 0.4
_LEGEND_CHARS = 46


@dataclass
class ChatOutputs:
    folder: Path
    segmentation: Path
    boxes: Path
    overlay: Path
    transcript: Path

    def files(self) -> List[Path]:
        return [self.segmentation, self.boxes, self.overlay, self.transcript]


def output_name(source: str) -> str:
    """The file stem of a CT path (``case01.nii.gz`` -> ``case01``; a DICOM folder -> its folder name)."""
    path = Path(str(source).rstrip("/\\"))
    name = path.name
    for suffix in _VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def output_paths(folder: Path, name: str) -> ChatOutputs:
    folder = Path(folder)
    return ChatOutputs(folder=folder, segmentation=folder / f"{name}.seg.nrrd", boxes=folder / f"{name}_boxes.mrk.json",
                       overlay=folder / f"{name}_overlay.png", transcript=folder / TRANSCRIPT_NAME)


def box_names(boxes: Sequence[Tuple[int, BoxPrediction]]) -> List[str]:
    """``"<organ> box <k> (<score>)"`` per box; further boxes of one organ on one slice (a split organ) get
    ``#2``, ``#3``... after ``k`` so that every ROI name is unique."""
    seen: Dict[Tuple[str, int], int] = {}
    names = []
    for k, box in boxes:
        organ = get_organ(organ_key(box.organ)).name
        seen[organ, k] = seen.get((organ, k), 0) + 1
        number = f" #{seen[organ, k]}" if seen[organ, k] > 1 else ""
        names.append(f"{organ} box {k}{number} ({float(box.score):.2f})")
    return names


def write_chat_outputs(chat: VolumeChat, folder: Path, name: str, model_id: str = "",
                       window: str = "abdomen", extra: Optional[Mapping[str, object]] = None) -> ChatOutputs:
    """Write the four files of ``chat`` into ``folder``; ``extra`` is merged into the transcript."""
    paths = output_paths(folder, name)
    try:
        paths.folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFileError(f"{paths.folder}: cannot create the output folder ({exc.strerror})",
                              "choose a writable --out folder") from exc
    started = time.perf_counter()
    volume_masks = chat.organ_masks()
    write_segmentation(paths.segmentation, chat.volume, volume_masks, _segment_provenance(chat, volume_masks, model_id))
    boxes = chat.boxes()
    rois = [dict(name=name, description=f"{get_organ(organ_key(box.organ)).name} on slice {k}", score=float(box.score),
                 **roi_from_pixel_box(chat.volume, box.xyxy, k)) for name, (k, box) in zip(box_names(boxes), boxes)]
    write_roi_markups(paths.boxes, rois)
    k_overlay = chat.most_informative_slice()
    render_overlay(chat, k_overlay, window).save(paths.overlay)
    transcript = build_transcript(chat, name, model_id, k_overlay, paths)
    transcript["timings_s"] = {"write_outputs": round(time.perf_counter() - started, 3)}
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(transcript.get(key), dict):
            transcript[key].update(value)
        else:
            transcript[key] = value
    paths.transcript.write_text(json.dumps(transcript, indent=2))
    return paths


def _segment_provenance(chat: VolumeChat, volume_masks: Mapping[str, np.ndarray], model_id: str) -> Dict[str, dict]:
    query = " / ".join(turn.query for turn in chat.turns)
    provenance = {}
    for key, mask in volume_masks.items():
        reasoning = [result.text for s in chat.slices for result in s.results
                     if any(organ_key(m.organ) == key for m in result.masks)]
        scores = [m.score for chosen in chat.slice_masks().values() for k_organ, m in chosen.items() if k_organ == key]
        provenance[key] = {TAG_QUERY: query, TAG_MODEL_ID: model_id, TAG_REASONING: reasoning[0] if reasoning else "",
                           TAG_SLICES: ",".join(str(k) for k in np.nonzero(mask.any(axis=(1, 2)))[0]),
                           "CTReasoner.score": float(np.mean(scores)) if scores else 0.0}
    return provenance


# --------------------------------------------------------------------------------------------- transcript
def build_transcript(chat: VolumeChat, name: str, model_id: str, overlay_slice: int, paths: ChatOutputs) -> dict:
    volume = chat.volume
    return {
        "name": name,
        "volume": {"source": volume.metadata.get("source", volume.name), "shape_kji": list(volume.array.shape),
                   "spacing_ijk_mm": volume.spacing.tolist(), "ijk_to_ras": volume.ijk_to_ras.tolist()},
        "model": model_id,
        "turns": [{"query": turn.query, "closer_look": turn.closer_look} for turn in chat.turns],
        "slices": [{"k": s.k, "seconds": round(s.seconds, 4),
                    "turns": [_result_record(turn.query, result) for turn, result in zip(chat.turns, s.results)]}
                   for s in chat.slices],
        "overlay_slice": overlay_slice,
        "outputs": {"segmentation": paths.segmentation.name, "boxes": paths.boxes.name, "overlay": paths.overlay.name},
    }


def _result_record(query: str, result: ChatResult) -> dict:
    look = result.closer_look
    return {
        "query": query,
        "text": result.text,
        "raw_text": result.raw_text,
        "routing_tokens": list(result.routing_tokens),
        "target_organ": result.target_organ,
        "absent": bool(result.absent),
        "presence": result.presence, "presence_overruled": bool(result.presence_overruled),
        "presence_rescued": bool(result.presence_rescued),
        "masks": [{"organ": m.organ, "score": float(m.score), "round": int(m.round),
                   "pixels": int(np.count_nonzero(m.mask))} for m in result.masks],
        "boxes": [{"organ": b.organ, "xyxy": [float(v) for v in np.asarray(b.xyxy).reshape(4)],
                   "score": float(b.score), "source": b.source} for b in result.boxes],
        "closer_look": {"ran": bool(look.ran), "organ": look.organ, "canonical_size": int(look.canonical_size),
                        "token_generated": bool(getattr(look, "token_generated", True)),
                        "kept_round": int(getattr(look, "kept_round", 2)),
                        "roi_xyxy": None if look.roi_xyxy is None else [float(v) for v in np.asarray(look.roi_xyxy)]},
        "timings_ms": {key: round(float(value), 3) for key, value in result.timings_ms.items()},
    }


# --------------------------------------------------------------------------------------------- overlay
def render_overlay(chat: VolumeChat, k: int, window: str = "abdomen"):
    """A PIL image of slice ``k``: windowed CT, masks and box outlines in organ colours, a legend on the right.

    Shown as radiologists read axial CT (patient's right on the screen's left, anterior up) when the volume's
    axes allow, so it looks like Slicer's Red view.
    """
    from PIL import Image, ImageDraw, ImageOps

    volume = chat.volume
    gray = (apply_window(volume.array[k], window) * 255.0).round().astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    masks: Dict[str, MaskPrediction] = chat.slice_masks().get(k, {})
    for key, prediction in masks.items():
        mask = np.asarray(prediction.mask, dtype=bool)
        rgb[mask] = (1 - _MASK_ALPHA) * rgb[mask] + _MASK_ALPHA * np.array(get_organ(key).color, np.float32)
    scale = max(1, _OVERLAY_MIN_SIDE // max(gray.shape))
    image = Image.fromarray(rgb.round().astype(np.uint8)).resize((gray.shape[1] * scale, gray.shape[0] * scale),
                                                                 Image.NEAREST)
    draw = ImageDraw.Draw(image)
    for key, prediction in masks.items():
        _draw_outline(draw, np.asarray(prediction.mask, dtype=bool), scale, get_organ(key).color)
    boxes = [box for k_box, box in chat.boxes() if k_box == k]
    for box in boxes:
        x0, y0, x1, y1 = (float(v) * scale for v in np.asarray(box.xyxy).reshape(4))
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=get_organ(organ_key(box.organ)).color,
                       width=2)
    flip_lr, flip_ud = _radiological_flips(volume)
    if flip_lr:
        image = ImageOps.mirror(image)
    if flip_ud:
        image = ImageOps.flip(image)
    return _with_legend(image, _legend_lines(chat, k, masks, boxes))


def _draw_outline(draw, mask: np.ndarray, scale: int, color: Tuple[int, int, int]) -> None:
    from scipy import ndimage

    edge = mask & ~ndimage.binary_erosion(mask)
    for y, x in zip(*np.nonzero(edge)):
        draw.rectangle((x * scale, y * scale, x * scale + scale - 1, y * scale + scale - 1), fill=color)


def _radiological_flips(volume: Volume) -> Tuple[bool, bool]:
    """(mirror, flip): mirror when I runs towards the patient's right, flip when J runs anterior."""
    return bool(volume.directions[0, 0] > 0), bool(volume.directions[1, 1] > 0)


def _legend_lines(chat: VolumeChat, k: int, masks: Mapping[str, MaskPrediction],
                  boxes: Sequence[BoxPrediction]) -> List[Tuple[Optional[Tuple[int, int, int]], str]]:
    pixel_area_cm2 = float(chat.volume.spacing[0] * chat.volume.spacing[1]) / 100.0
    lines: List[Tuple[Optional[Tuple[int, int, int]], str]] = [
        (None, f"{chat.volume.name}  slice k={k} of {chat.volume.array.shape[0]}")]
    lines += [(None, text) for turn in chat.turns for text in textwrap.wrap(f"Q: {turn.query}", _LEGEND_CHARS)]
    for key, prediction in masks.items():
        organ = get_organ(key)
        area = np.count_nonzero(prediction.mask) * pixel_area_cm2
        lines.append((organ.color, f"{organ.name}: {area:.1f} cm2" + (" (closer look)" if prediction.round > 1 else "")))
    for box in boxes:
        organ = get_organ(organ_key(box.organ))
        lines.append((organ.color, f"{organ.name} box ({float(box.score):.2f})"))
    if not masks and not boxes:
        lines.append((None, "no mask or box on this slice"))
    return lines


def _with_legend(image, lines):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line_height, swatch, pad = 16, 11, 8
    width = 300
    height = max(image.height, pad * 2 + line_height * len(lines))
    canvas = Image.new("RGB", (image.width + width, height), (20, 20, 20))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (color, text) in enumerate(lines):
        x, y = image.width + pad, pad + row * line_height
        if color is not None:
            draw.rectangle((x, y + 1, x + swatch, y + 1 + swatch), fill=tuple(color))
            x += swatch + 6
        draw.text((x, y), text[:_LEGEND_CHARS], fill=(235, 235, 235), font=font)
    return canvas


# --------------------------------------------------------------------------------------------- one volume, end to end
@dataclass
class VolumeRun:
    chat: VolumeChat
    outputs: ChatOutputs
    timings_s: Dict[str, float]


def chat_to_files(source: str, pipeline, turns: Sequence[ChatTurn], slices: Optional[str], folder: Path,
                  name: Optional[str] = None, model_id: str = "", window: str = "abdomen",
                  series_uid: Optional[str] = None, on_slice=None, volume: Optional[Volume] = None,
                  timings_s: Optional[Mapping[str, float]] = None) -> VolumeRun:
    """Read ``source`` (or use the already read ``volume``), run ``turns`` on the selected slices, write the files.

    slices: a ``--slices`` value (see ``parse_slices``; None = the middle slice).
    timings_s: earlier stages' seconds (e.g. model loading) to record in the transcript with this run's.
    """
    turns = check_turns(turns)
    timings = {key: round(float(value), 3) for key, value in (timings_s or {}).items()}
    started = time.perf_counter()
    if volume is None:
        volume = read_axial_volume(source, series_uid)
        timings["read_volume"] = round(time.perf_counter() - started, 3)
    indices = parse_slices(slices, volume.array.shape[0])
    chat_started = time.perf_counter()
    chat = chat_volume(pipeline, volume, turns, indices, on_slice=on_slice)
    timings["chat"] = round(time.perf_counter() - chat_started, 3)
    outputs = write_chat_outputs(chat, folder, name or output_name(source), model_id=model_id, window=window,
                                 extra={"timings_s": timings})
    timings = json.loads(outputs.transcript.read_text())["timings_s"]
    return VolumeRun(chat=chat, outputs=outputs, timings_s=timings)


def human_summary(run: VolumeRun) -> str:
    """A few lines for the terminal: each slice's reasoning, what was found, timings and where the files are."""
    chat = run.chat
    lines = [f"{chat.volume.name}: {len(chat.slices)} slice(s), {len(chat.turns)} turn(s)"]
    for slice_chat in chat.slices:
        for turn, result in zip(chat.turns, slice_chat.results):
            found = [f"{_display_name(m.organ)} {np.count_nonzero(m.mask)} px"
                     + (" (closer look)" if m.round > 1 else "") for m in result.masks]
            found += [f"{_display_name(b.organ)} box {float(b.score):.2f}" for b in result.boxes]
            status = "absent" if result.absent else (", ".join(found) or "nothing found")
            lines.append(f"  k={slice_chat.k:<4d} {turn.query!r}: {status}")
            if result.text.strip():
                lines.append(f"         {result.text.strip()[:160]}")
    organs = sorted(get_organ(key).name for key, mask in chat.organ_masks().items() if mask.any())
    lines.append(f"segments: {', '.join(organs) or 'none'};  boxes: {len(chat.boxes())}")
    lines.append("timings: " + ", ".join(f"{key} {value:.2f} s" for key, value in run.timings_s.items()))
    lines.append(f"outputs in {run.outputs.folder}:")
    lines += [f"  {path.name}" for path in run.outputs.files()]
    return "\n".join(lines)


def _display_name(organ: Optional[str]) -> str:
    key = organ_key(organ)
    return get_organ(key).name if key else f"unknown organ {organ!r}"
