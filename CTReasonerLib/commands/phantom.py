"""``ctreasoner phantom --seed N --out DIR [--count C]``: write procedural abdominal CT phantoms with labels."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import ConfigError

FORMAT_SUFFIXES = {"nii.gz": ".nii.gz", "nrrd": ".nrrd"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, required=True, help="seed of the first phantom (same seed, same phantom)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--count", type=int, default=1, help="number of phantoms: seeds N .. N+C-1 (default 1)")
    parser.add_argument("--size", type=int, nargs=3, metavar=("I", "J", "K"), default=None,
                        help="volume size in voxels (default 256 256 96)")
    parser.add_argument("--format", choices=sorted(FORMAT_SUFFIXES), default="nii.gz",
                        help="file format (default nii.gz)")


def output_paths(out: Path, seed: int, file_format: str = "nii.gz"):
    """(CT path, label path) of the phantom with this seed: DIR/phantom_NNNN_ct.nii.gz, ..._labels.nii.gz."""
    suffix = FORMAT_SUFFIXES[file_format]
    return out / f"phantom_{seed:04d}_ct{suffix}", out / f"phantom_{seed:04d}_labels{suffix}"


def run(args: argparse.Namespace) -> int:
    from ..data.phantom import PhantomConfig, generate_phantom
    from ..io.writers import write_labelmap, write_volume

    if args.count < 1:
        raise ConfigError(f"--count must be at least 1, got {args.count}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be zero or positive, got {args.seed}")
    config = PhantomConfig() if args.size is None else PhantomConfig(shape=tuple(args.size))
    config.validate()
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in range(args.seed, args.seed + args.count):
        start = time.perf_counter()
        ct, labels = generate_phantom(seed, config)
        seconds = time.perf_counter() - start
        ct_path, label_path = output_paths(args.out, seed, args.format)
        write_volume(ct, ct_path)
        write_labelmap(labels, label_path)
        i, j, k = ct.shape_ijk
        s = ct.spacing
        print(f"wrote {ct_path} and {label_path}: {i}x{j}x{k} voxels, {s[0]:.2f}x{s[1]:.2f}x{s[2]:.2f} mm, "
              f"{ct.metadata['contrast_phase'].replace('_', '-')} phase ({seconds:.1f} s)")
    return 0
