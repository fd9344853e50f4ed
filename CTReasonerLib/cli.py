"""``ctreasoner`` command line. One file per command under ``CTReasonerLib/commands``.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported
only when their command runs, so ``ctreasoner --help`` stays fast and light commands never import torch.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from .errors import CTReasonerError

# name -> (module under CTReasonerLib.commands, one-line help)
COMMANDS = {
    "info": ("info", "print a CT file's geometry and intensity summary"),
    "convert": ("convert", "convert a CT (NIfTI, NRRD or DICOM folder) to another format, keeping geometry"),
    "phantom": ("phantom", "generate procedural abdominal CT phantoms with 14-organ label maps"),
    "curate": ("curate", "build a BTCV++-style dataset (slices, prompts, descriptions, Q&A, splits)"),
    "review": ("review", "report flagged and rejected appearance descriptions in a curated dataset"),
    "train": ("train", "train the reasoning-perception model from a config file"),
    "merge": ("merge", "merge a training checkpoint into a standalone model folder"),
    "fit-presence": ("fit_presence", "fit a presence head (image features or a pixel network) of a model on frozen weights"),
    "eval": ("evaluate", "evaluate a model on a curated dataset split (Dice, HD95, NSD, mAP, routing)"),
    "sweep-mask-weight": ("sweep_mask_weight", "mean Dice at several pixel_mask_weight values, to choose one on validation data"),
    "chat": ("chat", "run one chat turn on a CT volume and write Slicer-ready outputs"),
    "batch": ("batch", "run queries over many volumes (resumable; shards under torchrun)"),
    "serve": ("serve", "run the JSON-RPC backend over stdio or HTTP"),
    "demo": ("demo", "the main job on the embedded default: sample CT -> chat -> Slicer-ready outputs"),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``ctreasoner`` parser; with ``command``, that command's own arguments are added too."""
    parser = argparse.ArgumentParser(prog="ctreasoner", description="Chat-driven CT interpretation (CTReasoner).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _command_module(name).add_arguments(p)
    return parser


def _command_module(name: str):
    return importlib.import_module(f"CTReasonerLib.commands.{COMMANDS[name][0]}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command is the first positional word; only its module is imported, so --help stays light.
    command = next((word for word in argv if not word.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = _command_module(args.command)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(module.run(args) or 0)
    except CTReasonerError as exc:
        print(f"ctreasoner {args.command}: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctreasoner {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
