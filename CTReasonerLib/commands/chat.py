"""``ctreasoner chat VOLUME QUERY``: one conversation on a CT volume's axial slices -> Slicer-ready files."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..errors import ConfigError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by chat, batch and demo."""
    parser.add_argument("--model", metavar="DIR", help="model folder (default: the bundled "
                        "Resources/Models/CTReasoner-Tiny)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: CUDA if present)")
    parser.add_argument("--window", default="abdomen", help="display window of the overlay PNG: abdomen, liver, "
                        "lung, bone, soft_tissue (the model windows the HU itself)")


def add_slice_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--slice", type=int, metavar="K", help="one axial slice, 0-based IJK K")
    group.add_argument("--slices", metavar="SPEC", help="A:B (A..B-1), A:B:STEP, K1,K2,... or all "
                       "(default when neither is given: the middle axial slice)")


def slice_spec(args: argparse.Namespace):
    return str(args.slice) if args.slice is not None else args.slices


def model_id(model_dir) -> str:
    return os.path.basename(os.path.normpath(model_dir)) if model_dir else "CTReasoner-Tiny"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("volume", metavar="VOLUME", help="CT as .nii/.nii.gz, .nrrd/.nhdr or a DICOM series folder")
    parser.add_argument("query", metavar="QUERY", help='e.g. "segment the liver and detect the adrenal glands"')
    parser.add_argument("--then", action="append", default=[], metavar="QUERY",
                        help="a follow-up turn on the same slices, with the earlier turns as history (repeatable)")
    add_slice_arguments(parser)
    parser.add_argument("--closer", action="store_true", help="force a closer look (zoomed second pass) on every "
                        "turn; by default the model decides with its [CLOSER] token")
    parser.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read from a DICOM folder holding several")
    parser.add_argument("--out", metavar="DIR", help="output folder (default ./ctreasoner_out/<name>/)")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..headless.outputs import chat_to_files, human_summary, output_name
    from ..headless.volume_chat import ChatTurn, check_turns, load_pipeline, parse_slices, read_axial_volume
    from ..io.windowing import get_window

    get_window(args.window)
    closer = True if args.closer else None
    turns = check_turns([ChatTurn(q, closer) for q in [args.query, *args.then]])
    started = time.perf_counter()
    volume = read_axial_volume(args.volume, args.series)
    read_s = time.perf_counter() - started
    spec = slice_spec(args)
    parse_slices(spec, volume.array.shape[0])       # refuse a bad selection before paying for the model
    name = output_name(args.volume)
    folder = Path(args.out) if args.out else Path("ctreasoner_out") / name
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file", "give a folder")
    load_started = time.perf_counter()
    pipeline = load_pipeline(args.model, args.device)
    load_s = time.perf_counter() - load_started
    run_ = chat_to_files(args.volume, pipeline, turns, spec, folder, name=name, model_id=model_id(args.model),
                         window=args.window, volume=volume, timings_s={"read_volume": read_s, "load_model": load_s})
    run_.timings_s["total"] = round(time.perf_counter() - started, 3)
    print(human_summary(run_))
    return 0
