"""Repeat query: the second query on the same slice (image embedding cached) vs the first (cache miss).

    python bench/bench_repeat_query.py [--model DIR|tiny-random] [--size 512] [--slices 8] [--query "..."]

For each of ``--slices`` different slices, over a local stdio backend (what Slicer uses):
  first    set_image (encodes the slice) + chat with --query
  repeat   the same question again on the same image id (embedding cached; greedy decoding is
           deterministic, so the engine answers the identical turn from its result cache)
  other    a different question (--other-query) on the same image id (embedding cached, the LVLM runs)
Prints per-slice times, the medians and the ratios first/repeat and first/other.
Target: first/repeat >= 5 with the tiny model.
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
    parser.add_argument("--other-query", default="segment the spleen")
    args = parser.parse_args()

    client = CTReasonerClient.local(model=args.model, device="cpu", heartbeat_interval=0, env=ENV)
    firsts, repeats, others = [], [], []

    def timed(function):
        started = time.perf_counter()
        value = function()
        return value, (time.perf_counter() - started) * 1000.0

    try:
        info = client.connect()
        warm = client.set_image(ct_slice(args.size, 10_000))
        client.chat(warm, args.query)  # warm-up (lazy initialisation, allocator)
        for index in range(args.slices):
            pixels = ct_slice(args.size, index)
            image_id, first = timed(lambda: client.set_image(pixels))
            _, chat = timed(lambda: client.chat(image_id, args.query))
            firsts.append(first + chat)
            repeats.append(timed(lambda: client.chat(image_id, args.query))[1])
            others.append(timed(lambda: client.chat(image_id, args.other_query))[1])
            print(f"slice {index}: first {firsts[-1]:8.1f} ms   repeat {repeats[-1]:8.1f} ms   "
                  f"other question {others[-1]:8.1f} ms")
    finally:
        client.close()
    first, repeat, other = (statistics.median(v) for v in (firsts, repeats, others))
    model = info.get("model", {})
    print(f"model: {model.get('model_id')} ({model.get('segmenter')}, {model.get('device')}), "
          f"slice {args.size}x{args.size}, query {args.query!r}, other {args.other_query!r}")
    print(f"median first {first:.1f} ms, repeat {repeat:.1f} ms (ratio {first / repeat:.1f}, target >= 5: "
          f"{'MET' if first / repeat >= 5 else 'MISSED'}), other question {other:.1f} ms (ratio {first / other:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
