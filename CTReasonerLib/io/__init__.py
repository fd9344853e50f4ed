"""CT input/output with Slicer-compatible geometry (SimpleITK and pydicom are imported only when used)."""
from .readers import read_labelmap, read_volume
from .slicer_files import roi_from_pixel_box, write_roi_markups, write_segmentation
from .slices import AxialSlice, axial_axis, extract_axial_slice, place_slice_mask, reorient_axial
from .volume import Volume
from .windowing import apply_window, get_window
from .writers import write_labelmap, write_volume

__all__ = ["Volume", "read_volume", "read_labelmap", "write_volume", "write_labelmap", "apply_window", "get_window",
           "AxialSlice", "axial_axis", "extract_axial_slice", "place_slice_mask", "reorient_axial",
           "write_segmentation", "write_roi_markups", "roi_from_pixel_box"]
