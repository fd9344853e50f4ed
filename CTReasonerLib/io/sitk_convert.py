"""SimpleITK image <-> Volume, converting ITK's LPS physical space to Slicer's RAS.

ITK (and therefore NIfTI read through ITK, NRRD and DICOM) describes geometry in LPS; Slicer and ``Volume`` use
RAS. The two differ by negating the first two physical axes, so origin[0:2] and the first two rows of the
direction matrix change sign; spacing and the voxel order are untouched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from .volume import LPS_TO_RAS, Volume


def volume_from_sitk(image, source: Union[str, Path]) -> Volume:
    """Wrap a 3D single-component ``SimpleITK.Image`` as a Volume (array (K, J, I), RAS geometry)."""
    import SimpleITK as sitk

    directions_lps = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin_lps = np.asarray(image.GetOrigin(), dtype=np.float64)
    return Volume(
        array=sitk.GetArrayFromImage(image),
        spacing=np.asarray(image.GetSpacing(), dtype=np.float64),
        origin=LPS_TO_RAS @ origin_lps,
        directions=LPS_TO_RAS @ directions_lps,
        name=volume_name(source),
        metadata={"source": str(source)},
    )


def sitk_from_volume(volume: Volume):
    """The ``SimpleITK.Image`` (LPS geometry) holding a Volume's voxels."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array), isVector=False)
    image.SetSpacing([float(v) for v in volume.spacing])
    image.SetOrigin([float(v) for v in LPS_TO_RAS @ volume.origin])
    image.SetDirection([float(v) for v in (LPS_TO_RAS @ volume.directions).ravel()])
    return image


def volume_name(path: Union[str, Path]) -> str:
    """The file or folder name without its image extensions (``ct.nii.gz`` -> ``ct``)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".nhdr", ".dcm", ".ima"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def itk_error_summary(exc: Exception) -> str:
    """The last meaningful line of an ITK exception (the rest is C++ source locations)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
