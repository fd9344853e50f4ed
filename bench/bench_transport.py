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


def interleaved(paths, calls: int):
    """Time every path once per round, round-robin, so load changes on a shared machine hit all alike."""
    times = {name: [] for name in paths}
    for function in paths.values():
        function()  # warm-up
    for _ in range(calls):
        for name, function in paths.items():
            started = time.perf_counter()
            function()
            times[name].append((time.perf_counter() - started) * 1000.0)
    return times


def summary(times):
    return statistics.median(times), float(np.percentile(times, 90))


def in_process_paths(model: str, pixels: np.ndarray, click: np.ndarray):
    """(description, {"decoder": f, "in-process": f}) on an in-process engine with a cached embedding."""
    import torch
    engine = Engine(model, device="cpu")
    engine.load()
    if engine.state != "ready":
        raise SystemExit(f"model failed to load: {engine.error}")
    engine.prepare_image(pixels)
    labels = np.array([1])
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

    def engine_refine():
        engine.refine(pixels, click, labels, None, None, "liver")

    return engine.describe(), {"decoder": decoder_only, "in-process": engine_refine}


def client_path(client: CTReasonerClient, pixels: np.ndarray, click: np.ndarray):
    client.connect()
    image_id = client.set_image(pixels)
    return lambda: client.refine(image_id, points=click.tolist(), labels=[1], organ="liver")


def start_http(model: str, token_file: str):
    """``ctreasoner serve --http`` on a free loopback port -> (process, url)."""
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
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    args = parser.parse_args()
    pixels = ct_slice(args.size)
    click = np.array([[args.size * 0.35, args.size * 0.4]])
    import torch
    torch.set_num_threads(args.threads)  # the servers get the same thread count through OMP_NUM_THREADS
    ENV["OMP_NUM_THREADS"] = ENV["MKL_NUM_THREADS"] = str(args.threads)

    description, paths = in_process_paths(args.model, pixels, click)
    stdio_client = CTReasonerClient.local(model=args.model, device="cpu", heartbeat_interval=0, env=ENV)
    with tempfile.TemporaryDirectory() as folder:
        token_file = os.path.join(folder, "token")
        Path(token_file).write_text(secrets.token_urlsafe(24))
        process, url = start_http(args.model, token_file)
        http_client = CTReasonerClient.http(url, token_file=token_file, heartbeat_interval=0)
        try:
            paths["stdio"] = client_path(stdio_client, pixels, click)
            paths["http"] = client_path(http_client, pixels, click)
            times = interleaved(paths, args.calls)
        finally:
            stdio_client.close()
            http_client.close()
            process.terminate()
            process.wait(timeout=30)
    decoder, direct, stdio, http = (times[name] for name in ("decoder", "in-process", "stdio", "http"))

    print(f"model: {description.get('model_id')} ({description.get('segmenter')}, {description.get('device')}), "
          f"slice {args.size}x{args.size}, {args.calls} interleaved calls per path after 1 warm-up, "
          f"{args.threads} torch thread(s) per process")
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
