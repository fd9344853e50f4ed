"""``ctreasoner fit-presence MODEL DATASET --out DIR``: fit a presence head, write a new model folder.

``--head image`` (default) fits the head on the segmenter's frozen image embedding; ``--head pixels`` fits
the pixel-level presence network, which labels the slice's pixels itself (``model/pixel_presence.py``).
``--head context`` fits the decision that reads a pixel network with neighbours on the slice and on each
neighbour (``model/context_presence.py``); fit it on subjects the pixel network did not train on.
Each says which organs are on a slice; the model's presence gate then overrules answers that route to
an organ the heads named by ``presence_from`` rule out (``presence_gate`` in the model config,
docs/model.md). Only the fitted head changes: the input folder stays as it was, and the output is a
complete model folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from ..errors import ConfigError
from . import require_new_output_folder

HEADS = ("image", "pixels", "context")
#: what each fit writes next to the weights (settings, losses, data)
FIT_INFO_FILES = {"image": "presence_fit.json", "pixels": "pixel_presence_fit.json", "context": "context_presence_fit.json"}
#: optimiser defaults per head: the image head fits on cached embeddings, the pixel network on images
FIT_DEFAULTS = {"image": {"epochs": 12, "batch_size": 64, "lr": 2e-3},
                "pixels": {"epochs": 8, "batch_size": 16, "lr": 3e-3}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a model folder (Resources/Models/CTReasoner-Tiny or a merge output)")
    parser.add_argument("dataset", metavar="DATASET", help="a curated dataset folder (ctreasoner curate output)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model folder to write (new or empty)")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"), help="slices to fit on (default train)")
    parser.add_argument("--heldout-split", choices=("train", "val", "test"),
                        help="also report the head's BCE on this split (default: val when it has slices)")
    parser.add_argument("--head", default="image", choices=HEADS,
                        help="image: the head on the segmenter's image embedding; pixels: the pixel-level network; "
                             "context: the decision over the pixel network's maps of the slice and its neighbours")
    parser.add_argument("--presence-from", metavar="SOURCES",
                        help="what the gate reads afterwards: lvlm, image, pixels, or several joined by '+' "
                             "(geometric mean), e.g. image+pixels (default: the fitted head; --head context keeps "
                             "the model's sources when they read pixels)")
    parser.add_argument("--gate", type=float, metavar="P",
                        help="the presence gate to write (default: keep the model's; 0.2 when it has none)")
    parser.add_argument("--rescue", type=float, metavar="P",
                        help="the presence rescue to write, at least the gate (default: keep the model's)")
    parser.add_argument("--epochs", type=int, help="default 12 (image), 8 (pixels)")
    parser.add_argument("--batch-size", type=int, help="default 64 (image), 16 (pixels)")
    parser.add_argument("--lr", type=float, help="default 2e-3 (image), 3e-3 (pixels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-slices", type=int, metavar="N", help="fit on at most N slices (memory: about 0.5 MB each)")
    parser.add_argument("--continue", dest="continue_fit", action="store_true",
                        help="--head pixels: train MODEL's own pixel network further (its features; --pixel-size may change) instead of a new one")
    parser.add_argument("--pixel-size", type=int, metavar="S",
                        help="--head pixels: the side the network sees, a multiple of 16 (default 128)")
    parser.add_argument("--pixel-features", type=int, nargs=6, metavar="C",
                        help="--head pixels: BasicUNet channels, five encoder levels and the last decoder level "
                             "(default 8 16 32 64 128 8)")
    parser.add_argument("--pixel-top-k", type=int, metavar="K",
                        help="--head pixels: an organ's presence is the mean of its K most probable pixels (default 4)")
    parser.add_argument("--neighbours", action="store_true",
                        help="--head pixels: the network also sees the slices either side (the dataset must store "
                             "them: curated by this version); with --continue, a network without them is widened")
    parser.add_argument("--presence-weight", type=float, default=0.0, metavar="W",
                        help="--head pixels: add W x the BCE of the presence score (the gate's question) to the "
                             "segmentation loss (default 0: segmentation only)")
    parser.add_argument("--l2", type=float, metavar="L",
                        help="--head context: L2 penalty of the per-organ logistic fit (default 1e-3)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="weights dtype of the output (default: the input folder's)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fit = fit_presence_folder(args)
    if args.head == "context":
        print(f"context presence fitted on {fit.rows} questions from {fit.train_slices} slices (BCE of the top-k score "
              f"{fit.plain_bce:.4f}, of the decision {fit.decision_bce:.4f}"
              + (f"; held-out {fit.heldout_slices} slices: {fit.heldout_plain_bce:.4f} -> {fit.heldout_bce:.4f}"
                 if fit.heldout_bce is not None else "") + f"); model written to {args.out}")
        return 0
    print(f"{args.head} presence head fitted on {fit.train_slices} slices (loss {fit.history[0]:.4f} -> {fit.history[-1]:.4f}"
          + (f"; held-out {fit.heldout_slices} slices: presence BCE {fit.heldout_bce:.4f}" if fit.heldout_bce is not None else "")
          + f"); model written to {args.out}")
    return 0


def fit_presence_folder(args):
    """Load MODEL, fit the presence head ``args.head`` on DATASET, save the whole model to ``args.out``."""
    from dataclasses import replace

    import torch

    from ..data.dataset import load_dataset_info, load_splits
    from ..model.config import presence_sources
    from ..model.ctreasoner import CTReasonerModel, PERCEPTION_WEIGHTS
    from ..model.device import select_dtype
    from ..model.pixel_presence import PixelPresenceConfig
    from ..train.context_presence_fit import DEFAULT_L2, fit_context_presence
    from ..train.pixel_presence_fit import fit_pixel_presence
    from ..train.presence_fit import PresenceFitSettings, fit_image_presence

    out = Path(args.out)
    require_new_output_folder(out, "fitted model")
    if not (Path(args.model) / PERCEPTION_WEIGHTS).is_file():
        raise ConfigError(f"{args.model} is not a model folder (no {PERCEPTION_WEIGHTS})",
                          "pass a folder written by ctreasoner merge, or Resources/Models/CTReasoner-Tiny")
    if args.gate is not None and not 0.0 <= args.gate <= 1.0:
        raise ConfigError(f"--gate must be a probability in [0, 1], got {args.gate}")
    if args.rescue is not None and not 0.0 <= args.rescue <= 1.0:
        raise ConfigError(f"--rescue must be a probability in [0, 1], got {args.rescue}")
    if args.rescue is not None and args.gate is not None and args.rescue < args.gate:
        raise ConfigError(f"--rescue ({args.rescue}) must be >= presence_gate ({args.gate}): a rescued answer would "
                          "fail the gate", "raise --rescue to the gate or above")
    if args.continue_fit and args.head != "pixels":
        raise ConfigError("--continue trains a pixel network further", "add --head pixels, or leave --continue out")
    if args.neighbours and args.head != "pixels":
        raise ConfigError("--neighbours gives the pixel network the slices either side", "add --head pixels")
    if args.l2 is not None and args.head != "context":
        raise ConfigError("--l2 is the context decision's penalty", "add --head context, or leave it out")
    if args.presence_weight and args.head != "pixels":
        raise ConfigError("--presence-weight weighs a pixel network's presence loss",
                          "add --head pixels (the image head's loss is the presence BCE already), or leave it out")
    if not args.presence_weight >= 0:
        raise ConfigError(f"--presence-weight must be >= 0, got {args.presence_weight}")
    presence_from = args.presence_from or args.head
    if args.head == "context":
        presence_from = args.presence_from or "pixels"   # or the model's own sources, once it is loaded (below)
    sources = presence_sources(presence_from)
    if args.head == "context" and "pixels" not in sources:
        # refused before the slices are read: the config check after the fit would say the same
        raise ConfigError(f"the context decision refines the pixel network's presence, which --presence-from "
                          f"{presence_from} does not read", "add 'pixels' to --presence-from, or leave it out")
    pixel_sizes = {name: value for name, value in (("image_size", args.pixel_size), ("features", args.pixel_features),
                                                   ("top_k", args.pixel_top_k),
                                                   ("neighbours", True if args.neighbours else None)) if value is not None}
    PixelPresenceConfig(**pixel_sizes).validate()
    load_dataset_info(args.dataset)
    defaults = FIT_DEFAULTS.get(args.head, {})
    settings = PresenceFitSettings(**{name: getattr(args, name) if getattr(args, name) is not None else value
                                      for name, value in defaults.items()},
                                   seed=args.seed, max_slices=args.max_slices).validate()
    device = None if args.device == "auto" else args.device
    model = CTReasonerModel.from_pretrained(args.model, device=device)
    if args.head == "context" and args.presence_from is None and "pixels" in presence_sources(model.config.presence_from):
        presence_from = model.config.presence_from      # e.g. image+pixels: the decision refines its pixels part
    if "pixels" in sources and args.head != "pixels" and model.pixel_presence_net is None:
        raise ConfigError(f"--presence-from {presence_from} reads a pixel presence network, and {args.model} has none",
                          "fit one first (--head pixels), or leave 'pixels' out")
    heldout = args.heldout_split or ("val" if args.split != "val" and load_splits(args.dataset).get("val") else None)
    presence_context = model.config.presence_context
    if args.head == "context":
        _warn_if_pixel_training_data(Path(args.model), Path(args.dataset))
        fit = fit_context_presence(model, args.dataset, args.split, heldout, **({} if args.l2 is None else {"l2": args.l2}),
                                   max_slices=args.max_slices, seed=args.seed, progress=not args.no_progress)
        presence_context = fit.config
    elif args.head == "pixels":
        current = model.config.pixel_presence if args.continue_fit else None
        pixel_config = replace(current, **pixel_sizes) if current else PixelPresenceConfig(**pixel_sizes)
        fit = fit_pixel_presence(model, args.dataset, args.split, heldout, settings, config=pixel_config,
                                 progress=not args.no_progress, continue_fit=args.continue_fit,
                                 presence_weight=args.presence_weight)
    else:
        fit = fit_image_presence(model, args.dataset, args.split, heldout, settings, progress=not args.no_progress)
    gate = args.gate if args.gate is not None else (model.config.presence_gate if model.config.presence_gate is not None else 0.2)
    # loss.presence > 0 keeps the image head training in later fine-tunes (and is what a gate needs).
    loss = replace(model.config.loss, presence=model.config.loss.presence or 1.0)
    if args.head == "pixels" and presence_context is not None:
        # the decision was fitted on the old network's maps
        print("note: the model's context presence decision was dropped with its old pixel network; "
              "fit a new one with --head context")
        presence_context = None
    rescue = args.rescue if args.rescue is not None else model.config.presence_rescue
    model.config = replace(model.config, presence_from=presence_from, presence_gate=gate, presence_rescue=rescue,
                           loss=loss, presence_context=presence_context).validate()
    dtype = select_dtype(torch.device("cpu"), args.dtype) if args.dtype else _stored_dtype(Path(args.model) / PERCEPTION_WEIGHTS)
    model.to("cpu", dtype)
    model.save_pretrained(str(out))
    info = {"head": args.head, "fitted_from": str(Path(args.model).resolve()), "dataset": str(Path(args.dataset).resolve()),
            "split": args.split, "slices": fit.train_slices}
    if args.head == "context":
        info.update({"questions": fit.rows, "bce_top_k_score": fit.plain_bce, "bce_decision": fit.decision_bce,
                     "heldout_split": heldout if fit.heldout_bce is not None else None,
                     "heldout_bce_top_k_score": fit.heldout_plain_bce, "heldout_bce_decision": fit.heldout_bce,
                     "l2": args.l2 if args.l2 is not None else DEFAULT_L2, "max_slices": args.max_slices, "seed": args.seed,
                     "presence_gate": gate, "presence_rescue": rescue})
        (out / FIT_INFO_FILES[args.head]).write_text(json.dumps(info, indent=2))
        return fit
    (out / FIT_INFO_FILES[args.head]).write_text(json.dumps(
        {**info, "loss_per_epoch": fit.history,
         "heldout_split": heldout if fit.heldout_bce is not None else None, "heldout_presence_bce": fit.heldout_bce,
         "settings": vars(settings), "presence_from": presence_from, "presence_gate": gate, "presence_rescue": rescue,
         **({"pixel_presence": dataclasses.asdict(model.config.pixel_presence), "continued": args.continue_fit,
             "presence_weight": args.presence_weight}
            if args.head == "pixels" else {})}, indent=2))
    return fit


def _stored_dtype(weights: Path):
    """The dtype of the perception weights in a saved folder (the tensors of one folder share it)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        name = next(iter(handle.keys()))
        return handle.get_tensor(name).dtype


def _warn_if_pixel_training_data(model: Path, dataset: Path) -> None:
    """The context decision fitted on the pixel network's own training slices learns to trust it too much."""
    record = model / FIT_INFO_FILES["pixels"]
    try:
        trained_on = json.loads(record.read_text()).get("dataset")
    except (OSError, ValueError):
        return
    if trained_on and Path(trained_on) == dataset.resolve():
        print(f"warning: {model}'s pixel network was fitted on {dataset}; the context decision should be fitted on "
              "subjects it has not seen (ctreasoner curate --seed with a new seed), or it will trust the network too much")
