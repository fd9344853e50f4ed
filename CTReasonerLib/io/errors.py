"""Errors of the CT data layer. Each names the file and the problem; its hint says what to do."""
from __future__ import annotations

from ..errors import CTReasonerError, InputFileError


class CTFileNotFoundError(InputFileError):
    """The path does not exist."""


class UnsupportedFormatError(InputFileError):
    """The file's extension (or content) is not one the data layer reads or writes."""


class NotCTError(InputFileError):
    """The image is readable but is not a CT in Hounsfield units (MR, RGB photo, mask, normalised image)."""


class NotAVolumeError(InputFileError):
    """A 2D image (or a single slice) where a 3D volume was expected, or a 4D image."""


class CorruptFileError(InputFileError):
    """The file cannot be decoded: truncated or damaged compression, bad header."""


class InconsistentSeriesError(InputFileError):
    """A DICOM folder whose slices do not form one regular volume (mixed series, gaps, mixed geometry)."""


class OutputFileError(CTReasonerError):
    """A file that cannot be written."""
