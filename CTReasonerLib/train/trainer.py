"""The training loop: gradient accumulation, clipping, schedule, logging, validation, checkpoints, resume.

The model only has to provide the training interface of ``CTReasonerModel``::

    model.collate(list_of_samples) -> batch
    model.training_step(batch) -> {"loss": scalar tensor, <other named scalar losses>}
    model.trainable_parameters() -> list of parameters
    model.save_pretrained(directory)

One *step* is one optimizer step over ``grad_accum_steps`` micro-batches (the last group of an epoch
may be shorter; its micro-batches are weighted 1/len(group)). A run resumed from a checkpoint
continues exactly as the uninterrupted run would have: the sampler order depends only on
(seed, epoch), the resumed epoch skips the micro-batches already consumed, and the RNG states,
optimizer and schedule are restored.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .checkpoint import (TRAINER_STATE_FILE, capture_rng_state, checkpoint_name, finalize_checkpoint,
                         load_trainer_state, prune_checkpoints, restore_rng_state, write_checkpoint_files)
from .config import TrainConfig
from .distributed import DistributedContext, barrier, broadcast_flag, load_deepspeed_config, mean_across_ranks
from .engine import DeepSpeedEngine, TorchEngine, build_optimizer, build_scheduler
from .metrics_log import MetricsLog

logger = logging.getLogger(__name__)

ValidateFn = Callable[[Any, Sequence[Any]], Dict[str, float]]

FINAL_CHECKPOINT = "final"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    """What a finished (or budget-stopped) run produced."""
    final_checkpoint: Path
    steps: int
    stopped_by: str                    # "epochs", "max_steps" or "max_minutes"
    elapsed_s: float
    last_losses: Dict[str, float] = field(default_factory=dict)
    last_validation: Dict[str, float] = field(default_factory=dict)


class SkippingDistributedSampler(DistributedSampler):
    """A DistributedSampler whose current epoch can start ``skip`` indices in (to resume mid-epoch)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0

    def epoch_indices(self) -> List[int]:
        """This rank's indices for the current epoch, before skipping."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip


class GroupedDistributedSampler(SkippingDistributedSampler):
    """Orders an epoch so that consecutive indices come in chunks of up to ``group_size`` that share a key.

    With ``group_keys`` = each record's (subject, slice), a batch holds several queries about the same
    few slices: ``CTReasonerModel.collate`` encodes each distinct slice once, so the expensive image
    encoder's cost is spread over every query on it (SAM trains with many prompts per image for the
    same reason). Every record still appears once per epoch; chunk order and membership depend only on
    (seed, epoch), so resume stays exact. Ranks take contiguous blocks of the padded order.
    """

    def __init__(self, dataset, group_keys: Sequence[Any], group_size: int, **kwargs):
        super().__init__(dataset, **kwargs)
        if len(group_keys) != len(dataset):
            raise ValueError(f"group_keys has {len(group_keys)} entries for a dataset of {len(dataset)}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size
        members: Dict[Any, List[int]] = {}
        for index, key in enumerate(group_keys):
            members.setdefault(key, []).append(index)
        self.groups = list(members.values())

    def epoch_indices(self) -> List[int]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        chunks = []
        for members in self.groups:
            members = list(members)
            rng.shuffle(members)
            chunks += [members[i:i + self.group_size] for i in range(0, len(members), self.group_size)]
        rng.shuffle(chunks)
        order = [index for chunk in chunks for index in chunk]
        order += order[:self.total_size - len(order)]          # pad so every rank gets num_samples
        return order[self.rank * self.num_samples:(self.rank + 1) * self.num_samples]


def slice_group_keys(dataset) -> List[Any]:
    """(subject, slice index) of every record of a ``CuratedDataset``: the key for slice-grouped batches."""
    records = getattr(dataset, "records", None)
    if records is None:
        raise ValueError("data.records_per_slice > 1 needs a curated dataset (records with subject and slice_index)")
    return [(record["subject"], record["slice_index"]) for record in records]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def move_to_device(batch, device: torch.device):
    """Move every tensor in a (nested) batch to ``device``; objects with their own ``.to`` use it."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(move_to_device(v, device) for v in batch)
    if hasattr(batch, "to") and callable(batch.to):
        return batch.to(device)
    return batch


class Trainer:
    """Trains ``model`` on ``train_dataset`` as ``config`` says, writing into ``output_dir``.

    device / autocast_dtype: where to compute and whether to autocast (None = full precision); the
        ``train`` command takes both from ``CTReasonerLib.model.device``.
    validate_fn(model, samples) -> {"val_dice": ..., ...}: periodic validation on a fixed subset of
        ``val_dataset``; defaults to the inference pipeline's Dice (``eval.evaluate.validation_dice``).
    """

    def __init__(self, model, config: TrainConfig, train_dataset: Dataset, val_dataset: Optional[Dataset] = None, *,
                 output_dir: Optional[str] = None, device: Optional[torch.device] = None, autocast_dtype=None,
                 context: Optional[DistributedContext] = None, validate_fn: Optional[ValidateFn] = None):
        self.model = model
        self.config = config
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.output_dir = Path(output_dir or config.output_dir)
        self.device = device or torch.device("cpu")
        self.autocast_dtype = autocast_dtype
        self.context = context or DistributedContext()
        self.validate_fn = validate_fn
        if len(train_dataset) == 0:
            raise ValueError("the training split is empty")
        sampler_args = dict(num_replicas=self.context.world_size, rank=self.context.rank, shuffle=True, seed=config.seed)
        if config.data.records_per_slice > 1:
            self.sampler = GroupedDistributedSampler(train_dataset, slice_group_keys(train_dataset),
                                                     config.data.records_per_slice, **sampler_args)
        else:
            self.sampler = SkippingDistributedSampler(train_dataset, **sampler_args)
        self.batches_per_epoch = math.ceil(len(self.sampler) / config.data.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.optim.grad_accum_steps)
        epoch_steps = config.run.epochs * self.steps_per_epoch
        self.total_steps = min(epoch_steps, config.run.max_steps) if config.run.max_steps else epoch_steps
        self.engine = self._build_engine()

    # ------------------------------------------------------------------------------------------ setup
    def _build_engine(self):
        optim = self.config.optim
        self.model.to(self.device)
        trainable = {id(p) for p in self.model.trainable_parameters()}
        named = [(name, p) for name, p in self.model.named_parameters() if id(p) in trainable]
        optimizer = build_optimizer([p for _, p in named], optim.lr, optim.betas, optim.eps, optim.weight_decay,
                                    names=[name for name, _ in named], lr_multipliers=optim.lr_multipliers)
        scheduler = build_scheduler(optimizer, self.total_steps, optim.warmup_steps, optim.schedule, optim.min_lr_ratio)
        if self.config.run.deepspeed:
            ds_config = load_deepspeed_config(
                self.config.run.deepspeed, micro_batch_size=self.config.data.batch_size,
                grad_accum_steps=optim.grad_accum_steps, max_grad_norm=optim.max_grad_norm,
                bf16=self.autocast_dtype == torch.bfloat16, world_size=self.context.world_size)
            return DeepSpeedEngine(self.model, optimizer, scheduler, ds_config)
        return TorchEngine(self.model, optimizer, scheduler, device=self.device, context=self.context,
                           max_grad_norm=optim.max_grad_norm, autocast_dtype=self.autocast_dtype)

    def _loader(self, epoch: int, skip_batches: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.sampler.skip = skip_batches * self.config.data.batch_size
        # A private generator keeps DataLoader start-up from drawing on the global RNG, which a
        # resumed run restores: otherwise resumed and uninterrupted runs would diverge.
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch * 1_009 + self.context.rank)
        return DataLoader(self.train_dataset, batch_size=self.config.data.batch_size, sampler=self.sampler,
                          num_workers=self.config.data.num_workers, collate_fn=self.model.collate,
                          generator=generator, drop_last=False)

    # ------------------------------------------------------------------------------------------- loop
    def train(self, resume_from: Optional[str] = None) -> TrainResult:
        """Run until epochs, max_steps or max_minutes is reached; returns where the final model is."""
        cfg = self.config
        state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "elapsed_s": 0.0, "samples_seen": 0}
        if resume_from:
            state = self._resume(resume_from)
        else:
            seed_everything(cfg.seed + self.context.rank)
        log = MetricsLog(self.output_dir / METRICS_FILE, enabled=self.context.is_main)
        log.write({"kind": "event", "event": "resume" if resume_from else "start", "step": state["step"],
                   "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                   "world_size": self.context.world_size, "resume_from": resume_from})
        val_samples = self._validation_samples()
        progress = self._progress_bar(state["step"])
        self.model.train()
        run_start = time.perf_counter() - state["elapsed_s"]
        interval = _IntervalStats()
        last_losses: Dict[str, float] = {}
        last_validation: Dict[str, float] = {}
        stopped_by = "epochs"
        accum = cfg.optim.grad_accum_steps
        try:
            while state["epoch"] < cfg.run.epochs and stopped_by == "epochs":
                batches = iter(self._loader(state["epoch"], state["batch_in_epoch"]))
                while state["batch_in_epoch"] < self.batches_per_epoch:
                    group = min(accum, self.batches_per_epoch - state["batch_in_epoch"])
                    step_start = time.perf_counter()
                    for index in range(group):
                        batch = move_to_device(next(batches), self.device)
                        losses = self.engine.micro_step(batch, 1.0 / group, sync_gradients=index == group - 1)
                        interval.add_losses(losses, 1.0 / group)
                    step_lr = self.engine.lr
                    grad_norm = self.engine.optimizer_step()
                    state["step"] += 1
                    state["batch_in_epoch"] += group
                    samples = group * cfg.data.batch_size * self.context.world_size
                    state["samples_seen"] += samples
                    interval.add_step(grad_norm, step_lr, samples, time.perf_counter() - step_start)
                    state["elapsed_s"] = time.perf_counter() - run_start

                    stopped_by = self._stop_reason(state)
                    if _due(state["step"], cfg.run.log_every) or stopped_by != "epochs":
                        last_losses = self._log_train(log, interval, state)
                        progress.set_postfix(loss=f"{last_losses.get('loss', float('nan')):.4f}", lr=f"{step_lr:.2e}")
                    progress.update(1)
                    if val_samples and _due(state["step"], cfg.run.val_every):
                        last_validation = self._validate(log, val_samples, state["step"]) or last_validation
                    if stopped_by != "epochs":
                        break
                    if _due(state["step"], cfg.run.checkpoint_every):
                        self.save_checkpoint(self.output_dir / CHECKPOINTS_DIR / checkpoint_name(state["step"]),
                                             state, log)
                        if self.context.is_main:
                            prune_checkpoints(self.output_dir / CHECKPOINTS_DIR, cfg.run.keep_last)
                        barrier(self.context)
                if state["batch_in_epoch"] >= self.batches_per_epoch:
                    state["epoch"] += 1
                    state["batch_in_epoch"] = 0
            if cfg.run.val_every and val_samples and not _due(state["step"], cfg.run.val_every):
                last_validation = self._validate(log, val_samples, state["step"]) or last_validation
            state["elapsed_s"] = time.perf_counter() - run_start
            final = self.save_checkpoint(self.output_dir / FINAL_CHECKPOINT, state, log)
            log.write({"kind": "event", "event": "stop", "step": state["step"], "stopped_by": stopped_by,
                       "time_s": round(state["elapsed_s"], 3)})
        finally:
            progress.close()
            log.close()
        return TrainResult(final, state["step"], stopped_by, state["elapsed_s"], last_losses, last_validation)

    def _stop_reason(self, state: Dict[str, Any]) -> str:
        """'epochs' while training should go on; otherwise the limit that ended it (agreed by all ranks)."""
        run = self.config.run
        if run.max_steps and state["step"] >= run.max_steps:
            return "max_steps"
        out_of_time = bool(run.max_minutes) and state["elapsed_s"] >= run.max_minutes * 60.0
        return "max_minutes" if broadcast_flag(out_of_time, self.context) else "epochs"

    # ----------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory: Path, state: Dict[str, Any], log: Optional[MetricsLog] = None) -> Path:
        """Write model + trainer state to ``directory`` (collective under DDP/DeepSpeed; rank 0 writes)."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        trainer_state = dict(state, engine=self.engine.state_dict(), rng=capture_rng_state(),
                             world_size=self.context.world_size)
        if self.context.is_main:
            write_checkpoint_files(tmp, self.model, trainer_state, self.config.to_dict())
        barrier(self.context)
        self.engine.save(tmp)
        barrier(self.context)
        if self.context.is_main:
            finalize_checkpoint(tmp, directory)
            if log is not None:
                log.write({"kind": "event", "event": "checkpoint", "step": state["step"], "path": str(directory)})
        barrier(self.context)
        return directory

    def _resume(self, checkpoint_dir: str) -> Dict[str, Any]:
        """Restore optimizer, schedule, position and RNG. The model weights were loaded from the same folder."""
        saved = load_trainer_state(checkpoint_dir)
        if saved.get("world_size", 1) != self.context.world_size:
            logger.warning("resuming a %d-process checkpoint with %d processes: the data order changes",
                           saved.get("world_size", 1), self.context.world_size)
        self.engine.load_state_dict(saved["engine"])
        self.engine.load(Path(checkpoint_dir))
        restore_rng_state(saved["rng"])
        state = {k: saved[k] for k in ("step", "epoch", "batch_in_epoch", "elapsed_s", "samples_seen")}
        if state["batch_in_epoch"] >= self.batches_per_epoch:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
        return state

    # ------------------------------------------------------------------------------------ logging/val
    def _log_train(self, log: MetricsLog, interval: "_IntervalStats", state: Dict[str, Any]) -> Dict[str, float]:
        values = mean_across_ranks(interval.loss_means(), self.context)
        record = {"kind": "train", "step": state["step"], "epoch": state["epoch"], "lr": interval.lr,
                  "grad_norm": interval.grad_norm_mean(), **values,
                  "time_s": round(state["elapsed_s"], 3), "samples_per_s": interval.samples_per_second()}
        log.write(record)
        interval.reset()
        return values

    def _validation_samples(self) -> List[Any]:
        run = self.config.run
        if self.val_dataset is None or not run.val_every or not run.val_samples or len(self.val_dataset) == 0:
            return []
        count = min(run.val_samples, len(self.val_dataset))
        indices = np.unique(np.linspace(0, len(self.val_dataset) - 1, count).round().astype(int))
        return [self.val_dataset[int(i)] for i in indices]

    def _validate(self, log: MetricsLog, samples: Sequence[Any], step: int) -> Dict[str, float]:
        """Rank 0 validates with the RNG saved and restored, so validation never changes training."""
        if not samples:
            return {}
        results: Dict[str, float] = {}
        if self.context.is_main:
            validate = self.validate_fn
            if validate is None:
                from CTReasonerLib.eval.evaluate import validation_dice as validate
            rng = capture_rng_state()
            start = time.perf_counter()
            self.model.eval()
            try:
                with torch.no_grad():
                    results = dict(validate(self.model, samples))
            finally:
                self.model.train()
                restore_rng_state(rng)
            log.write({"kind": "val", "step": step, **results, "time_s": round(time.perf_counter() - start, 3)})
        barrier(self.context)
        return results

    def _progress_bar(self, initial: int):
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=initial, desc=self.config.name, unit="step", dynamic_ncols=True,
                    disable=not (self.context.is_main and self.config.run.progress))


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


class _IntervalStats:
    """Running means of losses, gradient norm and throughput between two log records."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss_sums: Dict[str, float] = {}
        self.steps = 0
        self.grad_norm_sum = 0.0
        self.samples = 0
        self.seconds = 0.0
        self.lr = float("nan")

    def add_losses(self, losses: Dict[str, torch.Tensor], weight: float) -> None:
        for name, value in losses.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + float(value) * weight

    def add_step(self, grad_norm: float, lr: float, samples: int, seconds: float) -> None:
        """Record one optimizer step; ``lr`` is the rate that step used (the last one is logged)."""
        self.steps += 1
        self.lr = lr
        self.grad_norm_sum += grad_norm
        self.samples += samples
        self.seconds += seconds

    def loss_means(self) -> Dict[str, float]:
        return {name: total / max(1, self.steps) for name, total in self.loss_sums.items()}

    def grad_norm_mean(self) -> float:
        return self.grad_norm_sum / max(1, self.steps)

    def samples_per_second(self) -> float:
        return round(self.samples / self.seconds, 3) if self.seconds > 0 else 0.0
