"""Process groups for multi-process training: torchrun DDP (gloo on CPU, nccl on CUDA) and DeepSpeed config.

Single-process runs get a ``DistributedContext`` of world size 1 and never touch ``torch.distributed``.
Under ``torchrun`` the environment variables RANK, WORLD_SIZE and LOCAL_RANK select the process's role.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from CTReasonerLib.errors import ConfigError, InputFileError


@dataclass
class DistributedContext:
    """This process's place in the job. ``backend`` is None for a single process."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistributedContext:
    """Join the torchrun process group when WORLD_SIZE > 1; gloo on CPU, nccl on CUDA."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def rank_device(device: torch.device, context: DistributedContext) -> torch.device:
    """The device this rank computes on: its own GPU under CUDA, otherwise ``device`` unchanged."""
    if device.type == "cuda":
        return torch.device("cuda", context.local_rank)
    return device


def shutdown_distributed(context: DistributedContext) -> None:
    """Leave the group together: no rank tears down its connections while another still uses them."""
    if context.is_distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def abandon_distributed(context: DistributedContext) -> None:
    """Leave the group after an error. gloo's group is destroyed (left to interpreter exit, its worker threads
    can abort the process); an nccl group is left as it is, because destroying it while another rank sits in a
    collective can hang this rank, and torchrun ends the other ranks once this one exits."""
    if context.is_distributed and dist.is_initialized() and context.backend == "gloo":
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()


def wrap_ddp(module: torch.nn.Module, context: DistributedContext, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel without unused-parameter search: every head takes part in every step."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=False)


def mean_across_ranks(values: Dict[str, float], context: DistributedContext) -> Dict[str, float]:
    """Average scalar logging values over ranks (every rank must pass the same keys)."""
    if not context.is_distributed or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                          device="cuda" if context.backend == "nccl" else "cpu")
    dist.all_reduce(tensor)
    tensor /= context.world_size
    return dict(zip(keys, tensor.tolist()))


def broadcast_flag(flag: bool, context: DistributedContext) -> bool:
    """Rank 0's value of ``flag`` on every rank, so decisions such as a wall-time stop agree."""
    if not context.is_distributed:
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device="cuda" if context.backend == "nccl" else "cpu")
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


# ----------------------------------------------------------------------------------------------- DeepSpeed

# Keys that the training config owns; a DeepSpeed file may leave them "auto" or repeat the same value.
_DEEPSPEED_OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                         "train_batch_size")


def require_deepspeed():
    """Import deepspeed, or explain how to get it."""
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(
            "--deepspeed was given but the deepspeed package is not installed",
            hint="on a CUDA machine: pip install deepspeed, then launch with deepspeed or torchrun "
                 "(see docs/training.md); or drop --deepspeed to train with plain DDP") from exc
    return deepspeed


def load_deepspeed_config(path: str, *, micro_batch_size: int, grad_accum_steps: int,
                          max_grad_norm: Optional[float], bf16: bool, world_size: int) -> Dict[str, Any]:
    """Read a DeepSpeed JSON config and fill its ``"auto"`` values from the training config.

    The training config stays the single source of truth: a value in the DeepSpeed file that
    contradicts it (e.g. a different accumulation) is an error rather than a silent override.
    """
    file = Path(path)
    if not file.is_file():
        raise InputFileError(f"DeepSpeed config not found: {path}", hint="e.g. configs/deepspeed_zero2.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"cannot parse DeepSpeed config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"DeepSpeed config {path} must be a JSON object")
    return resolve_deepspeed_config(raw, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                                    max_grad_norm=max_grad_norm, bf16=bf16, world_size=world_size, source=path)


def resolve_deepspeed_config(raw: Dict[str, Any], *, micro_batch_size: int, grad_accum_steps: int,
                             max_grad_norm: Optional[float], bf16: bool, world_size: int,
                             source: str = "<config>") -> Dict[str, Any]:
    config = copy.deepcopy(raw)
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": float(max_grad_norm) if max_grad_norm else 0.0,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
    }
    conflicts = []
    for key in _DEEPSPEED_OWNED_KEYS:
        given = config.get(key, "auto")
        if given != "auto" and given != wanted[key]:
            conflicts.append(f"{key}={given!r} (training config gives {wanted[key]!r})")
        config[key] = wanted[key]
    if conflicts:
        raise ConfigError(f"DeepSpeed config {source} contradicts the training config: " + "; ".join(conflicts),
                          hint='set those keys to "auto" in the DeepSpeed file and change the training config instead')
    for section, enabled in (("bf16", bf16), ("fp16", False)):
        block = config.setdefault(section, {})
        if block.get("enabled", "auto") == "auto":
            block["enabled"] = enabled
    if config["bf16"]["enabled"] and config["fp16"]["enabled"]:
        raise ConfigError(f"DeepSpeed config {source} enables both bf16 and fp16", hint="enable one of them")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"DeepSpeed config {source} asks for ZeRO stage {stage}",
                          hint="use stage 0-2: stage 3 partitions parameters, which model.save_pretrained does not gather")
    if "optimizer" in config or "scheduler" in config:
        raise ConfigError(f"DeepSpeed config {source} defines an optimizer or scheduler",
                          hint="remove them: the trainer passes its AdamW and schedule from the training config")
    return config


def deepspeed_initialize_kwargs(module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                                ds_config: Dict[str, Any]) -> Dict[str, Any]:
    """Arguments for ``deepspeed.initialize``: our module, AdamW and schedule, and the resolved config."""
    return {
        "model": module,
        "optimizer": optimizer,
        "lr_scheduler": scheduler,
        "config": ds_config,
        "dist_init_required": not dist.is_initialized(),
    }
