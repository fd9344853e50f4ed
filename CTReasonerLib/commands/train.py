"""``ctreasoner train CONFIG``: train CTReasoner from a YAML/JSON config (single process, torchrun DDP, DeepSpeed).

    ctreasoner train configs/tiny_cpu.yaml
    ctreasoner train configs/tiny_cpu.yaml --resume outputs/ctreasoner-tiny/checkpoints/step-00000500
    torchrun --nproc_per_node 2 -m CTReasonerLib.cli train configs/tiny_cpu.yaml --set data.batch_size=4
    torchrun --nproc_per_node 4 -m CTReasonerLib.cli train configs/qwen2_5_vl_3b_sam_vit_h.yaml \\
        --deepspeed configs/deepspeed_zero2.json
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..errors import ConfigError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="training config (.yaml or .json), e.g. configs/tiny_cpu.yaml")
    parser.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint folder (checkpoints/step-N or final)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: the config's output_dir)")
    parser.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps (overrides run.max_steps)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--deepspeed", metavar="JSON", help="train with DeepSpeed using this config (e.g. configs/deepspeed_zero2.json)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..train.config import load_train_config

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"output_dir={args.out}")
    if args.max_steps is not None:
        overrides.append(f"run.max_steps={args.max_steps}")
    if args.deepspeed:
        overrides.append(f"run.deepspeed={args.deepspeed}")
    config = load_train_config(args.config, overrides)
    result = train_from_config(config, resume_from=args.resume, device=args.device)
    if result is not None:
        print(f"trained {result.steps} steps ({result.stopped_by}, {result.elapsed_s / 60:.1f} min); "
              f"model: {result.final_checkpoint}")
    return 0


def train_from_config(config, resume_from=None, device="auto"):
    """Build the data and model that ``config`` names and train; returns the TrainResult (rank 0) or None."""
    import torch

    from ..model.device import select_device, select_dtype
    from ..train.distributed import abandon_distributed, init_distributed, rank_device, shutdown_distributed
    from ..train.trainer import Trainer, seed_everything

    target = select_device(device)
    context = init_distributed(target.type)
    target = rank_device(target, context)
    try:
        autocast_dtype = _autocast_dtype(config.run.precision, target, select_dtype)
        train_set, val_set = load_datasets(config, context)
        seed_everything(config.seed)
        model = build_model(config, train_set, target, resume_from)
        trainer = Trainer(model, config, train_set, val_set, device=target, autocast_dtype=autocast_dtype,
                          context=context)
        result = trainer.train(resume_from=resume_from)
    except BaseException:
        abandon_distributed(context)
        raise
    shutdown_distributed(context)
    return result if context.is_main else None


def _autocast_dtype(precision: str, device, select_dtype):
    """None (full fp32) or torch.bfloat16 (autocast over fp32 master weights)."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if select_dtype(device) == torch.bfloat16 else None


def load_datasets(config, context):
    """The train and val splits; rank 0 builds the phantom dataset first when the config asks for it."""
    from ..data.dataset import CuratedDataset
    from ..train.distributed import barrier

    root = Path(config.data.root)
    if not root.exists():
        if not config.data.phantoms:
            raise ConfigError(f"dataset folder {root} does not exist",
                              f"create it with `ctreasoner curate ... --out {root}`, or set data.phantoms in the config "
                              "to have the trainer build a phantom dataset there")
        if context.is_main:
            build_phantom_dataset(root, config.data.phantoms, config.data.phantom_seed)
    barrier(context)
    train_set = CuratedDataset(root, config.data.train_split)
    val_set = CuratedDataset(root, config.data.val_split)
    if len(train_set) == 0:
        raise ConfigError(f"the '{config.data.train_split}' split of {root} has no records",
                          "curate more subjects or change data.train_split")
    return train_set, val_set


def build_phantom_dataset(root: Path, phantoms: int, seed: int) -> None:
    """``ctreasoner curate --phantoms N --seed S --out ROOT``, through the CLI so the recipe is the documented one."""
    from ..cli import main as cli_main

    logger.info("building the phantom dataset: ctreasoner curate --phantoms %d --seed %d --out %s", phantoms, seed, root)
    code = cli_main(["curate", "--phantoms", str(phantoms), "--seed", str(seed), "--out", str(root), "--no-progress"])
    if code != 0:
        raise ConfigError(f"building the phantom dataset in {root} failed (exit code {code})",
                          f"run `ctreasoner curate --phantoms {phantoms} --seed {seed} --out {root}` to see why")


#: model.config sections a fine-tuning run may change on a saved model (the rest is its architecture)
FINE_TUNE_SECTIONS = ("loss", "closer_look")


def training_overrides(model_config, overrides):
    """``model_config`` with ``overrides`` (model.config of the training file) applied; only the
    sections in FINE_TUNE_SECTIONS may change, since the weights fix everything else."""
    fixed = sorted(set(overrides or {}) - set(FINE_TUNE_SECTIONS))
    if fixed:
        raise ConfigError(f"model.config sets {', '.join(fixed)} for a pretrained model, whose weights fix them",
                          f"a fine-tuning config may only change {', '.join(FINE_TUNE_SECTIONS)}")
    return model_config.updated(overrides)


def build_model(config, train_set, device, resume_from=None):
    """The model to train, in fp32 (autocast handles bf16): from a checkpoint, a model folder, or new."""
    import torch

    from ..model.config import CTReasonerConfig
    from ..model.ctreasoner import CTReasonerModel, dataset_corpus

    if resume_from:
        return CTReasonerModel.from_pretrained(resume_from, device=device, dtype=torch.float32, trainable=True)
    if config.model.source == "pretrained":
        model = CTReasonerModel.from_pretrained(config.model.pretrained, device=device, dtype=torch.float32,
                                                trainable=True)
        model.config = training_overrides(model.config, config.model.config)
        return model
    model_config = CTReasonerConfig.from_dict(config.model.config)
    if config.model.source == "tiny" and not model_config.is_tiny:
        raise ConfigError("model.source is 'tiny' but model.config.lvlm.path is set",
                          "use model.source: base for a pretrained LVLM folder")
    if config.model.source == "base" and model_config.is_tiny:
        raise ConfigError("model.source is 'base' but model.config.lvlm.path (the local LVLM folder) is not set",
                          "set it, e.g. --set model.config.lvlm.path=/models/Qwen2.5-VL-3B-Instruct")
    # The tiny tokenizer is trained on the training split's text; pretrained backbones ignore the corpus.
    corpus = dataset_corpus(train_set) if model_config.is_tiny else None
    return CTReasonerModel.build(model_config, corpus=corpus, seed=config.seed, dtype=torch.float32)
