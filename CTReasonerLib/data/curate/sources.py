"""Where curation inputs come from: phantoms, (image, label map) file pairs with a label-name mapping,
TotalSegmentator subject folders, or volumes already in memory.

A source is small and picklable; worker processes call ``load()`` themselves so that volumes never
travel between processes.
"""
from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ...errors import ConfigError, InputFileError
from ...io.volume import Volume
from ...organs import ORGANS, get_organ

MAPPINGS_DIR = Path(__file__).with_name("mappings")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class LabelMapping:
    """Source label values (and, for per-structure files, file stems) -> organs.py keys."""
    name: str
    labels: Dict[int, str] = field(default_factory=dict)
    files: Dict[str, str] = field(default_factory=dict)

    @property
    def annotated_organs(self) -> List[str]:
        """Organ keys this mapping annotates, in label order (absent-target questions stay inside this set)."""
        keys = set(self.labels.values()) | set(self.files.values())
        return [o.key for o in ORGANS if o.key in keys]

    def remap(self, array: np.ndarray) -> np.ndarray:
        """Source label array -> uint8 organs.py labels; unmapped values become background."""
        lookup = np.zeros(int(max(self.labels, default=0)) + 1, dtype=np.uint8)
        for value, key in self.labels.items():
            lookup[value] = get_organ(key).label
        values = np.asarray(array)
        if values.size and (values.min() < 0):
            raise InputFileError(f"label map has negative values (min {values.min()})",
                                 "give an integer label map with background 0")
        out_of_table = values >= len(lookup)
        return np.where(out_of_table, 0, lookup[np.where(out_of_table, 0, values)]).astype(np.uint8)


def load_mapping(name_or_path: str) -> LabelMapping:
    """A shipped mapping (``btcv``, ``totalsegmentator``, ``amos``) or a JSON file of the same form."""
    shipped = MAPPINGS_DIR / f"{name_or_path}.json"
    path = shipped if shipped.is_file() else Path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in MAPPINGS_DIR.glob("*.json")))
        raise ConfigError(f"label mapping '{name_or_path}' is neither a shipped mapping nor a file",
                          f"use one of {known}, or a JSON file like CTReasonerLib/data/curate/mappings/btcv.json")
    try:
        data = json.loads(path.read_text())
        labels = {int(value): get_organ(key).key for value, key in data.get("labels", {}).items()}
        files = {stem: get_organ(key).key for stem, key in data.get("files", {}).items()}
    except (ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(f"label mapping {path} is not valid: {exc}",
                          'write {"labels": {"1": "spleen", ...}} with organ keys from CTReasonerLib/organs.py') from exc
    if not labels and not files:
        raise ConfigError(f"label mapping {path} maps no labels", 'add a "labels" or "files" table')
    return LabelMapping(name=data.get("name", path.stem), labels=labels, files=files)


def _axial(volume: Volume) -> Volume:
    from ...io.slices import reorient_axial

    return reorient_axial(volume)


def _check_same_grid(ct: Volume, labels: Volume, what: str) -> None:
    same = (ct.array.shape == labels.array.shape and np.allclose(ct.spacing, labels.spacing, atol=1e-3)
            and np.allclose(ct.origin, labels.origin, atol=1e-2) and np.allclose(ct.directions, labels.directions, atol=1e-4))
    if not same:
        raise InputFileError(f"{what}: the label map is not on the CT's voxel grid "
                             f"(CT {ct.array.shape[::-1]} at {np.round(ct.spacing, 3)} mm, "
                             f"labels {labels.array.shape[::-1]} at {np.round(labels.spacing, 3)} mm)",
                             "resample the label map onto the CT grid (nearest neighbour) first")


@dataclass
class PhantomSource:
    subject: str
    seed: int
    phantom_options: Dict[str, Any] = field(default_factory=dict)

    def load(self) -> Tuple[Volume, np.ndarray]:
        from ..phantom import PhantomConfig, generate_phantom

        ct, labels = generate_phantom(self.seed, PhantomConfig(**self.phantom_options))
        return ct, np.asarray(labels.array, dtype=np.uint8)


@dataclass
class FilePairSource:
    subject: str
    image_path: str
    label_path: str
    mapping: LabelMapping

    def load(self) -> Tuple[Volume, np.ndarray]:
        from ...io.readers import read_labelmap, read_volume

        ct, labels = read_volume(self.image_path), read_labelmap(self.label_path)
        _check_same_grid(ct, labels, self.label_path)
        ct, labels = _axial(ct), _axial(labels)
        return ct, self.mapping.remap(labels.array)


@dataclass
class TotalSegmentatorSource:
    """``<subject>/ct.nii.gz`` with ``<subject>/segmentations/<structure>.nii.gz`` masks."""
    subject: str
    ct_path: str
    segmentation_dir: str
    mapping: LabelMapping

    def load(self) -> Tuple[Volume, np.ndarray]:
        from ...io.readers import read_labelmap, read_volume

        ct = read_volume(self.ct_path)
        combined = np.zeros(ct.array.shape, dtype=np.uint8)
        found = 0
        for stem, key in self.mapping.files.items():
            path = _find_image(Path(self.segmentation_dir), stem)
            if path is None:
                continue
            mask = read_labelmap(path)
            _check_same_grid(ct, mask, str(path))
            combined[mask.array > 0] = get_organ(key).label
            found += 1
        if found == 0:
            raise InputFileError(f"{self.segmentation_dir}: none of the mapped structure masks are there",
                                 f"expected files such as {', '.join(list(self.mapping.files)[:3])} (.nii.gz)")
        return _axial(ct), _axial(ct.with_array(combined)).array


@dataclass
class VolumeSource:
    """Volumes already in memory (API use and tests); labels must already hold organs.py values."""
    subject: str
    ct: Volume
    labels: np.ndarray

    def load(self) -> Tuple[Volume, np.ndarray]:
        return self.ct, np.asarray(self.labels, dtype=np.uint8)


def _strip_suffix(name: str) -> Optional[str]:
    lower = name.lower()
    return next((name[: -len(s)] for s in IMAGE_SUFFIXES if lower.endswith(s)), None)


def _find_image(folder: Path, stem: str) -> Optional[Path]:
    return next((folder / f"{stem}{s}" for s in IMAGE_SUFFIXES if (folder / f"{stem}{s}").is_file()), None)


def _list_images(spec: str, what: str) -> Dict[str, Path]:
    """Files of a folder or glob, keyed by name without image suffix."""
    path = Path(spec)
    candidates = sorted(path.iterdir()) if path.is_dir() else sorted(Path(p) for p in glob.glob(spec))
    files = {_strip_suffix(p.name): p for p in candidates if p.is_file() and _strip_suffix(p.name)}
    if not files:
        raise InputFileError(f"no {what} found at {spec}",
                             f"give a folder or a glob of {'/'.join(IMAGE_SUFFIXES)} files")
    return files


def _subject_key(stem: str) -> str:
    """BTCV pairs img0001 with label0001, AMOS amos_0001 with amos_0001: match on the digits when names differ."""
    digits = re.findall(r"\d+", stem)
    return (digits[-1].lstrip("0") or "0") if digits else stem


def discover_file_pairs(images: str, labels: str, mapping: LabelMapping) -> List[FilePairSource]:
    image_files, label_files = _list_images(images, "CT images"), _list_images(labels, "label maps")
    pairs: Dict[str, Tuple[Path, Path]] = {s: (image_files[s], label_files[s]) for s in image_files if s in label_files}
    if len(pairs) < len(image_files):
        by_number = {_subject_key(s): p for s, p in label_files.items()}
        for stem, image in image_files.items():
            if stem not in pairs and _subject_key(stem) in by_number:
                pairs[stem] = (image, by_number[_subject_key(stem)])
    unpaired = sorted(set(image_files) - set(pairs))
    if unpaired:
        raise InputFileError(f"no label map found for image(s): {', '.join(unpaired[:5])}"
                             f"{' ...' if len(unpaired) > 5 else ''}",
                             "name each label map like its image (or with the same number, e.g. img0001/label0001)")
    return [FilePairSource(_safe_subject(stem), str(image), str(label), mapping)
            for stem, (image, label) in sorted(pairs.items())]


def discover_totalsegmentator(root: str, mapping: LabelMapping) -> List[TotalSegmentatorSource]:
    subjects = sorted(d for d in Path(root).iterdir() if d.is_dir() and _find_image(d, "ct") and (d / "segmentations").is_dir())
    if not subjects:
        raise InputFileError(f"{root}: no TotalSegmentator subject folders (<subject>/ct.nii.gz + segmentations/)",
                             "point --images at the folder that holds the subject folders")
    if not mapping.files:
        raise ConfigError(f"mapping '{mapping.name}' has no per-structure file table",
                          "use --mapping totalsegmentator for the segmentations/ layout")
    return [TotalSegmentatorSource(_safe_subject(d.name), str(_find_image(d, "ct")), str(d / "segmentations"), mapping)
            for d in subjects]


def is_totalsegmentator_layout(path: str) -> bool:
    folder = Path(path)
    return folder.is_dir() and any(d.is_dir() and _find_image(d, "ct") and (d / "segmentations").is_dir()
                                   for d in folder.iterdir())


def _safe_subject(name: str) -> str:
    """Subject ids become file names and record ids."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
