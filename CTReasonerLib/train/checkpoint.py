"""Training checkpoints: a folder that is both a loadable model and a resumable trainer state.

Layout of ``<output_dir>/checkpoints/step-00000120/``::

    <model.save_pretrained output>   LoRA adapter, projector, heads, mask decoder, tokenizer additions, config
    trainer_state.pt                 step, epoch position, optimizer, scheduler, RNG states, elapsed time
    train_config.json                the training config that produced it
    deepspeed/                       only for DeepSpeed runs: its partitioned optimizer state

A checkpoint is written to ``step-N.tmp`` and renamed when complete, so a crash never leaves a
half-written folder that looks valid. ``CTReasonerModel.from_pretrained(checkpoint)`` loads it as a model.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from CTReasonerLib.errors import InputFileError

TRAINER_STATE_FILE = "trainer_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def capture_rng_state() -> Dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states, as plain lists/tensors (``weights_only``-safe)."""
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint_files(directory: Path, model, trainer_state: Dict[str, Any], train_config: Dict[str, Any]) -> None:
    """Write the model and trainer state into ``directory`` (rank 0 only)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    torch.save(trainer_state, directory / TRAINER_STATE_FILE)
    (directory / TRAIN_CONFIG_FILE).write_text(json.dumps(train_config, indent=2))


def finalize_checkpoint(tmp_directory: Path, final_directory: Path) -> Path:
    """Atomically publish a completed checkpoint (replacing an older one of the same name)."""
    if final_directory.exists():
        shutil.rmtree(final_directory)
    tmp_directory.rename(final_directory)
    return final_directory


def load_trainer_state(checkpoint_dir: str) -> Dict[str, Any]:
    path = Path(checkpoint_dir) / TRAINER_STATE_FILE
    if not path.is_file():
        raise InputFileError(f"{checkpoint_dir} is not a training checkpoint (no {TRAINER_STATE_FILE})",
                             hint="pass a folder such as OUTPUT_DIR/checkpoints/step-00000100 or OUTPUT_DIR/final")
    return torch.load(path, map_location="cpu", weights_only=True)


def list_checkpoints(checkpoints_root: Path) -> List[Path]:
    """Completed ``step-N`` checkpoints, oldest first."""
    root = Path(checkpoints_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name)) and (p / TRAINER_STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints_root: Path) -> Optional[Path]:
    found = list_checkpoints(checkpoints_root)
    return found[-1] if found else None


def prune_checkpoints(checkpoints_root: Path, keep_last: int) -> List[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints; returns the deleted folders."""
    found = list_checkpoints(checkpoints_root)
    doomed = found[:-keep_last] if keep_last > 0 else found
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def _to_lists(value):
    if isinstance(value, (tuple, list)):
        return [_to_lists(v) for v in value]
    return value


def _to_tuples(value):
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value
