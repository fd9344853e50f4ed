"""Orchestration: sources -> selected slices -> prompts, descriptions, review, Q&A -> dataset folder.

Layout written (documented in docs/dataset.md)::

    DIR/dataset.json                 format, version, organs, config, counts, per-subject geometry
    DIR/splits.json                  {"train": [subjects], "val": [...], "test": [...]}
    DIR/slices/<subject>.npz         image int16 (S,H,W) HU, labels uint8 (S,H,W), slice_indices (S,),
                                     neighbours int16 (S,2,H,W) HU (the slices about
                                     neighbour_distance_mm below and above), spacing (3,) IJK mm,
                                     ijk_to_ras (4,4)
    DIR/records/{train,val,test}.jsonl   one record per (slice, organ, task)

Volumes are processed in a process pool; every random choice is seeded from (config.seed, subject,
slice), so the output does not depend on scheduling or worker count.
"""
from __future__ import annotations

import datetime
import json
import logging
import shutil
import time
import zlib
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...errors import ConfigError, InputFileError
from ...io.slices import neighbour_offset, neighbour_slices
from ...io.volume import Volume
from ...organs import ORGAN_BY_KEY, ORGANS
from ..dataset import DATASET_FORMAT, SPLITS, SUPPORTED_VERSIONS
from .config import CurationConfig
from .describe import describe_organ
from .measure import build_slice_context, measure_organ
from .prompts import organ_prompts
from .qa import PresentOrgan, slice_records
from .review import FLAGGED, review_description
from .selection import select_slices

logger = logging.getLogger(__name__)

DATASET_VERSION = SUPPORTED_VERSIONS[-1]
HU_RANGE = (-1024, 3071)


@dataclass
class SubjectCuration:
    subject: str
    records: List[Dict[str, Any]]
    info: Dict[str, Any]
    arrays: Optional[Dict[str, np.ndarray]] = None  # dropped once written to disk


@dataclass
class CurationSummary:
    root: Path
    counts: Dict[str, Any]
    seconds: float
    splits: Dict[str, List[str]] = field(default_factory=dict)


def subject_rng(seed: int, subject: str, slice_index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(subject.encode()), int(slice_index)])


def to_hu_int16(array: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(array), *HU_RANGE).astype(np.int16)


def _check_inputs(subject: str, ct: Volume, labels: np.ndarray) -> None:
    if labels.shape != ct.array.shape:
        raise InputFileError(f"subject {subject}: labels {labels.shape} and CT {ct.array.shape} differ in shape",
                             "give a label map on the CT's voxel grid")
    top = int(labels.max(initial=0))
    if top > len(ORGANS):
        raise InputFileError(f"subject {subject}: label value {top} is not an organ label (1..{len(ORGANS)})",
                             "remap source labels with a label-name mapping (--mapping)")


def _axial_k(ct: Volume, labels: np.ndarray) -> Tuple[Volume, np.ndarray]:
    """Both arrays with K as the axial axis (a permutation of voxel axes, no resampling)."""
    from ...io.slices import axial_axis, reorient_axial

    if axial_axis(ct) == 2:
        return ct, labels
    return reorient_axial(ct), reorient_axial(ct.with_array(labels)).array


def describe_slice_organ(image_hu: np.ndarray, context, organ_key: str, prompts, config: CurationConfig,
                         writer=None) -> Tuple[Dict[str, Any], str, List[str]]:
    """(description, review state, reasons) for one organ on one slice."""
    geometry = measure_organ(context, organ_key, prompts, config)
    description = describe_organ(geometry, config)
    fallback_reason = None
    if writer is not None:
        written, problem = writer.describe(image_hu, organ_key, prompts, context.spacing_rc)
        if problem is None:
            description = written
        else:
            fallback_reason = f"LLM writer failed ({problem}); offline description used"
    state, reasons = review_description(description, geometry, config)
    if fallback_reason:
        state, reasons = FLAGGED, [fallback_reason] + reasons
    return description, state, reasons


def curate_volume(subject: str, ct: Volume, labels: np.ndarray, config: CurationConfig,
                  annotated_organs: Optional[Sequence[str]] = None, writer=None) -> SubjectCuration:
    """Select, describe and question one (CT, label map) pair.

    ct: Volume with array (K, J, I) HU and K axial; labels: (K, J, I) organs.py values.
    """
    _check_inputs(subject, ct, labels)
    ct, labels = _axial_k(ct, labels)
    annotated = list(annotated_organs) if annotated_organs is not None else [o.key for o in ORGANS]
    selection = select_slices(labels, config)
    image = to_hu_int16(ct.array[selection.retained]) if selection.retained else np.zeros((0,) + ct.array.shape[1:], np.int16)
    label_slices = labels[selection.retained].astype(np.uint8)
    ijk_to_ras = ct.ijk_to_ras
    records: List[Dict[str, Any]] = []
    for pos, k in enumerate(selection.retained):
        context = build_slice_context(image[pos], label_slices[pos], k, ijk_to_ras, ct.spacing)
        areas = np.bincount(label_slices[pos].ravel(), minlength=len(ORGANS) + 1)
        present = []
        for organ in ORGANS:
            if areas[organ.label] < config.min_organ_area_px:
                continue
            prompts = organ_prompts(label_slices[pos] == organ.label, config.min_component_area_px)
            description, state, reasons = describe_slice_organ(image[pos], context, organ.key, prompts, config, writer)
            present.append(PresentOrgan(organ.key, prompts, description, state, reasons))
        absent = [key for key in annotated if areas[ORGAN_BY_KEY[key].label] == 0]
        records += slice_records(subject, k, pos, present, absent, config, subject_rng(config.seed, subject, k))
    info = {
        "n_slices": len(selection.retained), "n_volume_slices": int(labels.shape[0]),
        "shape": [int(s) for s in ct.array.shape[1:]], "spacing": [float(s) for s in ct.spacing],
        "ijk_to_ras": np.round(ijk_to_ras, 6).tolist(),
        "selection": {"retained": len(selection.retained), "dropped_background": selection.dropped_background,
                      "dropped_redundant": selection.dropped_redundant},
        "n_records": len(records),
    }
    offset = neighbour_offset(ct.spacing[2], config.neighbour_distance_mm)
    neighbours = (np.stack([to_hu_int16(neighbour_slices(ct.array, k, offset)) for k in selection.retained])
                  if selection.retained else np.zeros((0, 2) + ct.array.shape[1:], np.int16))
    arrays = {"image": image, "labels": label_slices, "neighbours": neighbours,
              "slice_indices": np.asarray(selection.retained, dtype=np.int32),
              "spacing": np.asarray(ct.spacing, dtype=np.float64), "ijk_to_ras": np.asarray(ijk_to_ras, dtype=np.float64)}
    return SubjectCuration(subject, records, info, arrays)


def _curate_source(job) -> SubjectCuration:
    source, config, annotated, writer, slices_dir = job
    ct, labels = source.load()
    result = curate_volume(source.subject, ct, labels, config, annotated, writer)
    np.savez_compressed(Path(slices_dir) / f"{source.subject}.npz", **result.arrays)
    result.arrays = None
    return result


def split_subjects(subjects: Sequence[str], fractions: Sequence[float], seed: int) -> Dict[str, List[str]]:
    """Subject-level train/val/test split; every subject lands in exactly one split."""
    ordered = sorted(subjects)
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    total = float(sum(fractions))
    n = len(shuffled)
    n_val = int(round(n * fractions[1] / total))
    n_test = int(round(n * fractions[2] / total))
    # Small datasets still get an evaluation subject before a validation one.
    if n >= 2 and fractions[2] > 0 and n_test == 0:
        n_test = 1
    if n >= 3 and fractions[1] > 0 and n_val == 0:
        n_val = 1
    while n_val + n_test >= n and n > 0 and (n_val or n_test):
        if n_val:
            n_val -= 1
        else:
            n_test -= 1
    return {"train": sorted(shuffled[n_val + n_test:]), "val": sorted(shuffled[:n_val]),
            "test": sorted(shuffled[n_val:n_val + n_test])}


def prepare_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "dataset.json").is_file():
            raise ConfigError(f"{out_dir} exists and is not a CTReasoner dataset",
                              "choose a new or empty output folder")
        if not overwrite:
            raise ConfigError(f"{out_dir} already holds a dataset", "pass --overwrite to replace it")
        for name in ("slices", "records"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
        for name in ("dataset.json", "splits.json", "review_report.md"):
            (out_dir / name).unlink(missing_ok=True)
    (out_dir / "slices").mkdir(parents=True, exist_ok=True)
    (out_dir / "records").mkdir(parents=True, exist_ok=True)


def _write_jsonl(path: Path, records: Sequence[Dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")


def _counts(records_by_split: Dict[str, List[Dict[str, Any]]], subjects: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    every = [r for records in records_by_split.values() for r in records]
    tally = lambda key: {v: sum(1 for r in every if key(r) == v) for v in sorted({key(r) for r in every})}  # noqa: E731
    return {
        "subjects": len(subjects), "slices": sum(s["n_slices"] for s in subjects.values()),
        "records": len(every), "records_per_split": {s: len(records_by_split[s]) for s in SPLITS},
        "slices_per_split": {s: sum(v["n_slices"] for v in subjects.values() if v["split"] == s) for s in SPLITS},
        "tasks": tally(lambda r: r["task"]), "review": tally(lambda r: r["review"]["state"]),
        "implicit": sum(r["implicit"] for r in every),
        "closer_look": sum(len(r["turns"]) > 1 for r in every),
        "followup": sum(bool(r.get("history")) for r in every),
        "multi_instance": sum(len(r["boxes"]) > 1 for r in every),
    }


def curate_dataset(sources: Sequence[Any], out_dir, config: Optional[CurationConfig] = None, workers: int = 2,
                   annotated_organs: Optional[Sequence[str]] = None, writer=None, source_description: str = "",
                   overwrite: bool = False, progress: bool = True) -> CurationSummary:
    """Curate every source into a dataset folder at ``out_dir``; returns counts and timing."""
    config = config or CurationConfig()
    started = time.perf_counter()
    subjects = [s.subject for s in sources]
    if not sources:
        raise ConfigError("nothing to curate: no input subjects", "give --phantoms N or --images/--labels")
    duplicates = sorted({s for s in subjects if subjects.count(s) > 1})
    if duplicates:
        raise ConfigError(f"subject ids are not unique: {', '.join(duplicates)}", "give each input file a distinct name")
    out_dir = Path(out_dir)
    prepare_output(out_dir, overwrite)
    jobs = [(source, config, annotated_organs, writer, str(out_dir / "slices")) for source in sources]

    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="curate", unit="volume", disable=not progress)
    results: List[SubjectCuration] = []
    if workers > 1 and len(jobs) > 1:
        with get_context().Pool(min(workers, len(jobs))) as pool:
            for result in pool.imap(_curate_source, jobs):
                results.append(result)
                bar.update()
    else:
        for job in jobs:
            results.append(_curate_source(job))
            bar.update()
    bar.close()

    splits = split_subjects(subjects, config.split_fractions, config.seed)
    split_of = {s: name for name, members in splits.items() for s in members}
    subject_info = {r.subject: dict(r.info, split=split_of[r.subject]) for r in results}
    records_by_split: Dict[str, List[Dict[str, Any]]] = {name: [] for name in SPLITS}
    for result in results:
        records_by_split[split_of[result.subject]].extend(result.records)
    for name in SPLITS:
        _write_jsonl(out_dir / "records" / f"{name}.jsonl", records_by_split[name])
    (out_dir / "splits.json").write_text(json.dumps(splits, indent=1))
    counts = _counts(records_by_split, subject_info)
    seconds = time.perf_counter() - started
    manifest = {
        "format": DATASET_FORMAT, "version": DATASET_VERSION,
        "organs": [o.key for o in ORGANS],
        "annotated_organs": list(annotated_organs) if annotated_organs is not None else [o.key for o in ORGANS],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source_description, "writer": writer.name if writer is not None else "geometry",
        "config": config.to_dict(), "counts": counts, "curation_seconds": round(seconds, 1),
        "subjects": subject_info,
    }
    (out_dir / "dataset.json").write_text(json.dumps(manifest, indent=1))
    logger.info("curated %d subjects, %d slices, %d records into %s in %.1f s",
                counts["subjects"], counts["slices"], counts["records"], out_dir, seconds)
    return CurationSummary(out_dir, counts, seconds, splits)
