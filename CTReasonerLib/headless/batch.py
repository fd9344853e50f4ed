"""Many volumes, one conversation each: resumable, failure-isolated, sharded across torchrun ranks.

* Inputs: a folder (CT files matching a pattern, and sub-folders as DICOM series) or a manifest
  (.txt one path per line, .csv with a ``path`` column, .json list of paths or ``{"path", "name"}`` objects;
  relative paths are relative to the manifest).
* Each item writes ``OUT/<name>/`` (the ``chat`` outputs) and, last, a done marker recording the request.
  A later run skips items whose marker matches the request and whose files all exist; anything else is redone.
* A volume that fails is logged (``OUT/failures.log`` and ``OUT/<name>/error.txt``) and the batch goes on.
* Under ``torchrun`` (RANK/WORLD_SIZE) rank r takes items r, r + W, ...; every rank hands its records to
  rank 0 through torchrun's rendezvous store, and rank 0 writes ``summary.csv`` and ``summary.md``.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import ConfigError, CTReasonerError
from ..io.readers import DICOM_FILE_SUFFIXES, IMAGE_FILE_SUFFIXES
from .outputs import chat_to_files, output_name, output_paths
from .volume_chat import ChatTurn, check_turns

log = logging.getLogger(__name__)

DONE_MARKER = ".ctreasoner-done.json"
FAILURE_LOG = "failures.log"
ERROR_FILE = "error.txt"
SUMMARY_FIELDS = ("name", "status", "slices", "segments", "boxes", "seconds", "rank", "source", "folder", "error")
_PATH_COLUMNS = ("path", "volume", "image", "input", "file")
# Rank 0 waits for the slowest rank's records; a batch may take days.
_GATHER_TIMEOUT = timedelta(days=7)


@dataclass
class BatchItem:
    name: str      # output sub-folder and file stem, unique within the batch
    source: str    # CT file or DICOM folder


@dataclass
class ItemRecord:
    """One row of the summary. status: "done" (this run), "skipped" (finished earlier) or "failed"."""
    name: str
    source: str
    status: str
    folder: str
    slices: int = 0
    segments: str = ""             # organs with a non-empty segment, ";"-separated
    boxes: int = 0
    seconds: float = 0.0
    rank: int = 0                  # the torchrun rank that handled it
    error: str = ""


@dataclass
class BatchRequest:
    """What every item is asked; a done marker with another request does not count as done."""
    turns: List[ChatTurn]
    slices: Optional[str] = None
    model_id: str = ""
    window: str = "abdomen"

    def fingerprint(self) -> Dict[str, object]:
        return {"turns": [asdict(turn) for turn in self.turns], "slices": self.slices, "model": self.model_id}


@dataclass
class BatchOutcome:
    records: List[ItemRecord] = field(default_factory=list)    # all ranks' records on rank 0, own records elsewhere
    summary_csv: Optional[Path] = None
    summary_md: Optional[Path] = None

    def count(self, status: str) -> int:
        return sum(record.status == status for record in self.records)


# --------------------------------------------------------------------------------------------- inputs
def read_inputs(spec: str, pattern: str = "*") -> List[BatchItem]:
    """The items of a folder or manifest, in a stable order, with unique output names."""
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"{path}: no such folder or manifest", "give a folder of CT files or a .txt/.csv/.json list")
    sources = _folder_sources(path, pattern) if path.is_dir() else _manifest_sources(path)
    if not sources:
        raise ConfigError(f"{path}: no CT inputs found" + (f" matching {pattern!r}" if path.is_dir() else ""),
                          "CT files are .nii, .nii.gz, .nrrd, .nhdr or DICOM series folders")
    items, used = [], set()
    for source, name in sources:
        base = name or output_name(source)
        unique, n = base, 2
        while unique in used:
            unique, n = f"{base}_{n}", n + 1
        used.add(unique)
        items.append(BatchItem(name=unique, source=source))
    return items


def _is_ct_file(path: Path) -> bool:
    name = path.name.lower()
    return not name.endswith(".seg.nrrd") and name.endswith(tuple(IMAGE_FILE_SUFFIXES))


def _folder_sources(folder: Path, pattern: str):
    entries = sorted(folder.glob(pattern))
    sources = [(str(p), None) for p in entries if (p.is_file() and _is_ct_file(p)) or (p.is_dir() and any(p.iterdir()))]
    if not sources and any(p.name.lower().endswith(DICOM_FILE_SUFFIXES) for p in folder.iterdir()):
        sources = [(str(folder), None)]    # the folder itself is one DICOM series
    return sources


def _manifest_sources(manifest: Path):
    text = manifest.read_text(encoding="utf-8-sig")
    suffix = manifest.suffix.lower()
    try:
        if suffix == ".json":
            rows = _json_rows(json.loads(text))
        elif suffix == ".csv":
            rows = _csv_rows(text)
        elif suffix in (".txt", ".lst", ".list"):
            rows = [(line.strip(), None) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        else:
            raise ConfigError(f"{manifest}: unknown manifest type {suffix!r}", "use .txt, .csv or .json, or give a folder")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{manifest}: cannot read the manifest ({exc})",
                          "a .json manifest is a list of paths or of {\"path\": ..., \"name\": ...} objects") from exc
    return [(str(p if Path(p).is_absolute() else manifest.parent / p), name) for p, name in rows]


def _json_rows(document):
    if isinstance(document, dict):
        document = document["inputs"]
    if not isinstance(document, list):
        raise ValueError("expected a list")
    return [(entry, None) if isinstance(entry, str) else (str(entry["path"]), entry.get("name")) for entry in document]


def _csv_rows(text: str):
    rows = [row for row in csv.reader(text.splitlines()) if row and row[0].strip()]
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    column = next((header.index(c) for c in _PATH_COLUMNS if c in header), None)
    if column is None:
        return [(row[0].strip(), None) for row in rows]
    names = header.index("name") if "name" in header else None
    return [(row[column].strip(), row[names].strip() or None if names is not None else None) for row in rows[1:]]


def shard(items: Sequence[BatchItem], rank: int, world_size: int) -> List[BatchItem]:
    """Rank ``rank``'s share: items rank, rank + world_size, ..."""
    return list(items)[rank::world_size]


# --------------------------------------------------------------------------------------------- resumability
def finished_record(item: BatchItem, out_dir: Path, request: BatchRequest) -> Optional[ItemRecord]:
    """The record of an earlier run of the same request on ``item`` whose files all exist, else None."""
    marker = Path(out_dir) / item.name / DONE_MARKER
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    paths = output_paths(marker.parent, item.name)
    if done.get("request") != request.fingerprint() or not all(p.is_file() for p in paths.files()):
        return None
    return ItemRecord(**{**done["record"], "status": "skipped"})


def _write_marker(folder: Path, request: BatchRequest, record: ItemRecord) -> None:
    marker = folder / DONE_MARKER
    temporary = marker.with_suffix(".tmp")
    temporary.write_text(json.dumps({"request": request.fingerprint(), "record": asdict(record)}, indent=2))
    os.replace(temporary, marker)     # a crash never leaves a half-written marker that looks done


# --------------------------------------------------------------------------------------------- running
def run_items(items: Sequence[BatchItem], load_pipeline: Callable[[], object], request: BatchRequest, out_dir: Path,
              rank: int = 0, progress: bool = True) -> List[ItemRecord]:
    """Run ``request`` on each item (this rank's share), skipping finished ones; never stops on one failure.

    load_pipeline: called once, when the first item needs the model (a fully finished batch loads nothing).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline = None
    records = []
    bar = tqdm(items, desc=f"rank {rank}" if rank else "volumes", unit="vol", position=rank, disable=not progress,
               dynamic_ncols=True)
    for item in bar:
        bar.set_postfix_str(item.name)
        record = finished_record(item, out_dir, request)
        if record is None:
            if pipeline is None:
                pipeline = load_pipeline()
            record = _run_item(item, pipeline, request, out_dir)
        record.rank = rank
        records.append(record)
    bar.close()
    return records


def _run_item(item: BatchItem, pipeline, request: BatchRequest, out_dir: Path) -> ItemRecord:
    folder = out_dir / item.name
    (folder / DONE_MARKER).unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        run = chat_to_files(item.source, pipeline, request.turns, request.slices, folder, name=item.name,
                            model_id=request.model_id, window=request.window)
    except Exception as exc:  # noqa: BLE001 - one bad volume must not stop the batch; it is logged and summarised
        message = exc.message if isinstance(exc, CTReasonerError) else f"{type(exc).__name__}: {exc}"
        _log_failure(item, folder, out_dir, message, exc)
        return ItemRecord(name=item.name, source=item.source, status="failed", folder=str(folder),
                          seconds=round(time.perf_counter() - started, 3), error=message)
    (folder / ERROR_FILE).unlink(missing_ok=True)
    masks = run.chat.organ_masks()
    record = ItemRecord(name=item.name, source=item.source, status="done", folder=str(folder),
                        slices=len(run.chat.slices), segments=";".join(k for k, m in masks.items() if m.any()),
                        boxes=len(run.chat.boxes()), seconds=round(time.perf_counter() - started, 3))
    _write_marker(folder, request, record)
    return record


def _log_failure(item: BatchItem, folder: Path, out_dir: Path, message: str, exc: BaseException) -> None:
    log.error("%s (%s) failed: %s", item.name, item.source, message)
    folder.mkdir(parents=True, exist_ok=True)
    details = message if isinstance(exc, CTReasonerError) else "".join(traceback.format_exception(exc))
    (folder / ERROR_FILE).write_text(f"{item.source}\n{details}\n")
    rank = os.environ.get("RANK", "0")
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\trank {rank}\t{item.name}\t{item.source}\t{message}\n"
    with open(out_dir / FAILURE_LOG, "a", encoding="utf-8") as stream:   # O_APPEND: whole lines from each rank
        stream.write(line.replace("\r", " "))


# --------------------------------------------------------------------------------------------- summary
def write_summary(records: Sequence[ItemRecord], out_dir: Path):
    """``summary.csv`` (one row per item) and ``summary.md`` (counts and the same table); returns both paths."""
    out_dir = Path(out_dir)
    records = sorted(records, key=lambda r: r.name)
    csv_path, md_path = out_dir / "summary.csv", out_dir / "summary.md"
    with open(csv_path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(record) for record in records)
    counts = {status: sum(r.status == status for r in records) for status in ("done", "skipped", "failed")}
    lines = ["# CTReasoner batch summary", "",
             f"{len(records)} volume(s): {counts['done']} done, {counts['skipped']} skipped (finished earlier), "
             f"{counts['failed']} failed.", "",
             "| name | status | slices | segments | boxes | seconds | error |", "|---|---|---|---|---|---|---|"]
    for r in records:
        error = r.error.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.name} | {r.status} | {r.slices} | {r.segments.replace(';', ', ')} | {r.boxes} | "
                     f"{r.seconds:.2f} | {error} |")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def _gather_to_rank0(value, rank: int, world_size: int) -> Optional[list]:
    """Every rank's ``value`` on rank 0 (in rank order; None elsewhere), through torchrun's rendezvous store.

    A key-value store rather than a gloo process group: there is no collective to tear down, so a rank that
    finishes first simply exits (a gloo group's worker threads could abort a process at exit).
    """
    import pickle

    import torch.distributed as dist

    store, _, _ = next(dist.rendezvous("env://", timeout=_GATHER_TIMEOUT))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")   # an elastic restart must not read old records
    keys = [f"ctreasoner-batch/{attempt}/{r}" for r in range(world_size)]
    store.set(keys[rank], pickle.dumps(value))
    if rank != 0:
        return None
    store.wait(keys, _GATHER_TIMEOUT)
    return [pickle.loads(store.get(key)) for key in keys]


def run_batch(items: Sequence[BatchItem], load_pipeline: Callable[[], object], request: BatchRequest, out_dir: Path,
              progress: bool = True) -> BatchOutcome:
    """Run the batch in this process, or this rank's share under torchrun; rank 0 writes the summary."""
    request.turns = check_turns(request.turns)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size <= 1:
        records = run_items(items, load_pipeline, request, out_dir, progress=progress)
        return BatchOutcome(records, *write_summary(records, out_dir))
    records, fatal = [], None
    try:
        records = run_items(shard(items, rank, world_size), load_pipeline, request, out_dir, rank, progress)
    except CTReasonerError as exc:   # e.g. the model cannot load: still report, so rank 0 does not wait for ever
        fatal = exc
    gathered = _gather_to_rank0((records, fatal.message if fatal else None), rank, world_size)
    outcome = BatchOutcome(records)
    if rank == 0:
        outcome.records = [record for rank_records, _ in gathered for record in rank_records]
        outcome.summary_csv, outcome.summary_md = write_summary(outcome.records, out_dir)
        errors = [error for _, error in gathered if error]
        if errors and fatal is None:
            fatal = CTReasonerError(f"another rank stopped: {errors[0]}")
    if fatal is not None:
        raise fatal
    return outcome
