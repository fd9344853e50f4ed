"""Training throughput: slice-grouped batches with capped closer-look crops vs independently shuffled records.

    python bench/bench_train_step.py DATASET [--model DIR] [--batch 32] [--steps 6] [--threads 2]

DATASET is a ``ctreasoner curate`` folder (e.g. outputs/phantom-dataset-40). For each setting the same
model (a copy of ``--model``, default the committed CTReasoner-Tiny, trainable, fp32 on the CPU) runs
``--steps`` optimizer steps of ``--batch`` records after one warm-up step:

  plain     records shuffled independently (data.records_per_slice 1, no crop cap)
  grouped   data.records_per_slice 8, closer_look.train_crops_per_batch 6 (configs/tiny_cpu_finetune.yaml)

It prints the encoder images per batch, seconds per step and samples per second of each, and the ratio.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from CTReasonerLib.data.dataset import CuratedDataset  # noqa: E402
from CTReasonerLib.model.ctreasoner import CTReasonerModel  # noqa: E402
from CTReasonerLib.train.trainer import (GroupedDistributedSampler, SkippingDistributedSampler,  # noqa: E402
                                         slice_group_keys)


def run(model, dataset, sampler, batch_size: int, steps: int):
    order = sampler.epoch_indices()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    times, images = [], []
    for step in range(steps + 1):                       # step 0 warms up allocators and caches
        samples = [dataset[i] for i in order[step * batch_size:(step + 1) * batch_size]]
        started = time.perf_counter()
        batch = model.collate(samples)
        losses = model.training_step(batch)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - started)
            images.append(batch.images.shape[0])
    return statistics.median(times), statistics.mean(images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--model", default=str(REPO / "Resources" / "Models" / "CTReasoner-Tiny"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dataset = CuratedDataset(args.dataset, "train")
    base = CTReasonerModel.from_pretrained(args.model, device="cpu", dtype=torch.float32, trainable=True)
    settings = {
        "plain": (SkippingDistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0), None),
        "grouped": (GroupedDistributedSampler(dataset, slice_group_keys(dataset), 8, num_replicas=1, rank=0,
                                              shuffle=True, seed=0), 6),
    }
    results = {}
    for name, (sampler, crop_cap) in settings.items():
        model = copy.deepcopy(base).train()
        model.config.closer_look.train_crops_per_batch = crop_cap
        seconds, images = run(model, dataset, sampler, args.batch, args.steps)
        results[name] = seconds
        print(f"{name:8s} {images:5.1f} encoder images/batch  {seconds:6.2f} s/step  "
              f"{args.batch / seconds:5.2f} samples/s")
    print(f"grouped / plain throughput: {results['plain'] / results['grouped']:.2f}x "
          f"(batch {args.batch}, {args.threads} threads, median of {args.steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
