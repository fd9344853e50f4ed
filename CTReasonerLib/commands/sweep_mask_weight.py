"""``ctreasoner sweep-mask-weight MODEL DATASET``: mean Dice at several ``pixel_mask_weight`` values and both
``closer_look.keep`` rules, to choose the model's settings on validation subjects. Writes DIR/mask_weight_sweep.md
and DIR/mask_weight_sweep.json."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .evaluate import add_runtime_arguments, check_limit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a model folder with a pixel network (fit-presence --head pixels)")
    parser.add_argument("dataset", metavar="DATASET", help="a curated dataset folder of validation subjects")
    parser.add_argument("--split", default="val", choices=("train", "val", "test", "all"),
                        help="split to score (default val); all: every split, for a dataset of validation subjects")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="draw at most N records, spread evenly over organs and tasks (the segmentation ones are scored)")
    parser.add_argument("--weights", type=float, nargs="+", metavar="W", help="weights in [0, 1) (default 0 0.1 ... 0.5)")
    parser.add_argument("--out", metavar="DIR", help="folder for the table (default outputs/eval/<model>-mask-weight)")
    add_runtime_arguments(parser)


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..eval.evaluate import load_samples
    from ..eval.mask_weight_sweep import DEFAULT_WEIGHTS, render_sweep, sweep_pixel_mask_weight
    from ..model.inference import CTReasonerPipeline

    check_limit(args.limit)
    samples, _ = load_samples(args.dataset, args.split, args.limit)
    pipeline = CTReasonerPipeline.from_pretrained(args.model, device=args.device)
    result = sweep_pixel_mask_weight(pipeline, samples, args.weights or DEFAULT_WEIGHTS, progress=not args.no_progress)
    result["run"] = {"model": str(args.model), "dataset": str(args.dataset), "split": args.split, "limit": args.limit}
    out = Path(args.out or Path("outputs") / "eval" / f"{Path(args.model).resolve().name}-mask-weight")
    out.mkdir(parents=True, exist_ok=True)
    table = render_sweep(result)
    (out / "mask_weight_sweep.md").write_text(table, encoding="utf-8")
    (out / "mask_weight_sweep.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(table + f"\ntable: {out / 'mask_weight_sweep.md'}")
    return 0
