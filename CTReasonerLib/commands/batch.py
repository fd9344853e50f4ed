"""``ctreasoner batch INPUTS --query "..." --out DIR``: one conversation on each of many volumes.

Resumable (finished volumes are skipped), a failing volume is logged and the others go on, and under
``torchrun --nproc_per_node N -m CTReasonerLib.cli batch ...`` the volumes are shared across the N ranks.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .chat import add_model_arguments, add_slice_arguments, model_id, slice_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", metavar="INPUTS", help="a folder of CT files / DICOM series folders, or a manifest "
                        "(.txt one path per line, .csv with a 'path' column, .json list)")
    parser.add_argument("--query", action="append", required=True, metavar="TEXT",
                        help="the query; repeat for follow-up turns on the same slices")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: DIR/<name>/ per volume, "
                        "DIR/summary.csv, DIR/summary.md, DIR/failures.log")
    parser.add_argument("--pattern", default="*", help="file pattern inside an INPUTS folder, e.g. '*_ct.nii.gz' "
                        "(default: every CT file and sub-folder)")
    add_slice_arguments(parser)
    parser.add_argument("--closer", action="store_true", help="force a closer look on every turn")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..headless.batch import BatchRequest, read_inputs, run_batch
    from ..headless.volume_chat import ChatTurn, check_turns, load_pipeline, resolve_model_dir
    from ..io.windowing import get_window

    get_window(args.window)
    turns = check_turns([ChatTurn(query, True if args.closer else None) for query in args.query])
    resolve_model_dir(args.model)          # a missing model is one error, not one per volume
    items = read_inputs(args.inputs, args.pattern)
    request = BatchRequest(turns=turns, slices=slice_spec(args), model_id=model_id(args.model), window=args.window)
    outcome = run_batch(items, lambda: load_pipeline(args.model, args.device), request, Path(args.out),
                        progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"{len(outcome.records)} volume(s): {outcome.count('done')} done, {outcome.count('skipped')} skipped "
          f"(finished earlier), {outcome.count('failed')} failed")
    print(f"summary: {outcome.summary_csv}  {outcome.summary_md}")
    if outcome.count("failed"):
        print(f"failures: {Path(args.out) / 'failures.log'}")
    return 1 if outcome.count("failed") else 0
