"""Repeat query: the second query on the same slice (image embedding cached) vs the first (cache miss).

    python bench/bench_repeat_query.py [--model DIR|tiny-random] [--size 512] [--slices 8] [--query "..."]

For each of ``--slices`` different slices, over a local stdio backend (what Slicer uses):
  first   set_image (encodes the slice) + chat
  second  the same chat again on the same image id
Prints per-slice times, the medians and their ratio. Target: ratio >= 5 with the tiny model.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from CTReasonerLib.client import CTReasonerClient  # noqa: E402
from CTReasonerLib.server.engine import DEFAULT_MODEL_DIR, TINY_RANDOM  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=str(REPO))


def ct_slice(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size), -1000, np.int16)
    image[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2] = 40
    cy, cx, r = rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6), rng.uniform(0.08, 0.16)
    image[(yy - cy * size) ** 2 + (xx - cx * size) ** 2 < (r * size) ** 2] = 120
    return (image + rng.integers(-15, 15, image.shape)).astype(np.int16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_DIR if os.path.isdir(DEFAULT_MODEL_DIR) else TINY_RANDOM)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--query", default="segment the liver")
    args = parser.parse_args()

    client = CTReasonerClient.local(model=args.model, device="cpu", heartbeat_interval=0, env=ENV)
    firsts, seconds = [], []
    try:
        info = client.connect()
        warm = client.set_image(ct_slice(args.size, 10_000))
        client.chat(warm, args.query)  # warm-up (lazy initialisation, allocator)
        for index in range(args.slices):
            pixels = ct_slice(args.size, index)
            started = time.perf_counter()
            image_id = client.set_image(pixels)
            client.chat(image_id, args.query)
            firsts.append((time.perf_counter() - started) * 1000.0)
            started = time.perf_counter()
            client.chat(image_id, args.query)
            seconds.append((time.perf_counter() - started) * 1000.0)
            print(f"slice {index}: first {firsts[-1]:8.1f} ms   second {seconds[-1]:8.1f} ms")
    finally:
        client.close()
    first, second = statistics.median(firsts), statistics.median(seconds)
    model = info.get("model", {})
    print(f"model: {model.get('model_id')} ({model.get('segmenter')}, {model.get('device')}), "
          f"slice {args.size}x{args.size}, query {args.query!r}")
    print(f"median first {first:.1f} ms, median second {second:.1f} ms, ratio {first / second:.2f} "
          f"(target >= 5: {'MET' if first / second >= 5 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
