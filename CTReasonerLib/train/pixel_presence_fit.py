"""Fit the pixel-level presence network (``model/pixel_presence.py``) on a curated dataset's label maps.

The network sees only the slice, so this needs nothing else from the model: each retained slice becomes
a model-frame image at the network's side plus its label map, and the network trains on
those with monai's ``DiceCELoss`` (soft targets; Dice over the organ channels, batch-wise, so the small
organs count as much as the liver):

    fit = fit_pixel_presence(model, "data/btcvpp", split="train")
    fit.history       # one mean loss per epoch

The segmentation loss alone does not train the gate's question: a sliver of an organ is a few pixels of the
Dice, and a few stray pixels of an absent organ cost little, yet either decides a presence answer.
``presence_weight`` > 0 adds a BCE on the presence score itself (the mean of each organ's ``top_k`` most
probable pixels) against which organs the slice shows, counted the way curation counts them: present from
the dataset's ``min_organ_area_px``, absent at no pixel, and neither in between (no question asks).

Memory: the network inputs in 8 bits (``INPUT_STORAGE``: 0.2 MB per slice at side 256, three times that with
neighbours) and the label maps.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from CTReasonerLib.data.dataset import load_dataset_info
from CTReasonerLib.errors import ConfigError
from CTReasonerLib.io.slices import NEIGHBOUR_DISTANCE_MM
from CTReasonerLib.model.pixel_presence import PixelPresenceConfig, build_pixel_presence, widen_to_neighbours
from CTReasonerLib.organs import NUM_ORGANS, ORGAN_BY_KEY
from CTReasonerLib.train.presence_fit import (PresenceFit, PresenceFitSettings, dataset_slices, distinct_slice_samples,
                                              iter_dataset_slices)

logger = logging.getLogger(__name__)

#: intensity jitter of the training images (scale, shift), so that scanner differences do not decide
INTENSITY_JITTER = (0.1, 0.03)


@torch.inference_mode()
def prepare_slices(model, net, slices, progress: bool = True, count: Optional[int] = None):
    """(N slices: (HU, labels) pairs, or (HU, labels, neighbours' HU) triples for a network with neighbours; any
    iterable, ``count`` = N when it has no length) -> ((N, C, s, s) network inputs in ``INPUT_STORAGE``
    (``load_inputs`` reads them), N (labels, transform) pairs). The inputs are filled in place.
    Targets are made per batch (``batch_targets``): one-hot fractions of every slice at once would take 15x the
    inputs' memory."""
    from tqdm.auto import tqdm

    count = len(slices) if count is None else count
    side = net.config.image_size
    images = torch.empty((count, net.config.in_channels, side, side), dtype=INPUT_STORAGE)
    labelled = []
    for row, (hu, labels, *neighbours) in enumerate(tqdm(slices, total=count, desc="preparing slices", unit="slice",
                                                         disable=not progress)):
        inputs, transform = network_input(model, net, hu, *neighbours)
        images[row] = store_inputs(net.resize(inputs[None])[0])
        labelled.append((labels, transform))
    if len(labelled) != count:
        raise ValueError(f"expected {count} slices, got {len(labelled)}")
    return images, labelled


def network_input(model, net, hu, neighbours_hu=None):
    """(H, W) HU of a slice and (2, H, W) of its neighbours (None: none) -> ((C, S, S) input of the pixel network
    in the model frame, the slice's ``ResizeToSquare``), as the pipeline builds it."""
    image, transform, _ = model.slice_input(hu)
    reads_neighbours = net.config.neighbours and neighbours_hu is not None
    context = model.neighbour_input(neighbours_hu)[None] if reads_neighbours else None
    return net.inputs(image[None], context)[0], transform


#: the prepared inputs are windowed values in [0, 1] kept as 8-bit steps (1.6 HU in the abdomen window, far
#: below the intensity jitter): 9,000 slices with neighbours then take 5.4 GB instead of 10.7 in half precision
INPUT_STORAGE = torch.uint8


def store_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """Network inputs in [0, 1] -> ``INPUT_STORAGE`` (rounded to 1/255)."""
    return (inputs.clamp(0, 1) * 255).round().to(INPUT_STORAGE)


def load_inputs(stored: torch.Tensor, device) -> torch.Tensor:
    """``store_inputs`` output -> float32 inputs in [0, 1] on ``device``."""
    return stored.to(device, torch.float32) / 255


#: chance that a training slice's neighbours are swapped (volumes run either way in K) or replaced by the
#: slice itself (what the network gets for a lone slice)
NEIGHBOUR_SWAP, NEIGHBOUR_DROP = 0.5, 0.1


def augment_neighbours(batch: torch.Tensor) -> torch.Tensor:
    """(B, 9, s, s) inputs (slice, below, above; 3 channels each) with their neighbours swapped or dropped at random."""
    slice_, below, above = batch[:, :3], batch[:, 3:6], batch[:, 6:]
    swap = (torch.rand(len(batch), 1, 1, 1, device=batch.device) < NEIGHBOUR_SWAP)
    below, above = torch.where(swap, above, below), torch.where(swap, below, above)
    drop = (torch.rand(len(batch), 1, 1, 1, device=batch.device) < NEIGHBOUR_DROP)
    below, above = torch.where(drop, slice_, below), torch.where(drop, slice_, above)
    return torch.cat([slice_, below, above], dim=1)


def batch_targets(net, labelled, rows) -> torch.Tensor:
    """(B, NUM_ORGANS + 1, s, s) class fractions of the slices ``rows``."""
    return torch.stack([net.targets(*labelled[int(row)]) for row in rows])


#: a sliver below this many pixels is neither present nor absent (curation's default, for datasets that do not say)
DEFAULT_MIN_ORGAN_AREA_PX = 4


def presence_targets(labels, min_area_px: int, annotated=None) -> torch.Tensor:
    """(H, W) organ labels -> (NUM_ORGANS,) 1 where an organ has >= ``min_area_px`` pixels, 0 where it has none,
    -1 (not scored) for a smaller sliver or an organ outside ``annotated`` (label values; None: all)."""
    areas = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=NUM_ORGANS + 1)[1:NUM_ORGANS + 1]
    targets = np.where(areas >= min_area_px, 1.0, np.where(areas == 0, 0.0, -1.0)).astype(np.float32)
    if annotated is not None:
        targets[[label - 1 for label in range(1, NUM_ORGANS + 1) if label not in annotated]] = -1.0
    return torch.from_numpy(targets)


def dataset_presence_rule(dataset_root: str):
    """(min_organ_area_px, annotated label values) of a curated dataset, the rule its questions follow."""
    info = load_dataset_info(dataset_root)
    min_area = int((info.get("config") or {}).get("min_organ_area_px", DEFAULT_MIN_ORGAN_AREA_PX))
    keys = info.get("annotated_organs")
    annotated = None if keys is None else {ORGAN_BY_KEY[key].label for key in keys if key in ORGAN_BY_KEY}
    return min_area, annotated


def dataset_neighbour_distance(dataset_root: str) -> float:
    """How far either side of each slice a curated dataset stored its neighbours, in mm."""
    info = load_dataset_info(dataset_root)
    return float((info.get("config") or {}).get("neighbour_distance_mm", NEIGHBOUR_DISTANCE_MM))


def presence_bce(scores: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """BCE of (B, NUM_ORGANS) presence probabilities against ``presence_targets`` rows, the -1 entries left out."""
    scored = targets >= 0
    return F.binary_cross_entropy(scores[scored].clamp(1e-6, 1 - 1e-6), targets[scored], reduction=reduction)


def fit_pixel_presence(model, dataset_root: str, split: str = "train", heldout_split: Optional[str] = None,
                       settings: Optional[PresenceFitSettings] = None, config: Optional[PixelPresenceConfig] = None,
                       progress: bool = True, continue_fit: bool = False, presence_weight: float = 0.0) -> PresenceFit:
    """Give ``model`` a pixel presence network trained on ``split``'s slices (a new one of ``config``'s sizes,
    default sizes when None), and record it in ``model.config.pixel_presence``. Everything else stays as it is.

    ``continue_fit``: start from the model's own pixel network rather than from random weights, e.g. to train it
    further on more subjects, or at a finer ``image_size`` (the network is fully convolutional, so its weights
    carry over to any side); ``config`` may then change ``image_size`` and ``top_k``, not the features (None
    keeps the network's settings). ``presence_weight``: the weight of the presence BCE added to the
    segmentation loss (0: segmentation only)."""
    from dataclasses import replace

    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    settings = (settings or PresenceFitSettings()).validate()
    if not presence_weight >= 0:
        raise ConfigError(f"the presence weight must be >= 0, got {presence_weight}", "pass 0 for the segmentation loss alone")
    if continue_fit:
        config = _config_to_continue(model, config)
    config = (config or PixelPresenceConfig()).validate()
    if config.neighbours:  # the network learns the neighbours the dataset stores, so it asks for the same
        config = replace(config, neighbour_distance_mm=dataset_neighbour_distance(dataset_root))
    samples = distinct_slice_samples(dataset_root, split, settings.max_slices, settings.seed)
    if not samples:
        raise ConfigError(f"split '{split}' of {dataset_root} has no slices", "pick a split that has records")
    torch.manual_seed(settings.seed)
    device = model.device
    net = build_pixel_presence(config)
    if continue_fit:
        weights = {name: value.float() for name, value in model.pixel_presence_net.state_dict().items()}
        if config.neighbours and not model.config.pixel_presence.neighbours:
            weights = widen_to_neighbours(weights)
        net.load_state_dict(weights)
    net = net.to(device).requires_grad_(True)
    images, labelled = prepare_slices(model, net, iter_dataset_slices(samples, config.neighbours, dataset_root),
                                      progress, count=len(samples))
    rule = dataset_presence_rule(dataset_root)
    truth = torch.stack([presence_targets(labels, *rule) for labels, _ in labelled])
    loss_fn = DiceCELoss(softmax=True, batch=True, include_background=False)
    steps_per_epoch = (len(images) + settings.batch_size - 1) // settings.batch_size
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.epochs * steps_per_epoch,
                                                   pct_start=0.05)
    fit = PresenceFit(train_slices=len(images))
    scale, shift = INTENSITY_JITTER
    net.train()
    bar = tqdm(total=settings.epochs * steps_per_epoch, desc="fitting pixel presence", unit="step", disable=not progress)
    for epoch in range(settings.epochs):
        order, total = torch.randperm(len(images)), 0.0
        for start in range(0, len(order), settings.batch_size):
            rows = order[start:start + settings.batch_size]
            batch = load_inputs(images[rows], device)
            jitter = torch.randn(len(rows), 2, 1, 1, 1, device=device)
            batch = batch * (1 + scale * jitter[:, 0]) + shift * jitter[:, 1]
            if config.neighbours:
                batch = augment_neighbours(batch)
            logits = net(batch).float()
            loss = loss_fn(logits, batch_targets(net, labelled, rows).to(device))
            if presence_weight:
                scores = net.presence_from_probabilities(torch.softmax(logits, dim=1))
                loss = loss + presence_weight * presence_bce(scores, truth[rows].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
            bar.update()
        fit.history.append(total / len(images))
        bar.set_postfix(epoch=epoch + 1, loss=f"{fit.history[-1]:.4f}")
        logger.info("pixel presence epoch %d: loss %.4f", epoch + 1, fit.history[-1])
    bar.close()
    net.eval().requires_grad_(False)
    model.pixel_presence_net = net.to(dtype=next(model.segmenter.parameters()).dtype)
    model.config = replace(model.config, pixel_presence=config)
    if heldout_split:
        held = dataset_slices(dataset_root, heldout_split, neighbours=config.neighbours)
        if held:
            fit.heldout_slices = len(held)
            fit.heldout_bce = heldout_presence_bce(model, held, rule)
    return fit


def _config_to_continue(model, config: Optional[PixelPresenceConfig]) -> PixelPresenceConfig:
    """The sizes of the network a continued fit starts from; an error when there is none or ``config`` asks for
    other features (channel counts are the weights' shapes; the side is not)."""
    current = model.config.pixel_presence
    if model.pixel_presence_net is None or current is None:
        raise ConfigError("this model has no pixel network to continue fitting",
                          "fit a new network instead (leave out --continue)")
    if config is None:
        return current
    if config.features != current.features:
        raise ConfigError(f"a continued fit keeps the network's features {list(current.features)}; "
                          f"{list(config.features)} were asked for",
                          "leave --pixel-features out, or fit a new network")
    if current.neighbours and not config.neighbours:
        raise ConfigError("this model's pixel network sees the neighbouring slices; a continued fit keeps them",
                          "leave neighbours on, or fit a new network")
    return config


@torch.inference_mode()
def heldout_presence_bce(model, slices, rule=(DEFAULT_MIN_ORGAN_AREA_PX, None), batch_size: int = 32) -> float:
    """Mean BCE of the network's presence probabilities against ``presence_targets`` under ``rule``
    ((min_organ_area_px, annotated labels), ``dataset_presence_rule``), over the scored organs of every slice."""
    net = model.pixel_presence_net
    total, count = 0.0, 0
    for start in range(0, len(slices), batch_size):
        chunk = slices[start:start + batch_size]
        inputs = torch.stack([network_input(model, net, hu, *neighbours)[0] for hu, _, *neighbours in chunk])
        inputs = inputs.to(model.device)
        truth = torch.stack([presence_targets(labels, *rule) for _, labels, *_ in chunk]).to(inputs.device)
        total += float(presence_bce(net.presence(inputs), truth, reduction="sum"))
        count += int((truth >= 0).sum())
    return total / max(count, 1)
