"""``ctreasoner fit-presence MODEL DATASET --out DIR``: fit the image presence head, write a new model folder.

The head reads the segmenter's frozen image embedding and says which organs are on a slice; the model's
presence gate then overrules answers that route to an organ the head rules out (``presence_from``,
``presence_gate`` in the model config, docs/model.md). Only the head changes: the input folder stays as
it was, and the output is a complete model folder.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..errors import ConfigError
from . import require_new_output_folder

FIT_INFO_FILE = "presence_fit.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a model folder (Resources/Models/CTReasoner-Tiny or a merge output)")
    parser.add_argument("dataset", metavar="DATASET", help="a curated dataset folder (ctreasoner curate output)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model folder to write (new or empty)")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"), help="slices to fit on (default train)")
    parser.add_argument("--heldout-split", choices=("train", "val", "test"),
                        help="also report the head's BCE on this split (default: val when it has slices)")
    parser.add_argument("--presence-from", default="image", choices=("image", "both"),
                        help="what the gate reads afterwards: the image head, or the geometric mean with the LVLM head")
    parser.add_argument("--gate", type=float, metavar="P",
                        help="the presence gate to write (default: keep the model's; 0.2 when it has none)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-slices", type=int, metavar="N", help="fit on at most N slices (memory: about 0.5 MB each)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="weights dtype of the output (default: the input folder's)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fit = fit_presence_folder(args)
    print(f"presence head fitted on {fit.train_slices} slices (BCE {fit.history[0]:.4f} -> {fit.history[-1]:.4f}"
          + (f"; held-out {fit.heldout_slices} slices: BCE {fit.heldout_bce:.4f}" if fit.heldout_bce is not None else "")
          + f"); model written to {args.out}")
    return 0


def fit_presence_folder(args):
    """Load MODEL, fit its image presence head on DATASET, save the whole model to ``args.out``."""
    from dataclasses import replace

    import torch

    from ..data.dataset import load_dataset_info
    from ..model.ctreasoner import CTReasonerModel, PERCEPTION_WEIGHTS
    from ..model.device import select_dtype
    from ..train.presence_fit import PresenceFitSettings, fit_image_presence

    out = Path(args.out)
    require_new_output_folder(out, "fitted model")
    if not (Path(args.model) / PERCEPTION_WEIGHTS).is_file():
        raise ConfigError(f"{args.model} is not a model folder (no {PERCEPTION_WEIGHTS})",
                          "pass a folder written by ctreasoner merge, or Resources/Models/CTReasoner-Tiny")
    if args.gate is not None and not 0.0 <= args.gate <= 1.0:
        raise ConfigError(f"--gate must be a probability in [0, 1], got {args.gate}")
    load_dataset_info(args.dataset)
    settings = PresenceFitSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                   max_slices=args.max_slices).validate()
    device = None if args.device == "auto" else args.device
    model = CTReasonerModel.from_pretrained(args.model, device=device)
    heldout = args.heldout_split or ("val" if args.split != "val" else None)
    fit = fit_image_presence(model, args.dataset, args.split, heldout, settings, progress=not args.no_progress)
    gate = args.gate if args.gate is not None else (model.config.presence_gate if model.config.presence_gate is not None else 0.2)
    # loss.presence > 0 keeps the head training in later fine-tunes (and is what a gate needs).
    loss = replace(model.config.loss, presence=model.config.loss.presence or 1.0)
    model.config = replace(model.config, presence_from=args.presence_from, presence_gate=gate, loss=loss).validate()
    dtype = select_dtype(torch.device("cpu"), args.dtype) if args.dtype else _stored_dtype(Path(args.model) / PERCEPTION_WEIGHTS)
    model.to("cpu", dtype)
    model.save_pretrained(str(out))
    (out / FIT_INFO_FILE).write_text(json.dumps(
        {"fitted_from": str(Path(args.model).resolve()), "dataset": str(Path(args.dataset).resolve()),
         "split": args.split, "slices": fit.train_slices, "bce_per_epoch": fit.history,
         "heldout_split": heldout if fit.heldout_bce is not None else None, "heldout_bce": fit.heldout_bce,
         "settings": vars(settings), "presence_from": args.presence_from, "presence_gate": gate}, indent=2))
    return fit


def _stored_dtype(weights: Path):
    """The dtype of the perception weights in a saved folder (the tensors of one folder share it)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        name = next(iter(handle.keys()))
        return handle.get_tensor(name).dtype
