"""``ctreasoner merge CHECKPOINT --out DIR``: a standalone model folder from a training checkpoint.

A LoRA checkpoint holds only the adapter and needs the base LVLM folder named in its config; merging
folds the adapter into the base weights (peft ``merge_and_unload``) and writes the whole model, so the
result loads with ``CTReasonerModel.from_pretrained(DIR)`` without the base folder or peft. A tiny or
fully fine-tuned checkpoint has no adapter: the output is the same model without the trainer state.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError
from . import require_new_output_folder

MERGE_INFO_FILE = "merge_info.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint folder (OUTPUT/checkpoints/step-N or OUTPUT/final)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the standalone model folder to write (new or empty)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="weights dtype of the merged model (default: the model config's, fp32 on CPU)")


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = merge_checkpoint(args.checkpoint, args.out, dtype=args.dtype)
    print(f"standalone model written to {out}")
    return 0


def merge_checkpoint(checkpoint: str, out_dir: str, dtype=None) -> Path:
    """Load ``checkpoint``, merge any LoRA adapter into the LVLM and save a self-contained folder."""
    from ..model.ctreasoner import CTReasonerModel
    from ..model.device import select_dtype

    out = Path(out_dir)
    require_new_output_folder(out, "merged model")
    if Path(checkpoint).resolve() == out.resolve():
        raise ConfigError("the merged model cannot overwrite its checkpoint", "pass a different --out")
    import torch

    torch_dtype = select_dtype(torch.device("cpu"), dtype) if dtype else None
    model = CTReasonerModel.from_pretrained(checkpoint, device="cpu", dtype=torch_dtype)
    had_adapter = model.lvlm.trainable_mode == "lora"
    model.merge_lora()
    if torch_dtype is not None:
        model.to(torch_dtype)   # the perception weights too (built in fp32); a CPU reload upcasts them again
    if had_adapter:
        # The merged weights are the whole LVLM: a reload must not look for an adapter over a base folder.
        model.config = replace(model.config, lvlm=replace(model.config.lvlm, trainable="frozen"))
    model.save_pretrained(str(out))
    (out / MERGE_INFO_FILE).write_text(json.dumps(
        {"merged_from": str(Path(checkpoint).resolve()), "lora_merged": had_adapter,
         "weights_dtype": str(torch_dtype or "as trained").replace("torch.", "")}, indent=2))
    return out
