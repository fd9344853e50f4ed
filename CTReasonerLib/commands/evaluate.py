"""``ctreasoner eval MODEL DATASET``: Dice, HD95, NSD, mAP@0.1, closer-look ablation, routing and absent-target
accuracy, mask->box vs detection branch; writes DIR/eval_report.md, DIR/eval_results.json, DIR/eval_samples.jsonl."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a model folder (Resources/Models/CTReasoner-Tiny, a merge output or a checkpoint)")
    parser.add_argument("dataset", metavar="DATASET", help="a curated dataset folder (ctreasoner curate output)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                        help="split to evaluate (default test); all: every split, for a held-out dataset")
    parser.add_argument("--out", metavar="DIR", help="report folder (default outputs/eval/<model>-<split>)")
    parser.add_argument("--no-closer-ablation", action="store_true",
                        help="skip the round-1 scoring of the Table 4 ablation (final masks still use the closer look)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="evaluate at most N records, spread evenly over organs and tasks")
    parser.add_argument("--nsd-tolerance", type=float, default=None, metavar="MM",
                        help="NSD boundary tolerance in mm (default 2)")
    parser.add_argument("--presence-gate", metavar="P|off",
                        help="override the model's presence_gate for this run: a probability in [0, 1], or off; "
                             "0 records every presence probability without overruling an answer, so the report's "
                             "gate sweep covers the model as it stands")
    parser.add_argument("--presence-rescue", metavar="P|off",
                        help="override the model's presence_rescue for this run: a probability in [0, 1] (at least "
                             "the gate), or off; a 'not visible' answer is decoded again as visible when the presence "
                             "head gives the organ at least P")
    parser.add_argument("--pixel-mask-weight", metavar="W|off",
                        help="override the model's pixel_mask_weight for this run: a weight in [0, 1), or off (the "
                             "segmenter's masks alone); needs a model with a pixel network")
    parser.add_argument("--no-presence-context", action="store_true",
                        help="switch the model's context presence decision off for this run (the pixel network's "
                             "presence is then its top-k score on the slice alone)")
    add_runtime_arguments(parser)


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --no-progress, as the commands that run a model over a dataset take them."""
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_limit(limit) -> None:
    from ..errors import ConfigError

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..errors import ConfigError
    from ..eval.evaluate import EvalSettings, evaluate_model

    check_limit(args.limit)
    settings = EvalSettings(closer_ablation=not args.no_closer_ablation)
    if args.nsd_tolerance is not None:
        if args.nsd_tolerance <= 0:
            raise ConfigError(f"--nsd-tolerance must be > 0 mm, got {args.nsd_tolerance}")
        settings.nsd_tolerance_mm = args.nsd_tolerance
    out = args.out or str(Path("outputs") / "eval" / f"{Path(args.model).resolve().name}-{args.split}")
    summary, paths = evaluate_model(args.model, args.dataset, split=args.split, out_dir=out, settings=settings,
                                    limit=args.limit, device=args.device, progress=not args.no_progress,
                                    presence_gate=_probability_or_off(args.presence_gate, "--presence-gate"),
                                    presence_rescue=_probability_or_off(args.presence_rescue, "--presence-rescue"),
                                    pixel_mask_weight=_weight_or_off(args.pixel_mask_weight),
                                    presence_context=not args.no_presence_context)
    seg, det = summary["segmentation"]["mean"], summary["detection"]
    print(f"mean Dice {seg['dice']:.4f}, HD95 {seg['hd95_mm']:.2f} mm, NSD {seg['nsd']:.4f}, mAP@0.1 {det['map']:.4f}, "
          f"routing {summary['routing']['accuracy']:.4f}, absent {summary['absent']['accuracy']:.4f}")
    print(f"report: {paths['report']}\nresults: {paths['results']}")
    return 0


def _probability_or_off(value, flag: str):
    """``--presence-gate`` / ``--presence-rescue`` / ``--pixel-mask-weight``: None (keep the model's), "off", or a
    value in [0, 1] (the model's config checks narrower ranges)."""
    from ..errors import ConfigError
    from ..eval.evaluate import GATE_OFF

    if value is None:
        return None
    if value.strip().lower() == "off":
        return GATE_OFF
    try:
        gate = float(value)
    except ValueError:
        gate = float("nan")
    if not 0.0 <= gate <= 1.0:
        raise ConfigError(f"{flag} must be a probability in [0, 1] or 'off', got {value!r}")
    return gate


def _weight_or_off(value):
    """``--pixel-mask-weight``: as ``_probability_or_off``, below 1 (a weight of 1 would leave the segmenter out)."""
    from ..errors import ConfigError

    weight = _probability_or_off(value, "--pixel-mask-weight")
    if isinstance(weight, float) and weight >= 1.0:
        raise ConfigError(f"--pixel-mask-weight must be a weight in [0, 1) or 'off', got {value!r}",
                          "0.35 is what CTReasoner-Tiny ships; `ctreasoner sweep-mask-weight` chooses one")
    return weight
