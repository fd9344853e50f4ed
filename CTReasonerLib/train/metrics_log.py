"""Append-only JSONL metrics log: one JSON object per line, flushed per record so a crash loses nothing.

Records written by the trainer (``kind`` tells them apart):
  {"kind": "train", "step", "epoch", "lr", "grad_norm", "loss", <other losses>, "time_s", "samples_per_s"}
  {"kind": "val", "step", "val_dice", "val_dice/<organ>", ..., "time_s"}
  {"kind": "event", "step", "event": "start" | "resume" | "checkpoint" | "stop", ...}
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional


class MetricsLog:
    """Writes JSONL records to ``path``. A disabled log (non-zero ranks) accepts and drops records."""

    def __init__(self, path: Optional[Path], enabled: bool = True):
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and path is not None
        self._file = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: Path, kind: Optional[str] = None) -> List[Dict[str, Any]]:
    """All records of a JSONL log (optionally only those of one ``kind``)."""
    return [r for r in _iter_records(Path(path)) if kind is None or r.get("kind") == kind]


def _iter_records(path: Path) -> Iterator[Dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/Inf; write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
