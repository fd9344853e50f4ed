"""DICOM series reading: header checks with pydicom, pixels with SimpleITK.

A folder may hold several series, and a series may have holes. Before any pixel is read, every header is
scanned (``stop_before_pixels``) and the chosen series must be one regular volume: one modality (CT), one
orientation, one pixel grid, slices evenly spaced along the slice normal with none missing or repeated.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .errors import CorruptFileError, InconsistentSeriesError, NotAVolumeError, NotCTError, UnsupportedFormatError
from .volume import Volume

# Tolerances for "the same" geometry across the slices of one series.
ORIENTATION_TOLERANCE = 1e-4     # direction cosines
PIXEL_SPACING_TOLERANCE = 1e-4   # mm
IN_PLANE_SHIFT_TOLERANCE = 1e-2  # mm a slice may sit off the slice-normal line (gantry tilt shows up here)
SPACING_RELATIVE_TOLERANCE = 0.1 # slice gaps may differ by 10% of the typical gap before the series is irregular


@dataclass
class DicomSliceHeader:
    """The header fields of one DICOM file that decide whether it belongs in a volume."""

    path: Path
    series_uid: str
    series_description: str
    modality: str
    rows: int
    columns: int
    number_of_frames: int
    position_lps: Optional[np.ndarray]       # (3,) ImagePositionPatient, mm
    orientation: Optional[np.ndarray]        # (6,) ImageOrientationPatient (row cosines, column cosines)
    pixel_spacing: Optional[np.ndarray]      # (2,) PixelSpacing (between rows, between columns), mm


def is_dicom_file(path: Path) -> bool:
    """True when the file carries the DICOM preamble magic (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _read_header(path: Path) -> Optional[DicomSliceHeader]:
    """The header of an image file, or None for files that are not DICOM images (DICOMDIR, reports, junk)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError):
        return None
    except Exception as exc:  # pydicom raises assorted errors on damaged headers
        raise CorruptFileError(f"{path}: the DICOM header cannot be read ({exc})",
                               "remove or replace the damaged file") from exc
    if "Rows" not in ds or "SeriesInstanceUID" not in ds:
        return None

    def floats(name: str) -> Optional[np.ndarray]:
        value = ds.get(name)
        return None if value is None else np.asarray([float(v) for v in value], dtype=np.float64)

    return DicomSliceHeader(
        path=path,
        series_uid=str(ds.SeriesInstanceUID),
        series_description=str(ds.get("SeriesDescription", "")),
        modality=str(ds.get("Modality", "")),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        number_of_frames=int(ds.get("NumberOfFrames", 1) or 1),
        position_lps=floats("ImagePositionPatient"),
        orientation=floats("ImageOrientationPatient"),
        pixel_spacing=floats("PixelSpacing"),
    )


def scan_dicom_folder(folder: Path) -> Dict[str, List[DicomSliceHeader]]:
    """Series UID -> the image headers of that series found directly in ``folder`` (not in sub-folders)."""
    series: Dict[str, List[DicomSliceHeader]] = defaultdict(list)
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        header = _read_header(path)
        if header is not None:
            series[header.series_uid].append(header)
    if not series:
        has_subfolders = any(p.is_dir() for p in folder.iterdir())
        raise UnsupportedFormatError(
            f"{folder}: no DICOM images in this folder",
            "point to the folder that directly holds the series' .dcm files" if has_subfolders else
            "give a folder of DICOM slices, or a .nii/.nii.gz/.nrrd file")
    return dict(series)


def _describe_series(series: Dict[str, List[DicomSliceHeader]]) -> str:
    parts = []
    for uid, headers in series.items():
        description = headers[0].series_description
        label = f" \"{description}\"" if description else ""
        parts.append(f"{uid} ({headers[0].modality or '?'}{label}, {len(headers)} files)")
    return "; ".join(parts)


def select_series(series: Dict[str, List[DicomSliceHeader]], folder: Path,
                  series_uid: Optional[str] = None) -> List[DicomSliceHeader]:
    """The headers of the requested series, or of the only series in the folder."""
    if series_uid is not None:
        if series_uid not in series:
            raise InconsistentSeriesError(
                f"{folder}: no series with SeriesInstanceUID {series_uid}; the folder holds: {_describe_series(series)}",
                "pass one of the listed UIDs with --series")
        return series[series_uid]
    if len(series) > 1:
        raise InconsistentSeriesError(
            f"{folder}: the folder mixes {len(series)} DICOM series: {_describe_series(series)}",
            "pick one with --series UID (Python: read_volume(path, series_uid=...)), "
            "or move each series into its own folder")
    return next(iter(series.values()))


def _check_same(values: List[np.ndarray], tolerance: float) -> bool:
    first = values[0]
    return all(v.shape == first.shape and np.allclose(v, first, atol=tolerance) for v in values[1:])


def check_series_geometry(headers: List[DicomSliceHeader], folder: Path) -> List[DicomSliceHeader]:
    """Validate one series as a regular volume and return its slices sorted along the slice normal.

    Raises NotCTError for a non-CT modality, UnsupportedFormatError for multi-frame files, NotAVolumeError for a
    single slice, and InconsistentSeriesError for mixed geometry, repeated positions or missing slices.
    """
    modalities = sorted({h.modality for h in headers})
    if modalities != ["CT"]:
        raise NotCTError(f"{folder}: DICOM modality is {'/'.join(m or 'missing' for m in modalities)}, not CT",
                         "CTReasoner reads CT only; choose a CT series")
    multi_frame = [h.path.name for h in headers if h.number_of_frames > 1]
    if multi_frame:
        # Frame geometry lives in per-frame functional groups that the series checks below do not cover.
        raise UnsupportedFormatError(f"{folder}: multi-frame (enhanced) DICOM ({multi_frame[0]}) is not supported",
                                     "convert the series to NRRD or NIfTI first (Slicer, dcm2niix or plastimatch)")
    if len(headers) == 1:
        raise NotAVolumeError(f"{folder}: the series has a single 2D slice ({headers[0].path.name}), not a volume",
                              "give the folder holding all slices of the series")
    missing = [h.path.name for h in headers if h.position_lps is None or h.orientation is None]
    if missing:
        raise InconsistentSeriesError(
            f"{folder}: {len(missing)} slice(s) lack ImagePositionPatient/ImageOrientationPatient (e.g. {missing[0]})",
            "the series cannot be stacked into a volume; export it again from the scanner or PACS")
    if not _check_same([h.orientation for h in headers], ORIENTATION_TOLERANCE):
        raise InconsistentSeriesError(f"{folder}: the slices have different orientations (ImageOrientationPatient)",
                                      "the folder mixes acquisitions; keep only the slices of one orientation")
    grids = {(h.rows, h.columns) for h in headers}
    spacings = [h.pixel_spacing for h in headers if h.pixel_spacing is not None]
    if len(grids) > 1 or len(spacings) != len(headers) or not _check_same(spacings, PIXEL_SPACING_TOLERANCE):
        raise InconsistentSeriesError(f"{folder}: the slices have different pixel grids or pixel sizes "
                                      f"(rows x columns: {sorted(grids)})",
                                      "the folder mixes acquisitions; keep only the slices of one reconstruction")

    row_cosines, column_cosines = headers[0].orientation[:3], headers[0].orientation[3:]
    normal = np.cross(row_cosines, column_cosines)
    ordered = sorted(headers, key=lambda h: float(h.position_lps @ normal))
    positions = np.stack([h.position_lps for h in ordered])
    along_normal = positions @ normal
    in_plane = positions - np.outer(along_normal, normal)
    if np.abs(in_plane - in_plane[0]).max() > IN_PLANE_SHIFT_TOLERANCE:
        raise InconsistentSeriesError(
            f"{folder}: the slice positions drift sideways along the stack (gantry tilt or a sheared series)",
            "load it in Slicer with DICOM 'Acquisition geometry regularization' on, then save it as NRRD")
    gaps = np.diff(along_normal)
    if gaps.min() < 1e-3:
        index = int(np.argmin(gaps))
        raise InconsistentSeriesError(
            f"{folder}: two slices share the same position ({ordered[index].path.name} and "
            f"{ordered[index + 1].path.name} at {along_normal[index]:.2f} mm)",
            "the folder holds repeated slices (several phases or reconstructions); keep one copy per position")
    typical = float(np.median(gaps))
    irregular = np.nonzero(np.abs(gaps - typical) > SPACING_RELATIVE_TOLERANCE * typical)[0]
    if irregular.size:
        index = int(irregular[0])
        gap = float(gaps[index])
        if gap > 1.5 * typical:
            missing_count = int(round(gap / typical)) - 1
            raise InconsistentSeriesError(
                f"{folder}: {max(missing_count, 1)} slice(s) missing between {ordered[index].path.name} and "
                f"{ordered[index + 1].path.name} (gap {gap:.2f} mm, slice spacing {typical:.2f} mm)",
                "copy the missing files into the folder, or export the complete series again")
        raise InconsistentSeriesError(
            f"{folder}: irregular slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm)",
            "resample the series to a regular spacing first")
    return ordered


def read_dicom_series(path: Path, series_uid: Optional[str] = None) -> Volume:
    """Read a DICOM series from its folder, or from any one of its files (which selects that file's series)."""
    import SimpleITK as sitk

    from .sitk_convert import itk_error_summary, volume_from_sitk

    folder = path if path.is_dir() else path.parent
    series = scan_dicom_folder(folder)
    if series_uid is None and path.is_file():
        header = _read_header(path)
        if header is None:
            raise UnsupportedFormatError(f"{path}: not a DICOM image", "give a DICOM slice or its series folder")
        series_uid = header.series_uid
    headers = check_series_geometry(select_series(series, folder, series_uid), folder)
    try:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(h.path) for h in headers])
        image = reader.Execute()
    except RuntimeError as exc:
        raise CorruptFileError(f"{folder}: the DICOM pixel data cannot be decoded ({itk_error_summary(exc)})",
                               "the files may be damaged or use an unsupported compression; "
                               "convert them with dcmdjpeg/gdcmconv or export the series again") from exc
    volume = volume_from_sitk(image, folder)
    volume.metadata.update({
        "format": "dicom",
        "modality": headers[0].modality,
        "series_uid": headers[0].series_uid,
        "series_description": headers[0].series_description,
        "num_files": str(len(headers)),
    })
    return volume

