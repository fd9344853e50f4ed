"""Fixtures for the headless CLI tests (test_chat_cli, test_batch_cli): small phantom CT files, a tiny
random-init model folder, and a label-backed pipeline whose masks are never empty."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PHANTOM_SHAPE = (64, 64, 10)      # (I, J, K): small enough for seconds-long tests, large enough for all organs


def oblique_directions(degrees: float = 25.0) -> np.ndarray:
    """Axial slices rotated about S, with I flipped (LPS-like, left-handed): a non-identity grid."""
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    return rotation @ np.diag([-1.0, 1.0, 1.0])


def stored_sagittally(volume):
    """The same voxels with the axial axis stored as I (array [i, j, k] of the axial volume): K is not axial."""
    from dataclasses import replace

    return replace(volume, array=np.ascontiguousarray(volume.array.transpose(2, 1, 0)), spacing=volume.spacing[::-1],
                   directions=volume.directions[:, ::-1])


def write_phantom(folder: Path, seed: int = 3, directions: Optional[np.ndarray] = None, suffix: str = ".nrrd",
                  sagittal: bool = False):
    """Write a phantom CT and its labels (optionally rotated, or stored sagittally); returns
    (ct path, ct Volume, labels Volume) as written."""
    from dataclasses import replace

    from CTReasonerLib.data.phantom import PhantomConfig, generate_phantom
    from CTReasonerLib.io.writers import write_labelmap, write_volume

    ct, labels = generate_phantom(seed, PhantomConfig(shape=PHANTOM_SHAPE))
    if directions is not None:
        ct, labels = replace(ct, directions=directions), replace(labels, directions=directions)
    if sagittal:
        ct, labels = stored_sagittally(ct), stored_sagittally(labels)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"phantom_{seed}{suffix}"
    write_volume(ct, path)
    write_labelmap(labels, folder / f"phantom_{seed}_labels{suffix}")
    return path, ct, labels


class LabelPipeline:
    """A stand-in for CTReasonerPipeline that answers from a phantom's label map (never an empty mask).

    It looks the slice up in the CT it was given, splits the query with the real ``model/query.py`` and answers
    each sub-query from the labels: [SEG] -> the organ's mask, [DET] -> one edge-xyxy box per connected part.
    """

    def __init__(self, ct, labels):
        self.ct, self.labels = ct, labels
        self.calls = 0

    def chat(self, image_hu, query, history=None, closer_look=None):
        from scipy import ndimage

        from CTReasonerLib.model.query import split_compound_query
        from CTReasonerLib.organs import get_organ
        from CTReasonerLib.results import BoxPrediction, ChatResult, CloserLookInfo, MaskPrediction

        self.calls += 1
        k = next(k for k in range(self.ct.array.shape[0]) if np.array_equal(self.ct.array[k], image_hu))
        result = ChatResult(text="", routing_tokens=[])
        for sub in split_compound_query(query):
            present = self.labels.array[k] == get_organ(sub.organ).label
            result.target_organ = result.target_organ or sub.organ
            if not present.any():
                result.absent = True
                result.text += f"The {sub.organ} is not visible on this slice. "
                continue
            if sub.task == "seg":
                result.masks.append(MaskPrediction(sub.organ, present, score=0.9, round=2 if closer_look else 1))
                result.routing_tokens.append("[SEG]")
            else:
                parts, count = ndimage.label(present)
                for index in range(1, count + 1):
                    ys, xs = np.nonzero(parts == index)
                    result.boxes.append(BoxPrediction(sub.organ, np.array([xs.min(), ys.min(), xs.max() + 1,
                                                                            ys.max() + 1], np.float32), 0.8))
                result.routing_tokens.append("[DET]")
            result.text += f"The {sub.organ.replace('_', ' ')} is here. "
        if closer_look:
            result.closer_look = CloserLookInfo(ran=True, roi_xyxy=np.array([0, 0, 8, 8]), canonical_size=64,
                                                organ=result.target_organ)
        result.raw_text = result.text + " ".join(result.routing_tokens)
        result.timings_ms = {"total": 1.0}
        return result


class NeighbourRecordingPipeline(LabelPipeline):
    """A LabelPipeline whose pixel network reads the slices ``neighbour_distance_mm`` either side (None: it reads
    none); it records, per chat call, the slice index and the ``neighbours_hu`` it was given (NOT_GIVEN if none)."""

    NOT_GIVEN = "not given"

    def __init__(self, ct, labels, neighbour_distance_mm):
        super().__init__(ct, labels)
        self.neighbour_distance_mm = neighbour_distance_mm
        self.received = []

    def chat(self, image_hu, query, history=None, closer_look=None, neighbours_hu=NOT_GIVEN):
        k = next(k for k in range(self.ct.array.shape[0]) if np.array_equal(self.ct.array[k], image_hu))
        self.received.append((k, neighbours_hu))
        return super().chat(image_hu, query, history, closer_look)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init tiny CTReasoner saved with save_pretrained (what ``--model DIR`` loads)."""
    import torch

    from fixtures_model import tiny_model_config

    from CTReasonerLib.model.ctreasoner import CTReasonerModel

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tiny_model")
    # A random model never stops early: a short answer keeps each chat turn well under a second.
    CTReasonerModel.build_tiny(tiny_model_config(max_new_tokens=12)).save_pretrained(str(folder))
    return folder
