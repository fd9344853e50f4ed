"""``ctreasoner review DIR``: Markdown report of flagged and rejected descriptions in a curated dataset.

With ``--recheck`` the stored descriptions (for instance after hand edits of the JSONL records) are first
re-reviewed against the stored masks and the records' states updated.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DIR", help="dataset folder written by ctreasoner curate")
    parser.add_argument("--recheck", action="store_true", help="re-review every description and update the records")
    parser.add_argument("--quiet", action="store_true", help="write DIR/review_report.md without printing it")


def run(args) -> int:
    from ..data.curate.report import recheck_dataset, write_review_report
    from ..data.dataset import load_dataset_info

    load_dataset_info(args.dataset)
    if args.recheck:
        changes = recheck_dataset(args.dataset)
        print("recheck: " + (", ".join(f"{k} {v}" for k, v in sorted(changes.items())) or "no state changed"))
    path = write_review_report(args.dataset)
    if not args.quiet:
        print(path.read_text(encoding="utf-8"))
    print(f"report written to {path}")
    return 0
