"""``ctreasoner convert IN OUT``: CT (NIfTI, NRRD or DICOM folder) to NIfTI or NRRD, geometry kept."""
from __future__ import annotations

import argparse

from ..io.readers import read_labelmap, read_volume
from ..io.writers import WRITABLE_SUFFIXES, write_labelmap, write_volume


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) or a DICOM series folder")
    parser.add_argument("output", metavar="OUT", help=f"output file ending in {', '.join(WRITABLE_SUFFIXES)}")
    parser.add_argument("--labelmap", action="store_true", help="the input is a label map: keep integer labels exactly")
    parser.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read from a DICOM folder holding several")


def run(args: argparse.Namespace) -> int:
    if args.labelmap:
        written = write_labelmap(read_labelmap(args.input, series_uid=args.series), args.output)
    else:
        volume = read_volume(args.input, series_uid=args.series)
        written = write_volume(volume, args.output)
    print(f"wrote {written}")
    return 0
