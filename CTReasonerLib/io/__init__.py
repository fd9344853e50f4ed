"""CT input/output with Slicer-compatible geometry (SimpleITK and pydicom are imported only when used)."""
from .readers import read_labelmap, read_volume
from .slices import AxialSlice, axial_axis, extract_axial_slice, place_slice_mask, reorient_axial
from .volume import Volume
from .windowing import apply_window, get_window
from .writers import write_labelmap, write_volume

__all__ = ["Volume", "read_volume", "read_labelmap", "write_volume", "write_labelmap", "apply_window", "get_window",
           "AxialSlice", "axial_axis", "extract_axial_slice", "place_slice_mask", "reorient_axial"]
