"""Fit the image presence head (``model/auxiliary.py``) on a trained model's frozen segmenter features.

The presence gate overrules an answer that routes to an organ the presence head says is not on the
slice. The LVLM-state head of a small LVLM separates present from absent organs poorly; the segmenter's
image embedding, which already carries every organ's outline, does much better. Because the image
encoder is frozen here, each retained slice of the dataset is encoded once and the head trains on the
cached embeddings, minutes on a CPU instead of a full training run:

    fit = fit_image_presence(model, "data/btcvpp", split="train")
    fit.history       # one mean BCE per epoch

The embeddings are kept in half precision: (slices, 256, h, w), e.g. 3.1 GB for 5,885 slices of the tiny
model (h = w = 32). ``max_slices`` caps it for large datasets.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from CTReasonerLib.data.dataset import CuratedDataset
from CTReasonerLib.errors import ConfigError
from CTReasonerLib.model.auxiliary import organ_presence

logger = logging.getLogger(__name__)


@dataclass
class PresenceFitSettings:
    """Optimiser settings of the head fit (AdamW with a one-cycle schedule, BCE on organ presence)."""
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    max_slices: Optional[int] = None

    def validate(self) -> "PresenceFitSettings":
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"invalid presence fit settings {self}",
                              "epochs and batch size must be >= 1, lr > 0, weight decay >= 0")
        if self.max_slices is not None and self.max_slices < 1:
            raise ConfigError(f"max_slices must be >= 1, got {self.max_slices}")
        return self


@dataclass
class PresenceFit:
    """What a fit did: slices used (per split), mean BCE per epoch, and held-out BCE when a split was given."""
    train_slices: int
    history: List[float] = field(default_factory=list)
    heldout_slices: int = 0
    heldout_bce: Optional[float] = None


def dataset_slices(root: str, split: str, max_slices: Optional[int] = None, seed: int = 0,
                   neighbours: bool = False) -> List[Tuple[np.ndarray, ...]]:
    """The distinct slices of ``split`` as (HU (H, W), labels (H, W)) pairs, at most ``max_slices`` (a seeded draw);
    with ``neighbours``, (HU, labels, neighbours' HU (2, H, W)) triples, and an error when the dataset has none."""
    return list(iter_dataset_slices(distinct_slice_samples(root, split, max_slices, seed), neighbours, root))


def distinct_slice_samples(root: str, split: str, max_slices: Optional[int] = None, seed: int = 0) -> List:
    """One ``Sample`` per distinct slice of ``split`` (pixels load lazily), at most ``max_slices`` (a seeded draw)."""
    dataset = CuratedDataset(root, split)
    seen: Dict[Tuple[str, int], int] = {}
    for index, record in enumerate(dataset.records):
        seen.setdefault((record["subject"], record["slice_pos"]), index)
    indices = sorted(seen.values())
    if max_slices is not None and len(indices) > max_slices:
        indices = sorted(np.random.default_rng(seed).choice(indices, size=max_slices, replace=False).tolist())
    return [dataset[i] for i in indices]


def iter_dataset_slices(samples, neighbours: bool = False, root: str = "the dataset") -> Iterator[Tuple[np.ndarray, ...]]:
    """``dataset_slices``' tuples one at a time (a fit on thousands of slices need not hold their HU at once)."""
    for sample in samples:
        if not neighbours:
            yield np.asarray(sample.image_hu), np.asarray(sample.labels)
            continue
        if sample.neighbours_hu is None:
            raise ConfigError(f"{root} stores no neighbouring slices (curated before they were)",
                              "re-curate it with this version of ctreasoner curate")
        yield np.asarray(sample.image_hu), np.asarray(sample.labels), np.asarray(sample.neighbours_hu)


@torch.inference_mode()
def encode_slices(model, slices, batch_size: int = 16, progress: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N slices) -> ((N, 256, h, w) half-precision image embeddings on the CPU, (N, NUM_ORGANS) presence)."""
    from tqdm.auto import tqdm

    parameter = next(model.segmenter.parameters())
    embeddings, presence = [], []
    for start in tqdm(range(0, len(slices), batch_size), desc="encoding slices", unit="batch", disable=not progress):
        chunk = slices[start:start + batch_size]
        images = torch.stack([model.slice_input(hu)[0] for hu, _ in chunk]).to(parameter.device, parameter.dtype)
        embeddings.append(model.segmenter.encode(images).image_embeddings.to("cpu", torch.float16))
        presence += [organ_presence(labels) for _, labels in chunk]
    return torch.cat(embeddings), torch.stack(presence)


def fit_image_presence(model, dataset_root: str, split: str = "train", heldout_split: Optional[str] = None,
                       settings: Optional[PresenceFitSettings] = None, progress: bool = True) -> PresenceFit:
    """Train ``model.image_presence_head`` in place on ``split``'s slices; everything else stays as it is."""
    settings = (settings or PresenceFitSettings()).validate()
    slices = dataset_slices(dataset_root, split, settings.max_slices, settings.seed)
    if not slices:
        raise ConfigError(f"split '{split}' of {dataset_root} has no slices", "pick a split that has records")
    model.eval()
    embeddings, targets = encode_slices(model, slices, progress=progress)
    head = model.image_presence_head.float()
    device = next(head.parameters()).device
    torch.manual_seed(settings.seed)
    steps_per_epoch = (len(embeddings) + settings.batch_size - 1) // settings.batch_size
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.epochs * steps_per_epoch)
    fit = PresenceFit(train_slices=len(embeddings))
    head.train()
    from tqdm.auto import tqdm

    for epoch in tqdm(range(settings.epochs), desc="fitting presence head", unit="epoch", disable=not progress):
        order, total = torch.randperm(len(embeddings)), 0.0
        for start in range(0, len(order), settings.batch_size):
            rows = order[start:start + settings.batch_size]
            loss = F.binary_cross_entropy_with_logits(head(embeddings[rows].to(device, torch.float32)),
                                                      targets[rows].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
        fit.history.append(total / len(embeddings))
        logger.info("presence head epoch %d: BCE %.4f", epoch + 1, fit.history[-1])
    head.eval()
    if heldout_split:
        held = dataset_slices(dataset_root, heldout_split)
        if held:
            fit.heldout_slices = len(held)
            fit.heldout_bce = heldout_bce(model, *encode_slices(model, held, progress=progress))
    return fit


@torch.inference_mode()
def heldout_bce(model, embeddings: torch.Tensor, targets: torch.Tensor, batch_size: int = 64) -> float:
    """Mean BCE of ``model.image_presence_head`` on cached (N, 256, h, w) embeddings and (N, K) presence."""
    head = model.image_presence_head
    device = next(head.parameters()).device
    total = 0.0
    for start in range(0, len(embeddings), batch_size):
        logits = head(embeddings[start:start + batch_size].to(device, torch.float32)).float()
        total += float(F.binary_cross_entropy_with_logits(logits, targets[start:start + batch_size].to(device),
                                                          reduction="sum")) / targets.shape[1]
    return total / len(embeddings)
