"""Batch throughput: copies of a 96-slice phantom through ``ctreasoner batch``, 1 process vs 2 torchrun ranks.

    python bench/bench_batch_throughput.py [--model DIR] [--copies 4] [--size 256 256 96] [--slices all]

Batch shards whole volumes across ranks, so the volume is copied ``--copies`` times (4: two per rank).
Both runs see the same cores: the single process uses all of them as torch threads, each of the two ranks
half. Each run starts from an empty output folder and includes process start-up and model loading, as a
user's run would. Prints the wall time of each run, slices per second, and the ratio.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUERY = "segment the liver and detect the adrenal glands"


def make_inputs(folder: Path, copies: int, size, seed: int) -> int:
    """``copies`` identical phantom CT files; returns the number of slices per volume."""
    from CTReasonerLib.data.phantom import PhantomConfig, generate_phantom
    from CTReasonerLib.io.writers import write_volume

    ct, _ = generate_phantom(seed, PhantomConfig(shape=tuple(size)))
    first = write_volume(ct, folder / "phantom_copy_0.nrrd")
    for index in range(1, copies):
        shutil.copyfile(first, folder / f"phantom_copy_{index}.nrrd")
    return ct.array.shape[0]


def timed_batch(launcher, inputs: Path, out: Path, args, threads: int) -> float:
    command = [*launcher, "-m", "CTReasonerLib.cli", "batch", str(inputs), "--query", args.query, "--out", str(out),
               "--slices", args.slices, "--device", args.device, "--no-progress"]
    if args.model:
        command += ["--model", args.model]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the bundled CTReasoner-Tiny)")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=3, default=(256, 256, 96), metavar=("I", "J", "K"))
    parser.add_argument("--slices", default="all")
    parser.add_argument("--query", default=QUERY)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="ctreasoner_bench_") as work:
        work = Path(work)
        inputs = work / "inputs"
        inputs.mkdir()
        num_slices = make_inputs(inputs, args.copies, args.size, args.seed)
        from CTReasonerLib.headless.volume_chat import parse_slices

        total_slices = len(parse_slices(args.slices, num_slices)) * args.copies
        single = timed_batch([sys.executable], inputs, work / "out_1proc", args, threads=cores)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        sharded = timed_batch(torchrun, inputs, work / "out_2ranks", args, threads=max(1, cores // 2))

    print(f"batch throughput: {args.copies} x {num_slices}-slice phantom ({' x '.join(map(str, args.size))}), "
          f"slices {args.slices!r}, {total_slices} slice chats, query {args.query!r}, {cores} cores, {args.device}")
    print(f"  1 process:         {single:8.1f} s   {total_slices / single:6.2f} slices/s")
    print(f"  2 torchrun ranks:  {sharded:8.1f} s   {total_slices / sharded:6.2f} slices/s")
    print(f"  speed-up (1 process / 2 ranks): {single / sharded:.2f}x")


if __name__ == "__main__":
    main()
