"""CT data layer: readers, writers, DICOM series checks, windowing, axial slices and the info/convert commands."""
from __future__ import annotations

import copy
import gzip
from pathlib import Path

import numpy as np
import pytest

from CTReasonerLib.cli import main as cli_main
from CTReasonerLib.errors import ConfigError
from CTReasonerLib.io.errors import (CorruptFileError, CTFileNotFoundError, InconsistentSeriesError, NotAVolumeError,
                                     NotCTError, UnsupportedFormatError)
from CTReasonerLib.io.readers import read_labelmap, read_volume
from CTReasonerLib.io.slices import (axial_axis, extract_axial_slice, neighbour_offset, neighbour_slices, place_slice_mask,
                                     reorient_axial)
from CTReasonerLib.io.volume import Volume, ijk_to_ras_points, ras_to_ijk_points
from CTReasonerLib.io.windowing import WINDOW_PRESETS, apply_window, get_window
from CTReasonerLib.io.writers import write_labelmap, write_volume

sitk = pytest.importorskip("SimpleITK")
pydicom = pytest.importorskip("pydicom")

CT_CHEST = Path(pytest.importorskip("slicerio").__file__).parent / "data" / "CTChest4.nrrd"


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    a, b = [n for n in range(3) if n != axis]
    m = np.eye(3)
    m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
    return m


def _oblique_volume(seed: int = 0, dtype=np.int16) -> Volume:
    """A small noisy volume on an oblique, LPS-flipped grid (rotation about two axes, then I and J negated)."""
    rng = np.random.default_rng(seed)
    directions = _rotation(2, 25.0) @ _rotation(0, 10.0) @ np.diag([-1.0, -1.0, 1.0])
    array = rng.integers(-1024, 1500, size=(7, 12, 16)).astype(dtype)
    return Volume(array=array, spacing=(0.73, 0.81, 3.0), origin=(-112.2513, 87.5071, -301.1259), directions=directions)


# ----------------------------------------------------------------------------------------------- real CT, geometry

def test_real_chest_ct_is_read_in_ras():
    volume = read_volume(CT_CHEST)
    # The file is LPS with negative x/y spacing signs: in RAS the axes are the identity and x/y of the origin flip.
    assert volume.array.shape == (34, 128, 128)
    np.testing.assert_allclose(volume.directions, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(volume.spacing, (3.04687595367432, 3.04687595367432, 10.0), atol=1e-9)
    np.testing.assert_allclose(volume.origin, (-193.09599304199222, -216.39599609374994, -340.25), atol=1e-9)
    assert (volume.array.min(), volume.array.max()) == (-3024, 3070)
    assert volume.metadata["format"] == "nrrd" and volume.metadata["source"].endswith("CTChest4.nrrd")
    assert axial_axis(volume) == 2


# NRRD keeps geometry as 17-digit text (exact); NIfTI-1 keeps it as float32 (about 1e-7 relative, so ~1e-5 mm here).
@pytest.mark.parametrize("suffix, tolerance", [(".nrrd", 1e-9), (".nhdr", 1e-9), (".nii.gz", 1e-4), (".nii", 1e-4)])
def test_volume_round_trip_keeps_geometry_and_voxels(tmp_path, suffix, tolerance):
    volume = _oblique_volume()
    read_back = read_volume(write_volume(volume, tmp_path / "sub" / f"ct{suffix}"))
    np.testing.assert_allclose(read_back.ijk_to_ras, volume.ijk_to_ras, rtol=0, atol=tolerance)
    assert read_back.array.dtype == volume.array.dtype
    assert np.array_equal(read_back.array, volume.array)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16])
def test_labelmap_round_trip_keeps_integer_type(tmp_path, dtype):
    reference = _oblique_volume()
    labels = np.random.default_rng(1).integers(0, 15, size=reference.array.shape).astype(dtype)
    for suffix in (".nrrd", ".nii.gz"):
        read_back = read_labelmap(write_labelmap(reference.with_array(labels), tmp_path / f"labels{suffix}"))
        assert read_back.array.dtype == dtype and np.array_equal(read_back.array, labels)
        np.testing.assert_allclose(read_back.ijk_to_ras, reference.ijk_to_ras, atol=1e-4)


def test_labelmap_stored_as_float_becomes_integer_and_real_floats_are_refused(tmp_path):
    reference = _oblique_volume()
    labels = np.random.default_rng(2).integers(0, 15, size=reference.array.shape)
    path = write_volume(reference.with_array(labels.astype(np.float32)), tmp_path / "float_labels.nii.gz")
    read_back = read_labelmap(path)
    assert np.issubdtype(read_back.array.dtype, np.integer) and np.array_equal(read_back.array, labels)
    write_volume(reference.with_array(labels + np.float32(0.5)), tmp_path / "not_labels.nii.gz")
    with pytest.raises(NotAVolumeError, match="not whole numbers"):
        read_labelmap(tmp_path / "not_labels.nii.gz")
    with pytest.raises(ValueError, match="integer"):
        write_labelmap(reference.with_array(labels.astype(np.float32)), tmp_path / "x.nrrd")


def test_written_nrrd_is_loaded_by_slicer_with_the_same_geometry(tmp_path):
    slicer = pytest.importorskip("slicer")
    volume = _oblique_volume()
    path = write_volume(volume, tmp_path / "ct.nrrd")
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    matrix = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    np.testing.assert_allclose(ijk_to_ras, volume.ijk_to_ras, atol=1e-6)
    from vtk.util import numpy_support
    voxels = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(volume.array.shape)
    assert np.array_equal(voxels, volume.array)


# ------------------------------------------------------------------------------------------------ bad files

def test_missing_file_and_unsupported_extension(tmp_path):
    with pytest.raises(CTFileNotFoundError) as missing:
        read_volume(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in missing.value.message and missing.value.hint
    (tmp_path / "photo.png").write_bytes(b"\x89PNG....")
    with pytest.raises(UnsupportedFormatError, match="photo.png") as unsupported:
        read_volume(tmp_path / "photo.png")
    assert ".nii.gz" in unsupported.value.hint
    with pytest.raises(UnsupportedFormatError, match="cannot write"):
        write_volume(_oblique_volume(), tmp_path / "out.png")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_truncated_compressed_file_is_reported_as_corrupt(tmp_path, suffix):
    path = write_volume(_oblique_volume(), tmp_path / f"ct{suffix}")
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CorruptFileError, match="truncated") as error:
        read_volume(cut)
    assert str(cut) in error.value.message


def test_damaged_gzip_and_junk_are_reported_as_corrupt(tmp_path):
    data = bytearray(write_volume(_oblique_volume(), tmp_path / "ct.nii.gz").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    (tmp_path / "damaged.nii.gz").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="damaged.nii.gz"):
        read_volume(tmp_path / "damaged.nii.gz")
    (tmp_path / "junk.nrrd").write_text("this is not an image\n")
    with pytest.raises(CorruptFileError, match="junk.nrrd"):
        read_volume(tmp_path / "junk.nrrd")


def test_multi_member_gzip_is_accepted(tmp_path):
    volume = _oblique_volume()
    raw = write_volume(volume, tmp_path / "ct.nii").read_bytes()
    half = len(raw) // 2
    (tmp_path / "two_members.nii.gz").write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    assert np.array_equal(read_volume(tmp_path / "two_members.nii.gz").array, volume.array)


def test_images_that_are_not_ct_are_refused(tmp_path):
    reference = _oblique_volume()
    rgb = sitk.GetImageFromArray(np.zeros((4, 8, 8, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(NotCTError, match="3 components"):
        read_volume(tmp_path / "rgb.nrrd")
    write_volume(reference.with_array(reference.array.astype(np.uint8)), tmp_path / "photo8bit.nrrd")
    with pytest.raises(NotCTError, match="8-bit"):
        read_volume(tmp_path / "photo8bit.nrrd")
    labels = np.random.default_rng(3).integers(0, 15, size=reference.array.shape).astype(np.int16)
    write_labelmap(reference.with_array(labels), tmp_path / "labels.nii.gz")
    with pytest.raises(NotCTError, match="label map"):
        read_volume(tmp_path / "labels.nii.gz")
    assert read_labelmap(tmp_path / "labels.nii.gz").array.max() == labels.max()
    normalised = np.random.default_rng(4).random(reference.array.shape).astype(np.float32)
    write_volume(reference.with_array(normalised), tmp_path / "normalised.nii.gz")
    with pytest.raises(NotCTError, match="normalised"):
        read_volume(tmp_path / "normalised.nii.gz")
    assert read_volume(tmp_path / "normalised.nii.gz", check_ct=False).array.dtype == np.float32


def test_overlapping_segmentation_is_not_a_labelmap():
    with pytest.raises(NotAVolumeError, match="overlapping segments") as error:
        read_labelmap(CT_CHEST.parent / "SegmentationOverlapping.seg.nrrd")
    assert "slicerio" in error.value.hint
    assert read_labelmap(CT_CHEST.parent / "Segmentation.seg.nrrd").array.max() == 7


def test_2d_images_and_single_slices_are_not_volumes(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.int16)), str(tmp_path / "flat.nrrd"))
    with pytest.raises(NotAVolumeError, match="2D image"):
        read_volume(tmp_path / "flat.nrrd")
    volume = _oblique_volume()
    write_volume(Volume(volume.array[:1], volume.spacing, volume.origin, volume.directions), tmp_path / "one.nii.gz")
    with pytest.raises(NotAVolumeError, match="1 x 1|x 1"):
        read_volume(tmp_path / "one.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 8, 8), np.int16), isVector=False), str(tmp_path / "four_d.nii.gz"))
    with pytest.raises(NotAVolumeError, match="4D"):
        read_volume(tmp_path / "four_d.nii.gz")


# --------------------------------------------------------------------------------------------- DICOM series

@pytest.fixture(scope="module")
def ct_slice():
    from pydicom.data import get_testdata_file
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def _write_series(folder: Path, template, num_slices: int = 5, slice_gap: float = 2.5, skip=(), series_uid=None,
                  modality="CT", edit=None, prefix="img") -> str:
    """Write a DICOM series made from one real CT slice; slice n gets pixel values + n so order is checkable.

    Files are named in reverse slice order so that the reader must sort by position. Returns the series UID.
    """
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    base = template.pixel_array.astype(np.int16)
    x0, y0, z0 = (float(v) for v in template.ImagePositionPatient)
    for n in range(num_slices):
        if n in skip:
            continue
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n + 1
        ds.ImagePositionPatient = [x0, y0, z0 + n * slice_gap]
        ds.PixelData = (base + n).tobytes()
        if edit is not None:
            edit(n, ds)
        ds.save_as(str(folder / f"{prefix}{num_slices - n:04d}.dcm"))
    return series_uid


def _template_hu(template) -> np.ndarray:
    return template.pixel_array.astype(np.float64) * float(template.RescaleSlope) + float(template.RescaleIntercept)


def test_dicom_series_is_sorted_by_position_with_ras_geometry(tmp_path, ct_slice):
    uid = _write_series(tmp_path / "series", ct_slice)
    volume = read_volume(tmp_path / "series")
    assert volume.array.shape == (5, 128, 128)
    for n in range(5):   # slice n of the volume is the file written with offset n, whatever the file names
        assert np.array_equal(volume.array[n], _template_hu(ct_slice) + n)
    x, y, z = (float(v) for v in ct_slice.ImagePositionPatient)
    np.testing.assert_allclose(volume.origin, (-x, -y, z), atol=1e-4)
    np.testing.assert_allclose(volume.spacing, [*(float(v) for v in ct_slice.PixelSpacing), 2.5], atol=1e-4)
    np.testing.assert_allclose(volume.directions, np.diag([-1.0, -1.0, 1.0]), atol=1e-6)
    assert volume.metadata["modality"] == "CT" and volume.metadata["series_uid"] == uid
    # One file of the series stands for the whole series.
    single = read_volume(tmp_path / "series" / "img0003.dcm")
    assert np.array_equal(single.array, volume.array)


@pytest.mark.parametrize("orientation", [[1, 0, 0, 0, -1, 0], [0.866025, 0.5, 0, 0, 0, -1]])
def test_dicom_voxel_positions_match_image_position_patient(tmp_path, ct_slice, orientation):
    """Whatever the orientation, voxel (0, 0, k) sits at the ImagePositionPatient (in RAS) of the k-th slice."""
    row, column = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, column)
    start, slice_steps = np.array([10.0, -20.0, 30.0]), [0, 2, 1, 4, 3]   # files n in shuffled slice order

    def place(n, ds):
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = list(start + slice_steps[n] * 3.0 * normal)
    _write_series(tmp_path / "series", ct_slice, num_slices=5, edit=place)
    volume = read_volume(tmp_path / "series")
    for n, k in enumerate(slice_steps):
        ras = ijk_to_ras_points(volume.ijk_to_ras, [[0, 0, k]])[0]
        np.testing.assert_allclose(ras, (start + k * 3.0 * normal) * [-1, -1, 1], atol=1e-3)
        assert np.array_equal(volume.array[k], _template_hu(ct_slice) + n)
    np.testing.assert_allclose(volume.directions[:, 0], row * [-1, -1, 1], atol=1e-5)
    np.testing.assert_allclose(volume.directions[:, 1], column * [-1, -1, 1], atol=1e-5)


def test_dicom_truncated_pixel_data_is_reported(tmp_path, ct_slice):
    _write_series(tmp_path / "series", ct_slice, num_slices=3)
    damaged = tmp_path / "series" / "img0002.dcm"
    damaged.write_bytes(damaged.read_bytes()[:-9000])
    with pytest.raises(CorruptFileError, match="cannot be decoded"):
        read_volume(tmp_path / "series")


def test_dicom_mixed_series_are_listed_and_one_can_be_picked(tmp_path, ct_slice):
    first = _write_series(tmp_path / "mixed", ct_slice, num_slices=3)
    second = _write_series(tmp_path / "mixed", ct_slice, num_slices=4, prefix="second", edit=lambda n, ds: setattr(
        ds, "SeriesDescription", "second"))
    with pytest.raises(InconsistentSeriesError) as mixed:
        read_volume(tmp_path / "mixed")
    assert first in mixed.value.message and second in mixed.value.message and "--series" in mixed.value.hint
    assert read_volume(tmp_path / "mixed", series_uid=first).array.shape[0] == 3
    with pytest.raises(InconsistentSeriesError, match="no series"):
        read_volume(tmp_path / "mixed", series_uid="1.2.3")


def test_dicom_missing_and_repeated_slices_are_caught(tmp_path, ct_slice):
    _write_series(tmp_path / "gap", ct_slice, num_slices=6, skip=(3,))
    with pytest.raises(InconsistentSeriesError, match="1 slice\\(s\\) missing"):
        read_volume(tmp_path / "gap")
    _write_series(tmp_path / "repeat", ct_slice, num_slices=4, edit=lambda n, ds: setattr(
        ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:2], min(n, 2) * 2.5]))
    with pytest.raises(InconsistentSeriesError, match="same position"):
        read_volume(tmp_path / "repeat")


def test_dicom_inconsistent_geometry_modality_and_single_slice(tmp_path, ct_slice):
    def tilt_last(n, ds):
        if n == 3:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.995004, 0.0998334]
    _write_series(tmp_path / "orientation", ct_slice, num_slices=4, edit=tilt_last)
    with pytest.raises(InconsistentSeriesError, match="orientations"):
        read_volume(tmp_path / "orientation")

    def other_pixel_size(n, ds):
        if n == 1:
            ds.PixelSpacing = [0.8, 0.8]
    _write_series(tmp_path / "pixels", ct_slice, num_slices=4, edit=other_pixel_size)
    with pytest.raises(InconsistentSeriesError, match="pixel"):
        read_volume(tmp_path / "pixels")

    def drift_sideways(n, ds):
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0] + 0.4 * n, *ds.ImagePositionPatient[1:]]
    _write_series(tmp_path / "tilt", ct_slice, num_slices=4, edit=drift_sideways)
    with pytest.raises(InconsistentSeriesError, match="drift sideways"):
        read_volume(tmp_path / "tilt")

    def stretch_last_gap(n, ds):
        if n == 3:
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], ds.ImagePositionPatient[2] + 0.6]
    _write_series(tmp_path / "irregular", ct_slice, num_slices=4, edit=stretch_last_gap)
    with pytest.raises(InconsistentSeriesError, match="irregular slice spacing"):
        read_volume(tmp_path / "irregular")

    _write_series(tmp_path / "mr", ct_slice, num_slices=3, modality="MR")
    with pytest.raises(NotCTError, match="modality is MR"):
        read_volume(tmp_path / "mr")

    _write_series(tmp_path / "one", ct_slice, num_slices=1)
    with pytest.raises(NotAVolumeError, match="single 2D slice"):
        read_volume(tmp_path / "one" / "img0001.dcm")

    _write_series(tmp_path / "multiframe", ct_slice, num_slices=1, edit=lambda n, ds: setattr(ds, "NumberOfFrames", 2))
    with pytest.raises(UnsupportedFormatError, match="multi-frame"):
        read_volume(tmp_path / "multiframe")

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UnsupportedFormatError, match="no DICOM images"):
        read_volume(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------- windowing

def test_window_presets_and_mapping():
    assert {name: (p.width, p.level) for name, p in WINDOW_PRESETS.items()} == {
        "abdomen": (400, 40), "liver": (150, 30), "lung": (1500, -600), "bone": (1800, 400), "soft_tissue": (350, 50)}
    assert get_window("Soft tissue") is WINDOW_PRESETS["soft_tissue"]
    hu = np.array([-1000, -160, 40, 240, 3000], dtype=np.int16)
    windowed = apply_window(hu, "abdomen")
    assert windowed.dtype == np.float32 and windowed.shape == hu.shape
    np.testing.assert_allclose(windowed, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(apply_window(np.array([0.0, 50.0, 100.0]), 50, 100), [0.0, 0.5, 1.0], atol=1e-6)


def test_window_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown window preset 'brainz'") as unknown:
        get_window("brainz")
    assert "abdomen" in unknown.value.hint
    with pytest.raises(ConfigError, match="needs a width"):
        apply_window(np.zeros(3), 40)
    with pytest.raises(ConfigError, match="positive"):
        apply_window(np.zeros(3), 40, 0)


# ------------------------------------------------------------------------------------------------------- slices

@pytest.mark.parametrize("directions", [np.eye(3), np.diag([-1.0, -1.0, 1.0]),
                                        _rotation(2, 30.0) @ _rotation(1, 12.0) @ np.diag([-1.0, 1.0, -1.0])])
def test_slice_mask_goes_back_to_exactly_its_voxels(directions):
    rng = np.random.default_rng(5)
    volume = Volume(array=rng.integers(-1000, 1000, size=(6, 9, 11)).astype(np.int16), spacing=(0.7, 0.9, 2.5),
                    origin=(12.0, -40.0, 7.5), directions=directions)
    k = 4
    axial_slice = extract_axial_slice(volume, k)
    mask2d = rng.random(axial_slice.shape) > 0.6
    placed = place_slice_mask(mask2d, k, volume.array.shape)
    assert placed.dtype == bool and placed.sum() == mask2d.sum()
    assert set(np.nonzero(placed)[0]) == {k}
    assert np.array_equal(volume.array[placed], axial_slice.pixels[mask2d])
    # Pixel (x, y) of slice k is voxel (i=x, j=y, k) in RAS, and back.
    ys, xs = np.nonzero(mask2d)
    ras = axial_slice.pixel_to_ras(np.c_[xs, ys])
    np.testing.assert_allclose(ras, ijk_to_ras_points(volume.ijk_to_ras, np.c_[xs, ys, np.full(len(xs), k)]))
    np.testing.assert_allclose(axial_slice.ras_to_pixel(ras), np.c_[xs, ys, np.full(len(xs), k)], atol=1e-9)
    np.testing.assert_allclose(axial_slice.pixel_spacing, (0.9, 0.7))


def test_ijk_ras_round_trip_on_oblique_grid_matches_explicit_formula():
    volume = _oblique_volume()
    ijk = np.random.default_rng(6).random((20, 3)) * np.array(volume.shape_ijk)
    ras = ijk_to_ras_points(volume.ijk_to_ras, ijk)
    explicit = volume.origin + (volume.directions @ (np.diag(volume.spacing) @ ijk.T)).T
    np.testing.assert_allclose(ras, explicit, atol=1e-9)
    np.testing.assert_allclose(ras_to_ijk_points(volume.ijk_to_ras, ras), ijk, atol=1e-9)


def test_real_ct_pixel_ras_matches_slicer_convention():
    volume = read_volume(CT_CHEST)
    axial_slice = extract_axial_slice(volume, 20)
    # RAS of pixel (x=5, y=7) on slice 20 of an identity-direction grid is origin + spacing * (5, 7, 20).
    np.testing.assert_allclose(axial_slice.pixel_to_ras([[5, 7]])[0], volume.origin + volume.spacing * [5, 7, 20])


def test_non_axial_volume_is_refused_then_reoriented_exactly():
    rng = np.random.default_rng(7)
    # A "sagittal" grid: K runs left-right, J runs superior: the axial axis is J.
    directions = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    volume = Volume(array=rng.integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16), spacing=(0.8, 2.0, 1.1),
                    origin=(3.0, 4.0, 5.0), directions=directions)
    assert axial_axis(volume) == 1
    with pytest.raises(ConfigError, match="not stored as axial"):
        extract_axial_slice(volume, 0)
    axial = reorient_axial(volume)
    assert axial_axis(axial) == 2 and axial.array.shape == (6, 5, 7)
    # Every voxel keeps its value at its RAS position.
    ijk_old = np.array([[i, j, k] for i in range(7) for j in range(6) for k in range(5)])
    ras = ijk_to_ras_points(volume.ijk_to_ras, ijk_old)
    ijk_new = np.rint(ras_to_ijk_points(axial.ijk_to_ras, ras)).astype(int)
    assert np.array_equal(axial.array[ijk_new[:, 2], ijk_new[:, 1], ijk_new[:, 0]],
                          volume.array[ijk_old[:, 2], ijk_old[:, 1], ijk_old[:, 0]])
    with pytest.raises(ConfigError, match="outside"):
        extract_axial_slice(axial, 6)


# ---------------------------------------------------------------------------------------------------------- CLI

def test_info_command_prints_geometry(capsys):
    assert cli_main(["info", str(CT_CHEST)]) == 0
    out = capsys.readouterr().out
    assert "128 x 128 x 34" in out and "3.047 x 3.047 x 10 mm" in out
    assert "(-193.096, -216.396, -340.250)" in out and "axial axis:    K" in out and "-3024 .. 3070" in out


def test_convert_command_keeps_geometry(tmp_path, capsys):
    out_path = tmp_path / "chest.nii.gz"
    assert cli_main(["convert", str(CT_CHEST), str(out_path)]) == 0
    original, converted = read_volume(CT_CHEST), read_volume(out_path)
    np.testing.assert_allclose(converted.ijk_to_ras, original.ijk_to_ras, atol=1e-4)
    assert np.array_equal(converted.array, original.array)
    labels = _oblique_volume().with_array(np.random.default_rng(8).integers(0, 15, (7, 12, 16)).astype(np.uint8))
    write_labelmap(labels, tmp_path / "labels.nrrd")
    assert cli_main(["convert", "--labelmap", str(tmp_path / "labels.nrrd"), str(tmp_path / "labels.nii.gz")]) == 0
    assert np.array_equal(read_labelmap(tmp_path / "labels.nii.gz").array, labels.array)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "mixed_series", "unsupported_output"])
def test_cli_errors_are_clean(tmp_path, capsys, ct_slice, case):
    if case == "missing":
        argv, expected = ["info", str(tmp_path / "absent.nii.gz")], "absent.nii.gz: no such file"
    elif case == "mixed_series":
        _write_series(tmp_path / "mixed", ct_slice, num_slices=2)
        _write_series(tmp_path / "mixed", ct_slice, num_slices=3, prefix="other")
        argv, expected = ["info", str(tmp_path / "mixed")], "mixes 2 DICOM series"
    else:
        argv, expected = ["convert", str(CT_CHEST), str(tmp_path / "out.png")], "cannot write '.png'"
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    assert expected in captured.err and "hint:" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_neighbours_sit_about_the_same_distance_away_whatever_the_slice_spacing():
    assert neighbour_offset(3.0) == 1 and neighbour_offset(4.0) == 1 and neighbour_offset(2.5) == 1
    assert neighbour_offset(0.625) == 5 and neighbour_offset(1.0) == 3 and neighbour_offset(10.0) == 1
    assert neighbour_offset(-1.5) == 2                      # a volume running the other way in K
    for wrong in (0.0, float("nan")):
        with pytest.raises(ConfigError, match="slice spacing"):
            neighbour_offset(wrong)
    array = np.arange(5)[:, None, None] * np.ones((5, 2, 3))
    assert neighbour_slices(array, 2, 1)[:, 0, 0].tolist() == [1, 3]
    assert neighbour_slices(array, 0, 2)[:, 0, 0].tolist() == [0, 2]      # clamped at the ends
    assert neighbour_slices(array, 4, 1)[:, 0, 0].tolist() == [3, 4]
    with pytest.raises(ValueError, match="outside"):
        neighbour_slices(array, 5, 1)
