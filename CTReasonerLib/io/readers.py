"""Read CT volumes and label maps from NIfTI, NRRD or a DICOM series into a RAS ``Volume``.

Supported inputs: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, a DICOM series folder, or one file of a series
(``.dcm``/``.ima`` or any file with the DICOM preamble), which stands for its folder and selects its series.

Every failure a user can cause raises a ``CTReasonerError`` (see ``io/errors.py``) naming the file and the problem.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .dicom import is_dicom_file, read_dicom_series
from .errors import CorruptFileError, CTFileNotFoundError, NotAVolumeError, NotCTError, UnsupportedFormatError
from .sitk_convert import itk_error_summary, volume_from_sitk
from .volume import Volume

PathLike = Union[str, Path]

IMAGE_FILE_SUFFIXES = {".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd"}
DICOM_FILE_SUFFIXES = (".dcm", ".ima")
SUPPORTED_INPUTS = ".nii, .nii.gz, .nrrd, .nhdr, or a DICOM series folder"

# CT plausibility: a sample of this many voxels is enough to recognise masks and normalised images.
_PLAUSIBILITY_SAMPLE = 1_000_000
_MAX_LABEL_LIKE_VALUES = 64


def detect_format(path: PathLike) -> str:
    """``"nifti"``, ``"nrrd"`` or ``"dicom"`` for an existing path; raises otherwise."""
    path = Path(path)
    if not path.exists():
        raise CTFileNotFoundError(f"{path}: no such file or folder", "check the path and its spelling")
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    for suffix, kind in IMAGE_FILE_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    if name.endswith(DICOM_FILE_SUFFIXES) or is_dicom_file(path):
        return "dicom"
    raise UnsupportedFormatError(f"{path}: unsupported file type '{''.join(path.suffixes) or path.name}'",
                                 f"give a CT as {SUPPORTED_INPUTS}")


def read_volume(path: PathLike, series_uid: Optional[str] = None, check_ct: bool = True) -> Volume:
    """Read a CT volume with Slicer geometry (array (K, J, I), spacing IJK, origin/directions RAS).

    ``series_uid`` picks one series of a DICOM folder holding several. With ``check_ct`` (the default) images
    that are evidently not CT in Hounsfield units are refused: DICOM modality other than CT, RGB/vector
    voxels, 8-bit or boolean voxels, intensities normalised to [0, 1], or a handful of small non-negative
    integers (a label map). An MR volume stored as NIfTI/NRRD cannot be told apart by its numbers and passes.
    """
    path = Path(path)
    volume = _read(path, series_uid)
    if check_ct:
        check_hounsfield(volume.array, path)
    return volume


def read_labelmap(path: PathLike, series_uid: Optional[str] = None) -> Volume:
    """Read a label map on its grid. Integer voxel types are kept; integral floats become the smallest int type."""
    path = Path(path)
    volume = _read(path, series_uid)
    array = volume.array
    if not np.issubdtype(array.dtype, np.integer):
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        elif not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise NotAVolumeError(f"{path}: voxel values are not whole numbers, so this is not a label map",
                                  "give the label map (integer organ labels), not the CT image")
        else:
            smallest = np.promote_types(np.min_scalar_type(int(array.min())), np.min_scalar_type(int(array.max())))
            array = array.astype(smallest)
        volume.array = array
    volume.metadata["kind"] = "labelmap"
    return volume


def _read(path: Path, series_uid: Optional[str]) -> Volume:
    kind = detect_format(path)
    if kind == "dicom":
        return read_dicom_series(path, series_uid)
    import SimpleITK as sitk

    if path.name.lower().endswith(".gz"):
        verify_gzip_stream(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CorruptFileError(f"{path}: the file cannot be decoded ({itk_error_summary(exc)})",
                               "the file is damaged or truncated; copy or export it again") from exc
    check_volume_shape(image, path)
    volume = volume_from_sitk(image, path)
    volume.metadata["format"] = kind
    return volume


def verify_gzip_stream(path: Path, chunk_size: int = 1 << 20) -> None:
    """Decompress a gzip file to its end, raising CorruptFileError if it is truncated or damaged.

    ITK reads a truncated ``.nii.gz`` without complaint and fills the rest with garbage, so the stream is checked first.
    """
    decompressor = zlib.decompressobj(wbits=31)
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_size):
                decompressor.decompress(chunk, 0)
                # A gzip file may hold several members; start a new one after each end-of-stream marker.
                while decompressor.eof and decompressor.unused_data:
                    rest = decompressor.unused_data
                    decompressor = zlib.decompressobj(wbits=31)
                    decompressor.decompress(rest, 0)
    except zlib.error as exc:
        raise CorruptFileError(f"{path}: the gzip compression is damaged ({exc})",
                               "the file is corrupt; copy or export it again") from exc
    if not decompressor.eof:
        raise CorruptFileError(f"{path}: the gzip stream ends early (the file is truncated)",
                               "the copy or download was interrupted; copy or export the file again")


def check_volume_shape(image, path: Path) -> None:
    """Refuse 2D images, single slices, 4D series and multi-component (RGB/vector) voxels."""
    size = tuple(image.GetSize())
    components = image.GetNumberOfComponentsPerPixel()
    if path.name.lower().endswith(".seg.nrrd") and (components > 1 or image.GetDimension() > 3):
        raise NotAVolumeError(f"{path}: a segmentation with overlapping segments (several layers), not one label map",
                              "read it with slicerio (slicerio.read_segmentation), or export a label map from Slicer")
    if components > 1:
        raise NotCTError(f"{path}: voxels have {components} components (an RGB or vector image), not single grey values",
                         "give a grey-scale CT volume in Hounsfield units, or an integer label map")
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and min(size) == 1):
        raise NotAVolumeError(f"{path}: a 2D image ({' x '.join(map(str, size))}) where a 3D volume was expected",
                              "give the whole CT volume (or the folder with all DICOM slices)")
    if image.GetDimension() != 3:
        raise NotAVolumeError(f"{path}: a {image.GetDimension()}D image ({' x '.join(map(str, size))}); "
                              "a 3D volume was expected",
                              "extract one 3D frame first (e.g. in Slicer, or with SimpleITK's Extract)")


def check_hounsfield(array: np.ndarray, path: PathLike) -> None:
    """Raise NotCTError when the intensities evidently are not Hounsfield units (see ``read_volume``)."""
    if array.dtype in (np.bool_, np.uint8, np.int8):
        raise NotCTError(f"{path}: 8-bit voxels cannot hold Hounsfield units (-1000 air .. +1000 bone); "
                         "this looks like a photo, mask or label map",
                         "give the original CT; for a label map use read_labelmap or --labelmap")
    flat = array.reshape(-1)
    sample = flat[:: max(1, flat.size // _PLAUSIBILITY_SAMPLE)]
    low, high = float(sample.min()), float(sample.max())
    if not np.isfinite(low) or not np.isfinite(high):
        raise NotCTError(f"{path}: voxels contain NaN or infinite values", "give a CT with finite intensities")
    if low == high:
        raise NotCTError(f"{path}: every voxel is {low:g}; the image is empty", "give a CT with image content")
    if low >= 0.0 and high <= 1.0:
        raise NotCTError(f"{path}: intensities lie in [0, 1]; they are normalised, not Hounsfield units",
                         "give the original CT in Hounsfield units")
    if low >= 0 and high <= 255 and np.unique(sample).size <= _MAX_LABEL_LIKE_VALUES:
        raise NotCTError(f"{path}: only {np.unique(sample).size} distinct small values ({low:g}..{high:g}); "
                         "this is a label map or mask, not a CT",
                         "give the CT image; for a label map use read_labelmap or --labelmap")
