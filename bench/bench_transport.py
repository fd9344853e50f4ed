"""Refinement round trip: one click on a cached embedding, over stdio and HTTP vs in-process.

    python bench/bench_transport.py [--model DIR|tiny-random] [--size 512] [--calls 30]

Prints per-call milliseconds (median and p90) for:
  decoder      the segmenter's prompt encoder + mask decoder alone, on cached features (in-process)
  in-process   Engine.refine (decoder + mapping the mask back to the slice), what the server runs per call
  stdio        CTReasonerClient.refine over a local stdio subprocess
  http         CTReasonerClient.refine over HTTP on 127.0.0.1 (bearer token)
and the transport overhead (transport - in-process) and ratio. Target: overhead <= 20 ms or ratio <= 1.3.
"""
from __future__ import annotations

import argparse
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from CTReasonerLib.client import CTReasonerClient  # noqa: E402
from CTReasonerLib.server.engine import DEFAULT_MODEL_DIR, TINY_RANDOM, Engine  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=str(REPO))


def ct_slice(size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size), -1000, np.int16)
    image[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2] = 40
    image[(yy - 0.4 * size) ** 2 + (xx - 0.35 * size) ** 2 < (0.15 * size) ** 2] = 120
    return image


def timed(function, calls: int):
    function()  # warm-up
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000.0)
    return times


def summary(times):
    return statistics.median(times), float(np.percentile(times, 90))


def in_process(model: str, pixels: np.ndarray, calls: int):
    import torch
    engine = Engine(model, device="cpu")
    engine.load()
    if engine.state != "ready":
        raise SystemExit(f"model failed to load: {engine.error}")
    engine.prepare_image(pixels)
    click = np.array([[pixels.shape[1] * 0.35, pixels.shape[0] * 0.4]])
    labels = np.array([1])
    refine = timed(lambda: engine.refine(pixels, click, labels, None, None, "liver"), calls)
    pipeline_model = engine.pipeline.model
    with torch.inference_mode():
        image, transform, _ = pipeline_model.slice_input(pixels)
        features = pipeline_model.segmenter.encode(image[None].to(pipeline_model.device))
    coords = torch.as_tensor(transform.to_model_coords(click), dtype=torch.float32)[None].to(pipeline_model.device)
    point_labels = torch.ones(1, 1, dtype=torch.long, device=pipeline_model.device)
    index = torch.zeros(1, dtype=torch.long, device=pipeline_model.device)

    def decoder_only():
        with torch.inference_mode():
            pipeline_model.segmenter.decode(features, None, index, points=(coords, point_labels))

    return engine.describe(), timed(decoder_only, calls), refine


def over_client(client: CTReasonerClient, pixels: np.ndarray, calls: int):
    client.connect()
    image_id = client.set_image(pixels)
    click = [[pixels.shape[1] * 0.35, pixels.shape[0] * 0.4]]
    return timed(lambda: client.refine(image_id, points=click, labels=[1], organ="liver"), calls)


def start_http(model: str, token_file: str):
    command = [sys.executable, "-m", "CTReasonerLib.cli", "serve", "--http", "--port", "0", "--model", model,
               "--device", "cpu", "--token-file", token_file]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                               start_new_session=True)
    found = {}
    ready = threading.Event()

    def read():
        for raw in iter(process.stderr.readline, b""):
            match = re.search(rb"listening on (http://\S+) ", raw)
            if match:
                found["url"] = match.group(1).decode()
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(300) or "url" not in found:
        process.kill()
        raise SystemExit("the HTTP server did not start")
    return process, found["url"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_DIR if os.path.isdir(DEFAULT_MODEL_DIR) else TINY_RANDOM)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    pixels = ct_slice(args.size)

    description, decoder, direct = in_process(args.model, pixels, args.calls)
    stdio_client = CTReasonerClient.local(model=args.model, device="cpu", heartbeat_interval=0, env=ENV)
    try:
        stdio = over_client(stdio_client, pixels, args.calls)
    finally:
        stdio_client.close()
    with tempfile.TemporaryDirectory() as folder:
        token_file = os.path.join(folder, "token")
        Path(token_file).write_text(secrets.token_urlsafe(24))
        process, url = start_http(args.model, token_file)
        http_client = CTReasonerClient.http(url, token_file=token_file, heartbeat_interval=0)
        try:
            http = over_client(http_client, pixels, args.calls)
        finally:
            http_client.close()
            process.terminate()
            process.wait(timeout=30)

    print(f"model: {description.get('model_id')} ({description.get('segmenter')}, {description.get('device')}), "
          f"slice {args.size}x{args.size}, {args.calls} calls after 1 warm-up")
    print(f"{'path':<12} {'median ms':>10} {'p90 ms':>8} {'overhead ms':>12} {'ratio':>6}")
    base = summary(direct)[0]
    for name, times in (("decoder", decoder), ("in-process", direct), ("stdio", stdio), ("http", http)):
        median, p90 = summary(times)
        extra = f"{median - base:12.2f} {median / base:6.2f}" if name in ("stdio", "http") else ""
        print(f"{name:<12} {median:10.2f} {p90:8.2f} {extra}")
    for name, times in (("stdio", stdio), ("http", http)):
        median = summary(times)[0]
        ok = median - base <= 20.0 or median / base <= 1.3
        print(f"{name}: target (overhead <= 20 ms or ratio <= 1.3) {'MET' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
