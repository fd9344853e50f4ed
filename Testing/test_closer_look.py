"""Closer-look geometry: ROI from a mask, crop + resize to the canonical size, paste back."""
import numpy as np
import pytest
import torch

from CTReasonerLib.model.closer_look import crop_and_resize, paste_back, roi_from_mask


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _ellipse(shape, centre, radii) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1


def _contains(roi, mask) -> bool:
    rows, cols = np.nonzero(mask)
    return roi[0] <= cols.min() and cols.max() < roi[2] and roi[1] <= rows.min() and rows.max() < roi[3]


def test_roi_is_a_square_twice_the_extent_around_the_mask():
    mask = np.zeros((512, 512), bool)
    mask[200:230, 300:320] = True
    roi = roi_from_mask(mask)
    assert roi.dtype == np.int64 and roi.tolist() == [280, 185, 340, 245]   # 30 px extent -> 60 px square
    assert _contains(roi, mask)
    assert roi_from_mask(mask, margin=0.0, min_size_px=1).tolist() == [295, 200, 325, 230]
    tiny = np.zeros((512, 512), bool)
    tiny[100, 100] = True
    x0, y0, x1, y1 = roi_from_mask(tiny, min_size_px=32)
    assert x1 - x0 == y1 - y0 == 32 and _contains((x0, y0, x1, y1), tiny)


def test_roi_is_shifted_inside_at_borders_and_clamped_on_small_images():
    corner = np.zeros((100, 80), bool)
    corner[0:10, 70:80] = True
    roi = roi_from_mask(corner, min_size_px=32)
    assert roi.tolist() == [48, 0, 80, 32] and _contains(roi, corner)
    small = np.zeros((20, 30), bool)
    small[5:15, 5:25] = True
    assert roi_from_mask(small).tolist() == [0, 0, 30, 20]


def test_empty_mask_gives_no_roi_and_bad_input_is_refused():
    assert roi_from_mask(np.zeros((10, 10), bool)) is None
    with pytest.raises(ValueError):
        roi_from_mask(np.zeros((2, 10, 10), bool))
    with pytest.raises(ValueError):
        crop_and_resize(np.zeros((10, 10)), [5, 5, 5, 9], 8)
    with pytest.raises(ValueError):
        paste_back(np.zeros((8, 8)), [0, 0, 20, 5], (10, 10))


def test_jittered_rois_are_reproducible_varied_and_contain_the_mask():
    mask = _ellipse((256, 256), (120, 140), (12, 20))
    rois = [roi_from_mask(mask, jitter=0.2, generator=torch.Generator().manual_seed(seed)) for seed in range(8)]
    again = roi_from_mask(mask, jitter=0.2, generator=torch.Generator().manual_seed(3))
    assert rois[3].tolist() == again.tolist()
    assert len({tuple(r) for r in rois}) > 4
    assert all(_contains(r, mask) for r in rois)


def test_mask_survives_crop_and_paste():
    mask = _ellipse((512, 512), (300, 180), (9, 14))
    roi = roi_from_mask(mask)
    crop = crop_and_resize(mask, roi, 256)
    assert crop.shape == (1, 256, 256)
    restored = paste_back(crop[0].numpy(), roi, mask.shape) > 0.5
    assert _dice(restored, mask) > 0.98
    # through logits, as the model hands them back at a lower resolution than the crop
    low_res = torch.nn.functional.avg_pool2d(crop[None], 2)[0, 0]
    logits = torch.logit(low_res.clamp(1e-4, 1 - 1e-4))
    assert _dice(paste_back(logits, roi, mask.shape, fill=-20.0).numpy() > 0, mask) > 0.95


def test_box_aligned_rectangle_round_trip_is_exact():
    mask = np.zeros((400, 300), bool)
    mask[100:140, 150:170] = True
    roi = roi_from_mask(mask)
    restored = paste_back(crop_and_resize(mask, roi, 256)[0] > 0.5, roi, mask.shape)
    assert restored.dtype == torch.bool and np.array_equal(restored.numpy(), mask)


def test_paste_back_keeps_round_one_values_outside_the_roi():
    background = torch.full((64, 64), -7.0)
    pasted = paste_back(torch.full((16, 16), 3.0), [10, 20, 42, 52], (64, 64), background=background)
    assert pasted[20:52, 10:42].eq(3.0).all() and pasted[:20].eq(-7.0).all() and pasted[:, 42:].eq(-7.0).all()
    assert background.eq(-7.0).all()   # not modified in place


def test_crop_and_resize_of_multichannel_image():
    image = torch.arange(3 * 40 * 40, dtype=torch.float32).reshape(3, 40, 40)
    crop = crop_and_resize(image, [8, 8, 24, 24], 16)     # same size: an exact crop
    assert torch.equal(crop, image[:, 8:24, 8:24])
    assert crop_and_resize(image, [0, 0, 40, 40], 20).shape == (3, 20, 20)
