#!/usr/bin/env python
"""Seconds per phantom on one core.

Usage (one core, one BLAS/OpenMP thread):
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c 0 \
        python bench/bench_phantom.py [--count 5] [--size 256 256 96]

Prints wall and CPU seconds of each phantom (after one warm-up) and their median.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from CTReasonerLib.data.phantom import PhantomConfig, generate_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description="seconds per phantom")
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=3, default=(256, 256, 96), metavar=("I", "J", "K"))
    parser.add_argument("--seed", type=int, default=100)
    args = parser.parse_args()
    config = PhantomConfig(shape=tuple(args.size))
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"phantom {args.size[0]}x{args.size[1]}x{args.size[2]}; cores allowed: {affinity}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    generate_phantom(args.seed - 1, config)   # warm-up: imports, allocator
    walls, cpus = [], []
    for seed in range(args.seed, args.seed + args.count):
        wall, cpu = time.perf_counter(), time.process_time()
        generate_phantom(seed, config)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        print(f"seed {seed}: {walls[-1]:.2f} s wall, {cpus[-1]:.2f} s CPU")
    print(f"median: {statistics.median(walls):.2f} s wall, {statistics.median(cpus):.2f} s CPU per phantom")


if __name__ == "__main__":
    main()
