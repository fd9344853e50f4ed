"""Reader of curated datasets (``ctreasoner curate`` output, format in docs/dataset.md). numpy only.

    dataset = CuratedDataset("/data/btcvpp", "train", tasks=("seg", "det"))
    sample = dataset[0]
    sample.image_hu   # (H, W) int16 HU, loaded lazily and cached per subject
    sample.mask       # (H, W) bool, labels == sample.label (all False for absent targets)
    sample.boxes      # (N, 4) float32 xyxy pixels, x = column, exclusive max

Pixel spacing is ``sample.spacing`` = (row mm, column mm) = (spacing J, spacing I).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from ..errors import ConfigError, InputFileError

DATASET_FORMAT = "ctreasoner-btcvpp"
SUPPORTED_VERSIONS = (1,)
SPLITS = ("train", "val", "test")
TASKS = ("seg", "det", "absent")
REVIEW_STATES = ("accepted", "flagged", "rejected")


class SubjectSlices:
    """The retained slices of the subjects of one dataset, loaded on first use and kept in an LRU cache."""

    def __init__(self, root: Path, max_subjects: int = 8):
        self.root = root
        self.max_subjects = max_subjects
        self._cache: "OrderedDict[str, Dict[str, np.ndarray]]" = OrderedDict()

    def __getstate__(self):
        # Samples and datasets travel to DataLoader workers; the cache stays behind (each process fills its own).
        return {"root": self.root, "max_subjects": self.max_subjects, "_cache": OrderedDict()}

    def arrays(self, subject: str) -> Dict[str, np.ndarray]:
        if subject in self._cache:
            self._cache.move_to_end(subject)
            return self._cache[subject]
        path = self.root / "slices" / f"{subject}.npz"
        if not path.is_file():
            raise InputFileError(f"{path} is missing from the dataset", "re-run ctreasoner curate for this dataset")
        with np.load(path) as npz:
            arrays = {name: npz[name] for name in npz.files}
        self._cache[subject] = arrays
        while len(self._cache) > self.max_subjects:
            self._cache.popitem(last=False)
        return arrays


@dataclass
class Sample:
    """One record (slice, organ, task) with lazy pixel access."""
    id: str
    subject: str
    slice_index: int                    # k in the source volume
    slice_pos: int                      # index into the subject's npz arrays
    organ: str
    label: int
    task: str                           # seg | det | absent
    query_task: str                     # what the query asks for (seg | det), also for absent targets
    implicit: bool
    present: bool
    turns: List[Dict[str, str]]
    boxes: np.ndarray                   # (N, 4) float32 xyxy
    center: Optional[np.ndarray]        # (2,) float32 (x, y) on the mask, None when absent
    description: Optional[Dict[str, Any]]
    review: Dict[str, Any]
    spacing: np.ndarray                 # (2,) (row mm, column mm)
    ijk_to_ras: np.ndarray              # (4, 4) of the source volume
    history: List[Dict[str, str]] = field(default_factory=list)  # earlier turns of the chat (not supervised)
    _slices: SubjectSlices = field(repr=False, compare=False, default=None)

    @property
    def image_hu(self) -> np.ndarray:
        """(H, W) int16 HU."""
        return self._slices.arrays(self.subject)["image"][self.slice_pos]

    @property
    def neighbours_hu(self) -> Optional[np.ndarray]:
        """(2, H, W) int16 HU of the slices either side (below, above in K), or None for a dataset curated
        without them (before they were stored)."""
        neighbours = self._slices.arrays(self.subject).get("neighbours")
        return None if neighbours is None else neighbours[self.slice_pos]

    @property
    def labels(self) -> np.ndarray:
        """(H, W) uint8 organ labels of the whole slice."""
        return self._slices.arrays(self.subject)["labels"][self.slice_pos]

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool mask of this sample's organ (all False for an absent target)."""
        return self.labels == self.label

    @property
    def review_state(self) -> str:
        return self.review["state"]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFileError(f"{path} is missing", f"{what}; re-run ctreasoner curate") from None
    except ValueError as exc:
        raise InputFileError(f"{path} is not valid JSON ({exc})", "the dataset is damaged; re-run ctreasoner curate") from exc


def load_dataset_info(root: Union[str, Path]) -> Dict[str, Any]:
    """``dataset.json`` of a curated dataset, after checking format and version."""
    root = Path(root)
    if not root.is_dir():
        raise InputFileError(f"dataset folder {root} does not exist",
                             "create one with: ctreasoner curate --phantoms 40 --out DIR")
    manifest = root / "dataset.json"
    if not manifest.is_file():
        raise InputFileError(f"{root} is not a CTReasoner dataset (no dataset.json)",
                             "point at a folder written by ctreasoner curate")
    info = _read_json(manifest, "every dataset has one")
    if not isinstance(info, dict) or info.get("format") != DATASET_FORMAT:
        raise InputFileError(f"{manifest} is not a CTReasoner dataset manifest "
                             f"(format {info.get('format') if isinstance(info, dict) else None!r})",
                             f"expected format '{DATASET_FORMAT}'")
    if info.get("version") not in SUPPORTED_VERSIONS:
        raise InputFileError(f"{root}: dataset version {info.get('version')!r} is not supported "
                             f"(this CTReasoner reads version {', '.join(map(str, SUPPORTED_VERSIONS))})",
                             "update CTReasoner, or re-curate the dataset with this version")
    return info


def load_splits(root: Union[str, Path]) -> Dict[str, List[str]]:
    return _read_json(Path(root) / "splits.json", "it lists the subjects of each split")


def _read_records(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        raise InputFileError(f"{path} is missing", "re-run ctreasoner curate for this dataset")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as exc:
                    raise InputFileError(f"{path} line {number} is not valid JSON ({exc})",
                                         "fix or regenerate the records file") from exc
    return records


class CuratedDataset(Sequence):
    """The samples of one split, optionally restricted to some tasks and review states."""

    def __init__(self, root: Union[str, Path], split: str = "train", tasks: Optional[Sequence[str]] = None,
                 include_flagged: bool = True, include_rejected: bool = False, max_cached_subjects: int = 8):
        self.root = Path(root)
        self.info = load_dataset_info(self.root)
        if split not in SPLITS:
            raise ConfigError(f"unknown split '{split}'", f"use one of {', '.join(SPLITS)}")
        unknown = sorted(set(tasks or ()) - set(TASKS))
        if unknown:
            raise ConfigError(f"unknown task(s) {', '.join(unknown)}", f"use some of {', '.join(TASKS)}")
        self.split = split
        self.tasks = tuple(tasks) if tasks else TASKS
        states = {"accepted"} | ({"flagged"} if include_flagged else set()) | ({"rejected"} if include_rejected else set())
        self.records = [r for r in _read_records(self.root / "records" / f"{split}.jsonl")
                        if r["task"] in self.tasks and r["review"]["state"] in states]
        self._slices = SubjectSlices(self.root, max_cached_subjects)
        self._geometry = {subject: (np.array([meta["spacing"][1], meta["spacing"][0]], dtype=np.float64),
                                    np.asarray(meta["ijk_to_ras"], dtype=np.float64))
                          for subject, meta in self.info.get("subjects", {}).items()}

    @property
    def organs(self) -> List[str]:
        """Organ keys in label order (label = index + 1)."""
        return list(self.info["organs"])

    @property
    def subjects(self) -> List[str]:
        return sorted({r["subject"] for r in self.records})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        record = self.records[index]
        if record["subject"] not in self._geometry:
            raise InputFileError(f"{self.root}: subject {record['subject']} has no entry in dataset.json",
                                 "the dataset is damaged; re-run ctreasoner curate")
        spacing, ijk_to_ras = self._geometry[record["subject"]]
        boxes = np.asarray(record["boxes"], dtype=np.float32).reshape(-1, 4)
        center = None if record["center"] is None else np.asarray(record["center"], dtype=np.float32)
        return Sample(id=record["id"], subject=record["subject"], slice_index=record["slice_index"],
                      slice_pos=record["slice_pos"], organ=record["organ"], label=record["label"],
                      task=record["task"], query_task=record.get("query_task", record["task"]),
                      implicit=record["implicit"], present=record["present"], turns=record["turns"], boxes=boxes,
                      center=center, description=record["description"], review=record["review"],
                      spacing=spacing, ijk_to_ras=ijk_to_ras, history=record.get("history", []),
                      _slices=self._slices)

    def __iter__(self) -> Iterator[Sample]:
        for index in range(len(self)):
            yield self[index]
