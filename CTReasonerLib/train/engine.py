"""Optimisation engines: one micro-batch forward/backward and one optimizer step, behind one interface.

``TorchEngine`` covers a single process and torchrun DDP; ``DeepSpeedEngine`` wraps ``deepspeed.initialize``.
The trainer's loop only calls ``micro_step``, ``optimizer_step``, ``lr``, ``state_dict``/``load_state_dict``
and ``save``/``load``, so both paths share the same loop, logging and checkpoint layout.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .distributed import DistributedContext, wrap_ddp


class TrainingStepModule(nn.Module):
    """Makes ``model.training_step(batch)`` the module's ``forward``.

    DDP and DeepSpeed hook ``forward``; routing the step through it is what lets them
    synchronise gradients of a model whose training entry point is ``training_step``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        return self.model.training_step(batch)


def build_optimizer(parameters: List[nn.Parameter], lr: float, betas, eps: float, weight_decay: float,
                    names: Optional[List[str]] = None, lr_multipliers: Optional[Dict[str, float]] = None):
    """AdamW over the trainable ``parameters``.

    names / lr_multipliers: parameter names (as ``named_parameters``) and {name prefix: factor}; a
    parameter whose name starts with a prefix gets its own group at ``lr * factor`` (e.g. freshly added
    heads in a fine-tune of trained weights). Every prefix must match something.
    """
    lr_multipliers = dict(lr_multipliers or {})
    if lr_multipliers and (names is None or len(names) != len(parameters)):
        raise ValueError("lr_multipliers need one name per parameter")
    names = names or [""] * len(parameters)
    groups: Dict[float, List[nn.Parameter]] = {}
    matched = set()
    for name, parameter in zip(names, parameters):
        if not parameter.requires_grad:
            continue
        factor = 1.0
        for prefix, value in lr_multipliers.items():
            if name.startswith(prefix):
                factor = value
                matched.add(prefix)
                break
        groups.setdefault(factor, []).append(parameter)
    if not groups:
        raise ValueError("the model reports no trainable parameters")
    unmatched = sorted(set(lr_multipliers) - matched)
    if unmatched:
        from CTReasonerLib.errors import ConfigError

        raise ConfigError(f"optim.lr_multipliers prefix(es) {unmatched} match no trainable parameter",
                          "use names as model.named_parameters() gives them, e.g. dense_head.")
    param_groups = [{"params": params, "lr": lr * factor} for factor, params in
                    sorted(groups.items(), key=lambda item: (item[0] != 1.0, item[0]))]   # base lr first (logged)
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def schedule_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps: linear warmup, then cosine/linear/constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        shape = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule_factor(step, total_steps, warmup_steps, schedule, min_lr_ratio))


class TorchEngine:
    """Plain PyTorch optimisation, optionally under DDP, with autocast and gradient clipping.

    autocast_dtype: torch.bfloat16 to run forwards under autocast, None for full precision.
    """

    def __init__(self, model: nn.Module, optimizer, scheduler, *, device: torch.device,
                 context: DistributedContext, max_grad_norm: Optional[float], autocast_dtype=None):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.max_grad_norm = max_grad_norm
        self.autocast_dtype = autocast_dtype
        step_module = TrainingStepModule(model)
        self.forward_module = wrap_ddp(step_module, context, device) if context.is_distributed else step_module
        self._ddp = context.is_distributed
        self._parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def micro_step(self, batch, loss_scale: float, sync_gradients: bool) -> Dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch; gradients are all-reduced only when ``sync_gradients``."""
        no_sync = self.forward_module.no_sync() if self._ddp and not sync_gradients else contextlib.nullcontext()
        with no_sync:
            with self._autocast():
                losses = self.forward_module(batch)
            (losses["loss"].float() * loss_scale).backward()
        return {name: value.detach() for name, value in losses.items()}

    def optimizer_step(self) -> float:
        """Clip, step, advance the schedule, clear gradients; returns the pre-clip gradient norm."""
        max_norm = self.max_grad_norm if self.max_grad_norm else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self._parameters, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def state_dict(self) -> Dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save(self, checkpoint_dir: Path) -> None:
        """Nothing beyond ``state_dict``: optimizer and schedule travel in trainer_state.pt."""

    def load(self, checkpoint_dir: Path) -> None:
        """Nothing beyond ``load_state_dict``."""

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


class DeepSpeedEngine:
    """The same interface over a DeepSpeed engine (ZeRO-2; bf16 and clipping configured in its JSON).

    Micro-batch grouping stays the trainer's: the accumulation boundary is set explicitly on every
    micro-step and the loss is scaled by the trainer, so a short last group of an epoch is handled
    exactly as in ``TorchEngine``.
    """

    CHECKPOINT_SUBDIR = "deepspeed"

    def __init__(self, model: nn.Module, optimizer, scheduler, ds_config: Dict):
        from .distributed import deepspeed_initialize_kwargs, require_deepspeed

        deepspeed = require_deepspeed()
        self.model = model
        kwargs = deepspeed_initialize_kwargs(TrainingStepModule(model), optimizer, scheduler, ds_config)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(**kwargs)

    def micro_step(self, batch, loss_scale: float, sync_gradients: bool) -> Dict[str, torch.Tensor]:
        self.engine.set_gradient_accumulation_boundary(sync_gradients)
        losses = self.engine(batch)
        self.engine.backward(losses["loss"].float() * loss_scale, scale_wrt_gas=False)
        self.engine.step()
        return {name: value.detach() for name, value in losses.items()}

    def optimizer_step(self) -> float:
        """DeepSpeed already stepped at the boundary inside ``micro_step``; report its gradient norm."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        """Optimizer and schedule come from DeepSpeed's own checkpoint (``load``)."""

    def save(self, checkpoint_dir: Path) -> None:
        """Collective: every rank writes its ZeRO partition of the optimizer state."""
        self.engine.save_checkpoint(str(Path(checkpoint_dir) / self.CHECKPOINT_SUBDIR), tag="state",
                                    exclude_frozen_parameters=True)

    def load(self, checkpoint_dir: Path) -> None:
        self.engine.load_checkpoint(str(Path(checkpoint_dir) / self.CHECKPOINT_SUBDIR), tag="state",
                                    load_module_strict=False, load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
