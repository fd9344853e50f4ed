"""A small real model with CTReasonerModel's training interface, for testing the loop mechanics.

It has dropout (so RNG restoration matters), two "heads" that both take part in every step (as
DDP with ``find_unused_parameters=False`` requires), a frozen part that must stay frozen, and
``save_pretrained``/``from_pretrained`` with the folder semantics of the real model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn
from torch.utils.data import Dataset

from CTReasonerLib.train.config import TrainConfig, config_from_dict


class RegressionSamples(Dataset):
    """``count`` fixed samples {x: (8,), y: (2,)} drawn from a seeded generator."""

    def __init__(self, count: int = 24, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(count, 8, generator=generator)
        self.y = torch.stack([self.x[:, :4].sum(1), self.x[:, 4:].mean(1)], dim=1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index]}


class TwoHeadRegressor(nn.Module):
    """frozen stem (8->16) -> trainable trunk (16->16, dropout) -> two heads, losses named like the real model."""

    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.dropout_p = dropout
        self.stem = nn.Linear(8, 16)
        self.stem.requires_grad_(False)
        self.trunk = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Dropout(dropout))
        self.seg_head = nn.Linear(16, 1)
        self.det_head = nn.Linear(16, 1)

    @staticmethod
    def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        return {"x": torch.stack([s["x"] for s in samples]), "y": torch.stack([s["y"] for s in samples])}

    def training_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        features = self.trunk(self.stem(batch["x"]))
        loss_seg = nn.functional.mse_loss(self.seg_head(features).squeeze(1), batch["y"][:, 0])
        loss_det = nn.functional.l1_loss(self.det_head(features).squeeze(1), batch["y"][:, 1])
        return {"loss": loss_seg + loss_det, "loss_seg": loss_seg, "loss_det": loss_det}

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save_pretrained(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), Path(directory) / "weights.pt")
        (Path(directory) / "config.json").write_text(json.dumps({"dropout": self.dropout_p}))

    @classmethod
    def from_pretrained(cls, directory: str) -> "TwoHeadRegressor":
        model = cls(**json.loads((Path(directory) / "config.json").read_text()))
        model.load_state_dict(torch.load(Path(directory) / "weights.pt", weights_only=True))
        return model


def regressor_config(output_dir: str, **run) -> TrainConfig:
    """A training config for the regressor; ``run`` overrides keys of the run section (and a few others)."""
    optim = {"lr": 1e-2, "grad_accum_steps": run.pop("grad_accum_steps", 2), "max_grad_norm": 1.0,
             "schedule": "cosine", "warmup_steps": 2}
    data = {"root": "unused", "batch_size": run.pop("batch_size", 4)}
    base = {"epochs": 3, "log_every": 1, "progress": False, "checkpoint_every": 0, "keep_last": 2}
    base.update(run)
    return config_from_dict({"name": "regressor", "seed": 7, "output_dir": output_dir,
                             "data": data, "optim": optim, "run": base}).validate()


def weights_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
