"""Dataset-level review: re-check stored descriptions against the stored masks, and the Markdown report
that human reviewers work from (``ctreasoner review DIR``)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Union


from ...organs import get_organ
from ..dataset import SPLITS, SubjectSlices, load_dataset_info
from .config import CurationConfig
from .measure import build_slice_context, measure_organ
from .prompts import organ_prompts
from .review import ACCEPTED, REVIEW_STATES, review_description


def _records_path(root: Path, split: str) -> Path:
    return root / "records" / f"{split}.jsonl"


def load_all_records(root: Union[str, Path]) -> Dict[str, List[Dict[str, Any]]]:
    root = Path(root)
    return {split: [json.loads(line) for line in _records_path(root, split).read_text(encoding="utf-8").splitlines()
                    if line.strip()] for split in SPLITS if _records_path(root, split).is_file()}


def recheck_dataset(root: Union[str, Path]) -> Counter:
    """Re-review every present record's description (e.g. after hand edits) and rewrite the states.

    Returns how many records changed state, keyed by "old->new".
    """
    root = Path(root)
    info = load_dataset_info(root)
    config = CurationConfig.from_dict(info["config"])
    slices = SubjectSlices(root, max_subjects=2)
    changes: Counter = Counter()
    for split, records in load_all_records(root).items():
        for record in records:
            if not record["present"]:
                continue
            arrays = slices.arrays(record["subject"])
            image, labels = arrays["image"][record["slice_pos"]], arrays["labels"][record["slice_pos"]]
            context = build_slice_context(image, labels, record["slice_index"], arrays["ijk_to_ras"], arrays["spacing"])
            prompts = organ_prompts(labels == get_organ(record["organ"]).label, config.min_component_area_px)
            geometry = measure_organ(context, record["organ"], prompts, config)
            state, reasons = review_description(record["description"], geometry, config)
            if state != record["review"]["state"]:
                changes[f"{record['review']['state']}->{state}"] += 1
            record["review"] = {"state": state, "reasons": reasons}
        with open(_records_path(root, split), "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
    return changes


def review_report(root: Union[str, Path]) -> str:
    """Markdown listing of flagged and rejected records with their reasons."""
    root = Path(root)
    info = load_dataset_info(root)
    by_split = load_all_records(root)
    every = [r for records in by_split.values() for r in records]
    states = Counter(r["review"]["state"] for r in every)
    lines = [f"# Review report: {root}", "",
             f"Source: {info.get('source', '?')}; writer: {info.get('writer', '?')}; created {info.get('created', '?')}.", "",
             "| state | records |", "|---|---|"]
    lines += [f"| {state} | {states.get(state, 0)} |" for state in REVIEW_STATES]
    reasons = Counter(reason.split(" but ")[0] for r in every for reason in r["review"]["reasons"])
    if reasons:
        lines += ["", "## Most common reasons", "", "| reason | count |", "|---|---|"]
        lines += [f"| {reason} | {count} |" for reason, count in reasons.most_common(15)]
    for state in ("rejected", "flagged"):
        listed = [(split, r) for split, records in by_split.items() for r in records if r["review"]["state"] == state]
        lines += ["", f"## {state.capitalize()} ({len(listed)})", ""]
        if not listed:
            lines.append("None.")
        for split, record in listed:
            lines.append(f"- `{record['id']}` ({split}, slice k={record['slice_index']}, {record['organ']}, "
                         f"{record['task']}): " + "; ".join(record["review"]["reasons"]))
    if states.get(ACCEPTED, 0) == len(every):
        lines += ["", "Every record is accepted."]
    return "\n".join(lines) + "\n"


def write_review_report(root: Union[str, Path]) -> Path:
    path = Path(root) / "review_report.md"
    path.write_text(review_report(root), encoding="utf-8")
    return path
