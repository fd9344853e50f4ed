"""``ctreasoner info FILE``: geometry and intensity summary of a CT (or, with --labelmap, a label map)."""
from __future__ import annotations

import argparse

import numpy as np

from ..io.readers import read_labelmap, read_volume
from ..io.slices import AXIS_NAMES, axial_axis
from ..io.volume import Volume


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="FILE", help="NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) or a DICOM series folder")
    parser.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read from a DICOM folder holding several")
    parser.add_argument("--labelmap", action="store_true", help="read as a label map and list its label values")


def axis_codes(volume: Volume) -> str:
    """Anatomical direction of each voxel axis, e.g. "LPS" when I runs to the left, J posterior, K superior."""
    letters = (("L", "R"), ("P", "A"), ("I", "S"))
    codes = []
    for column in volume.directions.T:
        axis = int(np.argmax(np.abs(column)))
        codes.append(letters[axis][int(column[axis] > 0)])
    return "".join(codes)


def describe(volume: Volume, labelmap: bool = False) -> str:
    i, j, k = volume.shape_ijk
    array = volume.array
    axis = axial_axis(volume)
    lines = [f"file:          {volume.metadata.get('source', volume.name)}",
             f"format:        {volume.metadata.get('format', '?')}"]
    for key in ("modality", "series_uid", "series_description"):
        if volume.metadata.get(key):
            lines.append(f"{key + ':':<15}{volume.metadata[key]}")
    lines += [
        f"size (I J K):  {i} x {j} x {k} voxels, {array.dtype}",
        f"spacing:       {' x '.join(f'{s:.4g}' for s in volume.spacing)} mm",
        f"origin (RAS):  ({', '.join(f'{v:.3f}' for v in volume.origin)}) mm",
        f"orientation:   {axis_codes(volume)} (I, J, K directions in RAS, one column per axis):",
    ]
    lines += ["               [" + "  ".join(f"{v:+.4f}" for v in row) + "]" for row in volume.directions]
    lines.append(f"axial axis:    {AXIS_NAMES[axis]}" + ("" if axis == 2 else " (not K: slices are not axial; "
                                                           "reorient with CTReasonerLib.io.slices.reorient_axial)"))
    if labelmap:
        values, counts = np.unique(array, return_counts=True)
        lines.append("labels:        " + ", ".join(f"{v}: {c} voxels" for v, c in zip(values.tolist(), counts.tolist())))
    else:
        p1, p99 = np.percentile(array[:: max(1, array.shape[0] // 16)], [1, 99])
        lines.append(f"HU range:      {array.min():g} .. {array.max():g} (1st-99th percentile {p1:g} .. {p99:g})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    reader = read_labelmap if args.labelmap else read_volume
    print(describe(reader(args.path, series_uid=args.series), labelmap=args.labelmap))
    return 0
