"""Segmenters (SAM tiny / ViT shapes / SAM2), the embedding cache and the slice <-> model-frame mapping."""
import numpy as np
import pytest
import torch

from CTReasonerLib.errors import ConfigError, InputFileError, ModelError
from CTReasonerLib.model.image_processing import (
    MODEL_WINDOWS,
    ResizeToSquare,
    hu_to_unit,
    mask_to_original,
    prepare_slice,
    slice_to_channels,
)
from CTReasonerLib.model.segmenter import EmbeddingCache, ImageFeatures, SegmenterConfig, build_segmenter
from CTReasonerLib.model.segmenter.sam import build_sam_model, build_sam_segmenter, load_sam_checkpoint, sam_config

IMAGE_SIZE = 64   # tiny tests: 64 px, patch 8 -> 8x8 embedding, 32x32 masks


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_sam_segmenter("tiny", image_size=IMAGE_SIZE, encoder_depth=2, encoder_global_attn_indexes=(1,)).eval()


@pytest.fixture(scope="module")
def two_images():
    return torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


# --- image processing -------------------------------------------------------------------------------

def test_hu_to_unit_presets_and_custom_window():
    hu = np.array([-1000, -160, 40, 240, 3000], dtype=np.int16)
    np.testing.assert_allclose(hu_to_unit(hu, "abdomen"), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(hu_to_unit(hu, (40, 400)), hu_to_unit(hu, "abdomen"))
    channels = slice_to_channels(np.zeros((5, 7)))
    assert channels.shape == (len(MODEL_WINDOWS), 5, 7) and channels.dtype == np.float32
    with pytest.raises(ValueError):
        slice_to_channels(np.zeros((2, 5, 7)))


def test_resize_to_square_maps_coordinates_exactly():
    transform = ResizeToSquare((300, 200), 256)
    assert transform.padded_side == 300 and transform.scale == pytest.approx(256 / 300)
    points = np.array([[0.0, 0.0], [199.0, 299.0], [57.5, 10.0]])
    np.testing.assert_allclose(transform.from_model_coords(transform.to_model_coords(points)), points)
    # the last pixel's centre maps to where its edges map: (299 + 0.5) * scale - 0.5
    np.testing.assert_allclose(transform.to_model_coords(points)[1, 1], 299.5 * 256 / 300 - 0.5)
    boxes = torch.tensor([[30.0, 50.0, 90.0, 120.0]])
    torch.testing.assert_close(transform.boxes_from_model(transform.boxes_to_model(boxes)), boxes)
    # boxes reaching into the padding are clipped to the slice
    np.testing.assert_allclose(transform.boxes_from_model(np.array([0.0, 0.0, 256.0, 256.0])), [0, 0, 200, 300])


def test_mask_survives_model_frame_round_trip():
    mask = np.zeros((300, 200), bool)
    mask[50:120, 30:90] = True
    transform = ResizeToSquare(mask.shape, 128)
    model_mask = transform.masks(mask)
    assert model_mask.shape == (1, 128, 128)
    # the padding (x >= 200 * scale) stays empty
    assert model_mask[0, :, int(np.ceil(200 * transform.scale)) :].sum() == 0
    logits = torch.logit(model_mask.clamp(1e-4, 1 - 1e-4)).unsqueeze(1)
    recovered = (transform.mask_to_original(logits) > 0)[0].numpy()
    assert recovered.shape == mask.shape
    assert (recovered == mask).mean() > 0.995
    assert torch.equal(mask_to_original(logits, (300, 200)), transform.mask_to_original(logits))


def test_prepare_slice_pads_with_air():
    hu = np.full((40, 20), 40.0)
    image, transform = prepare_slice(hu, 32)
    assert image.shape == (3, 32, 32)
    assert image[:, :, :15].min() > 0.1 and image[:, :, 17:].abs().max() == 0


# --- SAM --------------------------------------------------------------------------------------------

def test_tiny_default_size_and_mask_resolution():
    segmenter = build_sam_segmenter("tiny")
    parameters = sum(p.numel() for p in segmenter.parameters())
    assert 5e6 < parameters < 8e6
    assert segmenter.image_size == 256 and segmenter.low_res_mask_size == 128


def test_encode_decode_shapes(tiny, two_images):
    with torch.no_grad():
        features = tiny.encode(two_images)
        assert features.image_embeddings.shape == (2, 256, 8, 8) and features.high_res_features is None
        logits, iou = tiny.decode(features, torch.randn(5, 1, 256), torch.tensor([0, 1, 1, 0, 1]))
    assert logits.shape == (5, 1, 32, 32) and iou.shape == (5, 1)
    with pytest.raises(ValueError):
        tiny.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError):
        tiny.decode(features, torch.randn(2, 1, 256), torch.tensor([0, 2]))


def test_batched_decode_equals_sams_own_one_image_decode(tiny, two_images):
    image_index = torch.tensor([1, 0, 1])
    prompts = torch.randn(3, 2, 256)
    coords = torch.tensor([[[10.0, 12.0]], [[30.0, 40.0]], [[0.0, 0.0]]])
    labels = torch.tensor([[1], [0], [-1]])
    with torch.no_grad():
        features = tiny.encode(two_images)
        logits, iou = tiny.decode(features, prompts, image_index, points=(coords, labels))
        for i, image in enumerate(image_index.tolist()):
            sparse, dense = tiny.prompt_encoder(points=(coords[i : i + 1], labels[i : i + 1]), boxes=None, masks=None)
            expected, expected_iou = tiny.mask_decoder(
                image_embeddings=features.image_embeddings[image : image + 1],
                image_pe=tiny.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=torch.cat([sparse, prompts[i : i + 1]], dim=1),
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            torch.testing.assert_close(logits[i : i + 1], expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(iou[i : i + 1], expected_iou, rtol=1e-4, atol=1e-4)


def test_user_prompts_refine_and_gradients_reach_routing_embedding(tiny, two_images):
    features = tiny.encode(two_images)
    prompt = torch.randn(1, 1, 256, requires_grad=True)
    index = torch.tensor([0])
    plain, _ = tiny.decode(features, prompt, index)
    box = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    clicked, _ = tiny.decode(features, prompt, index, points=(torch.tensor([[[20.0, 20.0]]]), torch.tensor([[1]])), boxes=box)
    with_mask, _ = tiny.decode(features, prompt, index, mask_inputs=plain.detach() * 5)
    assert not torch.allclose(plain, clicked) and not torch.allclose(plain, with_mask)
    (plain.sum() + clicked.sum()).backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    multi, multi_iou = tiny.decode(features, prompt.detach(), index, multimask_output=True)
    assert multi.shape == (1, 3, 32, 32) and multi_iou.shape == (1, 3)


def test_freeze_image_encoder(two_images):
    segmenter = build_sam_segmenter("tiny", image_size=IMAGE_SIZE, encoder_depth=1, encoder_global_attn_indexes=(0,),
                                    freeze_image_encoder=True)
    assert not any(p.requires_grad for p in segmenter.image_encoder.parameters())
    assert all(p.requires_grad for p in segmenter.mask_decoder.parameters())
    assert not segmenter.encode(two_images).image_embeddings.requires_grad


def test_checkpoint_round_trip(tmp_path, tiny, two_images):
    official_style = tmp_path / "sam_tiny.pth"
    torch.save(tiny.sam.state_dict(), official_style)
    ours = tmp_path / "segmenter.pth"
    torch.save(tiny.state_dict(), ours)       # keys prefixed "sam."
    prompts, index = torch.randn(2, 1, 256), torch.tensor([0, 1])
    with torch.no_grad():
        expected = tiny.decode(tiny.encode(two_images), prompts, index)[0]
        for path in (official_style, ours):
            loaded = build_segmenter(sam_config("tiny", image_size=IMAGE_SIZE, encoder_depth=2,
                                                encoder_global_attn_indexes=(1,), checkpoint=str(path))).eval()
            torch.testing.assert_close(loaded.decode(loaded.encode(two_images), prompts, index)[0], expected)
    with pytest.raises(InputFileError):
        build_sam_segmenter("tiny", checkpoint=tmp_path / "missing.pth")
    with pytest.raises(ModelError):   # a different architecture
        load_sam_checkpoint(build_sam_model(sam_config("tiny", image_size=IMAGE_SIZE, encoder_depth=1,
                                                       encoder_global_attn_indexes=(0,))), official_style)


@pytest.mark.parametrize("variant, width, depth, parameters_m", [("vit_b", 768, 12, 93.7), ("vit_l", 1024, 24, 312.3), ("vit_h", 1280, 32, 641.1)])
def test_official_variant_shapes_without_allocating(variant, width, depth, parameters_m):
    config = sam_config(variant)
    assert (config.image_size, config.patch_size) == (1024, 16)
    with torch.device("meta"):
        sam = build_sam_model(config)
    encoder = sam.image_encoder
    assert encoder.patch_embed.proj.out_channels == width and len(encoder.blocks) == depth
    assert sam.prompt_encoder.image_embedding_size == (64, 64)
    assert sum(p.numel() for p in sam.parameters()) / 1e6 == pytest.approx(parameters_m, rel=0.01)


def test_config_round_trip_and_errors():
    config = sam_config("tiny", patch_size=16)
    assert SegmenterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError):
        SegmenterConfig.from_dict({"typo": 1})
    with pytest.raises(ConfigError):
        sam_config("vit_x")
    with pytest.raises(ConfigError):
        build_segmenter(SegmenterConfig(type="unet"))
    with pytest.raises(ConfigError):
        build_sam_model(sam_config("tiny", image_size=100))


# --- embedding cache --------------------------------------------------------------------------------

def _features(value: float) -> ImageFeatures:
    return ImageFeatures(torch.full((1, 256, 4, 4), value), None, 64)   # 16 KiB


def test_features_select_and_cat():
    batch = ImageFeatures.cat([_features(0), _features(1), _features(2)])
    assert batch.batch_size == 3
    picked = batch.select(torch.tensor([2, 0, 2]))
    assert picked.image_embeddings[:, 0, 0, 0].tolist() == [2, 0, 2]
    with pytest.raises(ValueError):
        ImageFeatures.cat([_features(0), ImageFeatures(torch.zeros(1, 256, 4, 4), None, 32)])


def test_embedding_cache_lru_by_bytes():
    entry_bytes = _features(0).nbytes
    cache = EmbeddingCache(max_bytes=2 * entry_bytes)
    image = np.zeros((8, 8), np.float32)
    key_a = EmbeddingCache.key_for(image, "model-1")
    assert key_a == EmbeddingCache.key_for(image.copy(), "model-1")
    assert key_a != EmbeddingCache.key_for(image, "model-2")
    assert key_a != EmbeddingCache.key_for(image + 1, "model-1")
    assert key_a != EmbeddingCache.key_for(image.reshape(4, 16), "model-1")
    cache.put("a", _features(0))
    cache.put("b", _features(1))
    assert cache.get("a") is not None          # "a" is now the most recent
    cache.put("c", _features(2))               # evicts "b"
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.nbytes == 2 * entry_bytes and len(cache) == 2
    cache.put("huge", ImageFeatures(torch.zeros(1, 256, 16, 16), None, 64))
    assert "huge" not in cache and len(cache) == 2
    calls = []
    compute = lambda: calls.append(1) or _features(3)  # noqa: E731
    cache.get_or_compute("d", compute)
    cache.get_or_compute("d", compute)
    assert len(calls) == 1 and cache.hits >= 2
    with pytest.raises(ValueError):
        cache.put("batch", ImageFeatures.cat([_features(0), _features(1)]))


# --- SAM2 -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sam2_routing_embedding_flows_and_checkpoint_loads(tmp_path):
    from CTReasonerLib.model.segmenter.sam2 import build_sam2_segmenter, sam2_config

    torch.manual_seed(0)
    segmenter = build_sam2_segmenter("hiera_t", image_size=128, device="cpu")
    images = torch.rand(2, 3, 128, 128)
    features = segmenter.encode(images)
    assert features.image_embeddings.shape == (2, 256, 8, 8)
    assert [tuple(f.shape) for f in features.high_res_features] == [(2, 32, 32, 32), (2, 64, 16, 16)]
    prompt = torch.randn(3, 1, 256, requires_grad=True)
    index = torch.tensor([1, 0, 1])
    logits, iou = segmenter.decode(features, prompt, index)
    assert logits.shape == (3, 1, 32, 32) and iou.shape == (3, 1)
    assert segmenter.decode(features, prompt[:0], index[:0])[0].shape == (0, 1, 32, 32)
    logits.sum().backward()
    assert prompt.grad.abs().sum(dim=(1, 2)).min() > 0
    clicked, _ = segmenter.decode(features.detach(), prompt.detach(), index,
                                  points=(torch.tensor([[[40.0, 40.0]]] * 3), torch.ones(3, 1)),
                                  boxes=torch.tensor([[20.0, 20.0, 80.0, 80.0]] * 3))
    assert not torch.allclose(clicked, logits.detach())

    checkpoint = tmp_path / "sam2_tiny.pt"
    torch.save({"model": segmenter.model.state_dict()}, checkpoint)
    loaded = build_sam2_segmenter("hiera_t", checkpoint=checkpoint, image_size=128, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(images), prompt, index)[0],
                                   segmenter.eval().decode(segmenter.encode(images), prompt, index)[0])
    with pytest.raises(InputFileError):
        build_sam2_segmenter("hiera_t", checkpoint=tmp_path / "missing.pt", image_size=128)
    with pytest.raises(ConfigError):
        sam2_config("hiera_xxl")


def test_decode_without_prompts_stays_connected(tiny, two_images):
    features = tiny.encode(two_images)
    routing_state = torch.nn.Parameter(torch.ones(1))
    prompts = torch.zeros(0, 1, 256) * routing_state
    tiny.zero_grad(set_to_none=True)
    logits, iou = tiny.decode(features, prompts, torch.zeros(0, dtype=torch.long))
    assert logits.shape == (0, 1, 32, 32) and iou.shape == (0, 1)
    (logits.sum() + iou.sum()).backward()
    assert routing_state.grad is not None
    assert all(p.grad is not None for p in tiny.mask_decoder.parameters())
