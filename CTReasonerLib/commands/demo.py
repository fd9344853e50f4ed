"""``ctreasoner demo``: the main job on the embedded default, no data or Slicer needed.

A sample abdominal CT is generated (the procedural phantom with a fixed seed, written next to the outputs
so Slicer can open it with them), CTReasoner-Tiny answers "segment the liver and detect the adrenal glands"
and then "segment the pancreas" with a closer look on a few slices where those organs are, and the
Slicer-ready files are written. The phantom's own labels score the masks, so the summary shows how well
the bundled model does.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import List

import numpy as np

from .chat import add_model_arguments, model_id

SAMPLE_SEED = 7
SAMPLE_SHAPE = (256, 256, 48)        # (I, J, K): a modest CT, generated in about a second
SAMPLE_NAME = "ctreasoner_sample"
DEMO_TURNS = (("segment the liver and detect the adrenal glands", None), ("segment the pancreas", True))
DEMO_ORGANS = ("liver", "right_adrenal_gland", "left_adrenal_gland", "pancreas")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="ctreasoner_out/demo", metavar="DIR",
                        help="output folder (default ./ctreasoner_out/demo)")
    parser.add_argument("--num-slices", type=int, default=3, metavar="N", help="slices to chat on (default 3)")
    add_model_arguments(parser)


def informative_slices(labels: np.ndarray, count: int) -> List[int]:
    """Up to ``count`` slices showing the most of the demo's organs: first the slices with most of them
    present, among those the ones with the largest smallest organ (adrenals are small), spread apart."""
    from ..organs import get_organ

    areas = np.stack([(labels == get_organ(key).label).sum(axis=(1, 2)) for key in DEMO_ORGANS], axis=1)
    present = (areas > 0).sum(axis=1)
    smallest_present = np.where(areas > 0, areas, np.inf).min(axis=1)
    order = sorted(range(len(labels)), key=lambda k: (-present[k], -smallest_present[k]))
    chosen: List[int] = []
    for k in order:
        if present[k] and all(abs(k - c) > 1 for c in chosen):
            chosen.append(k)
        if len(chosen) == count:
            break
    return sorted(chosen)


def run(args: argparse.Namespace) -> int:
    from ..data.phantom import PhantomConfig, generate_phantom
    from ..errors import ConfigError
    from ..eval.metrics import SegmentationMetrics
    from ..headless.outputs import chat_to_files, human_summary
    from ..headless.volume_chat import ChatTurn, load_pipeline, resolve_model_dir
    from ..io.writers import write_volume
    from ..organs import get_organ

    if args.num_slices < 1:
        raise ConfigError("--num-slices must be at least 1")
    resolve_model_dir(args.model)         # no model: say so (and how to train it) before writing anything
    out = Path(args.out)
    started = time.perf_counter()
    ct, labels = generate_phantom(SAMPLE_SEED, PhantomConfig(shape=SAMPLE_SHAPE))
    ct.name = SAMPLE_NAME
    sample_path = write_volume(ct, out / f"{SAMPLE_NAME}.nrrd")
    ct.metadata["source"] = str(sample_path)
    generate_s = time.perf_counter() - started
    slices = informative_slices(labels.array, args.num_slices)
    load_started = time.perf_counter()
    pipeline = load_pipeline(args.model, args.device)
    load_s = time.perf_counter() - load_started
    turns = [ChatTurn(query, closer) for query, closer in DEMO_TURNS]
    run_ = chat_to_files(str(sample_path), pipeline, turns, ",".join(map(str, slices)), out, name=SAMPLE_NAME,
                         model_id=model_id(args.model), window=args.window, volume=ct,
                         timings_s={"generate_sample": generate_s, "load_model": load_s})
    run_.timings_s["total"] = round(time.perf_counter() - started, 3)

    print(f"sample CT: phantom seed {SAMPLE_SEED}, {' x '.join(map(str, SAMPLE_SHAPE))} voxels -> {sample_path}")
    print(human_summary(run_))
    metrics = SegmentationMetrics()
    spacing = (float(ct.spacing[1]), float(ct.spacing[0]))
    scores = []
    for k, chosen in run_.chat.slice_masks().items():
        for key, prediction in chosen.items():
            dice = metrics(prediction.mask, labels.array[k] == get_organ(key).label, spacing).dice
            scores.append(f"{get_organ(key).name} k={k} {dice:.2f}")
    print("Dice against the phantom's labels: " + ("; ".join(scores) or "no masks to score"))
    print(f"open in Slicer: {sample_path.name}, {run_.outputs.segmentation.name}, {run_.outputs.boxes.name} "
          f"(all in {out})")
    return 0
