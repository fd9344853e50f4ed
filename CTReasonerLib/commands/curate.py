"""``ctreasoner curate``: build a BTCV++-style dataset from phantoms or from (CT, label map) files.

    ctreasoner curate --phantoms 40 --seed 0 --out data/btcvpp
    ctreasoner curate --images imagesTr --labels labelsTr --mapping btcv --out data/btcv
    ctreasoner curate --images TotalSegmentatorDir --mapping totalsegmentator --out data/ts
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("input (phantoms, or files)")
    source.add_argument("--phantoms", type=int, metavar="N", help="curate N procedural phantoms (seeds S..S+N-1)")
    source.add_argument("--phantom-shape", type=int, nargs=3, metavar=("I", "J", "K"),
                        help="phantom voxel grid (default: the phantom generator's, 256 256 96)")
    source.add_argument("--images", metavar="DIR_OR_GLOB",
                        help="CT files (folder or glob), or a TotalSegmentator folder of <subject>/ct.nii.gz")
    source.add_argument("--labels", metavar="DIR_OR_GLOB", help="label maps matching --images by name or number")
    source.add_argument("--mapping", default="btcv", metavar="NAME_OR_JSON",
                        help="source label names -> organs: btcv, totalsegmentator, amos, or a JSON file (default btcv)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output dataset folder (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    parser.add_argument("--seed", type=int, default=0, help="seed for phantoms, phrasing choices and splits")
    parser.add_argument("--workers", type=int, default=2, help="processes over volumes (default 2)")
    parser.add_argument("--splits", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                        help="subject-level split fractions (default 0.7 0.15 0.15)")
    parser.add_argument("--config", metavar="JSON", help="CurationConfig overrides as a JSON file (see docs/dataset.md)")
    llm = parser.add_argument_group("optional LLM appearance writer (off by default)")
    llm.add_argument("--llm-url", metavar="URL", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    llm.add_argument("--llm-model", metavar="NAME", help="model name sent to the endpoint")
    llm.add_argument("--llm-key-env", metavar="VAR", help="environment variable that holds the API key")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(args):
    from ..data.curate.config import CurationConfig

    overrides = {}
    if args.config:
        try:
            overrides = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read curation config {args.config}: {exc}", "give a JSON object of settings")
    overrides["seed"] = args.seed
    if args.splits:
        overrides["split_fractions"] = tuple(args.splits)
    return CurationConfig.from_dict(overrides)


def _sources(args):
    from ..data.curate import sources

    if args.phantoms is not None:
        if args.images or args.labels:
            raise ConfigError("give either --phantoms or --images/--labels, not both")
        if args.phantoms < 1:
            raise ConfigError(f"--phantoms must be at least 1, got {args.phantoms}")
        options = {"shape": tuple(args.phantom_shape)} if args.phantom_shape else {}
        found = [sources.PhantomSource(f"phantom{args.seed + n:04d}", args.seed + n, options)
                 for n in range(args.phantoms)]
        return found, None, f"phantoms seeds {args.seed}..{args.seed + args.phantoms - 1}"
    if not args.images:
        raise ConfigError("no input given", "use --phantoms N, or --images (and --labels) with --mapping")
    mapping = sources.load_mapping(args.mapping)
    if sources.is_totalsegmentator_layout(args.images) and not args.labels:
        found = sources.discover_totalsegmentator(args.images, mapping)
    elif not args.labels:
        raise ConfigError("--images needs --labels (except for a TotalSegmentator folder)",
                          "give --labels DIR_OR_GLOB with one label map per image")
    else:
        found = sources.discover_file_pairs(args.images, args.labels, mapping)
    return found, mapping.annotated_organs, f"files {args.images} (mapping {mapping.name})"


def _writer(args):
    if not args.llm_url:
        if args.llm_model or args.llm_key_env:
            raise ConfigError("--llm-model/--llm-key-env need --llm-url")
        return None
    if not args.llm_model:
        raise ConfigError("--llm-url needs --llm-model", "name the model the endpoint serves")
    from ..data.curate.llm_writer import LLMDescriptionWriter, LLMWriterConfig

    return LLMDescriptionWriter(LLMWriterConfig(url=args.llm_url, model=args.llm_model, api_key_env=args.llm_key_env))


def run(args) -> int:
    from ..data.curate.pipeline import curate_dataset

    config = _config(args)
    found, annotated, description = _sources(args)
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    summary = curate_dataset(found, args.out, config, workers=args.workers, annotated_organs=annotated,
                             writer=_writer(args), source_description=description, overwrite=args.overwrite,
                             progress=not args.no_progress)
    counts = summary.counts
    print(f"dataset {summary.root}: {counts['subjects']} subjects, {counts['slices']} slices, "
          f"{counts['records']} records ({', '.join(f'{k} {v}' for k, v in counts['tasks'].items())}); "
          f"splits {', '.join(f'{k} {len(v)}' for k, v in summary.splits.items())} subjects; "
          f"review {', '.join(f'{k} {v}' for k, v in counts['review'].items())}; {summary.seconds:.1f} s")
    return 0
