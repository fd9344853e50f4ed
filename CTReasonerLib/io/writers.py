"""Write volumes and label maps as NIfTI or NRRD, keeping Slicer geometry.

NRRD stores the geometry as text with 17 significant digits, so it round-trips exactly and Slicer reads it
as written. NIfTI stores it in 32-bit floats: positions round-trip to about 1e-5 of their magnitude.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from .errors import OutputFileError, UnsupportedFormatError
from .sitk_convert import itk_error_summary, sitk_from_volume
from .volume import Volume

PathLike = Union[str, Path]

WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")


def write_volume(volume: Volume, path: PathLike, compress: bool = True) -> Path:
    """Write a volume's voxels (any numeric dtype) and geometry; returns the path written.

    ``compress`` gzips NRRD data (NIfTI compression follows the ``.gz`` extension).
    """
    path = _checked_output_path(path)
    array = volume.array
    if array.ndim != 3:
        raise ValueError(f"volume array must be 3D (K, J, I), got shape {array.shape}")
    if array.dtype == np.bool_:
        volume = volume.with_array(array.astype(np.uint8))
    return _write(volume, path, compress)


def write_labelmap(labelmap: Volume, path: PathLike, compress: bool = True) -> Path:
    """Write an integer label map (bool masks become uint8 0/1); floats are refused so labels stay exact."""
    array = labelmap.array
    if array.dtype == np.bool_:
        labelmap = labelmap.with_array(array.astype(np.uint8))
    elif not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"a label map needs integer voxels, got {array.dtype}; round and cast it first")
    return write_volume(labelmap, path, compress)


def _checked_output_path(path: PathLike) -> Path:
    path = Path(path)
    if not path.name.lower().endswith(WRITABLE_SUFFIXES):
        raise UnsupportedFormatError(f"{path}: cannot write '{''.join(path.suffixes) or path.name}' files",
                                     f"choose an output ending in {', '.join(WRITABLE_SUFFIXES)}")
    if path.is_dir():
        raise OutputFileError(f"{path}: is a folder", "give a file name for the output")
    return path


def _write(volume: Volume, path: Path, compress: bool) -> Path:
    import SimpleITK as sitk

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk_from_volume(volume), str(path), useCompression=compress)
    except OSError as exc:
        raise OutputFileError(f"{path}: cannot create the output folder ({exc.strerror})",
                              "choose a writable location") from exc
    except RuntimeError as exc:
        raise OutputFileError(f"{path}: writing failed ({itk_error_summary(exc)})",
                              "check free disk space and write permission; NIfTI also needs orthonormal directions") from exc
    return path
