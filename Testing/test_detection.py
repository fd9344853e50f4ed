"""Detection head (box queries conditioned on [DET] and the image), post-processing to slice pixels, projector."""
import numpy as np
import pytest
import torch

from CTReasonerLib.errors import ConfigError
from CTReasonerLib.model.detection import DetectionHead, DetectionHeadConfig, postprocess_detections
from CTReasonerLib.model.image_processing import ResizeToSquare
from CTReasonerLib.model.projector import build_projector
from CTReasonerLib.model.segmenter import ImageFeatures

SMALL = DetectionHeadConfig(num_queries=6, num_layers=2, feedforward_dim=128)


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    return DetectionHead(SMALL).eval()


@pytest.fixture(scope="module")
def features():
    return ImageFeatures(torch.randn(2, 256, 8, 8, generator=torch.Generator().manual_seed(0)), None, 64)


def test_head_output_shapes_and_ranges(head, features):
    outputs = head(features, torch.randn(3, 256), torch.tensor([0, 1, 0]))
    assert outputs["pred_logits"].shape == (3, 6) and outputs["pred_boxes"].shape == (3, 6, 4)
    assert outputs["pred_boxes"].min() >= 0 and outputs["pred_boxes"].max() <= 1
    # the prior keeps initial objectness low, so unmatched queries start near their target
    assert head(features, torch.zeros(1, 256), torch.tensor([0]))["pred_logits"].sigmoid().mean() < 0.3


def test_head_is_conditioned_on_det_embedding_and_on_its_own_image(head, features):
    det = torch.randn(2, 256)
    with torch.no_grad():
        batched = head(features, det, torch.tensor([1, 0]))
        alone = head(ImageFeatures(features.image_embeddings[1:], None, 64), det[:1], torch.tensor([0]))
        other_det = head(features, torch.randn(1, 256), torch.tensor([1]))
    torch.testing.assert_close(batched["pred_boxes"][:1], alone["pred_boxes"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched["pred_boxes"][:1], other_det["pred_boxes"])
    assert not torch.allclose(batched["pred_boxes"][0], batched["pred_boxes"][1])
    with pytest.raises(ValueError):
        head(features, torch.randn(2, 256), torch.tensor([0]))


def test_head_config_round_trip():
    assert DetectionHeadConfig.from_dict(SMALL.to_dict()) == SMALL
    assert DetectionHeadConfig().num_queries == 10 and DetectionHeadConfig().score_threshold == 0.5
    with pytest.raises(ConfigError):
        DetectionHeadConfig.from_dict({"queries": 3})


def test_postprocess_thresholds_sorts_and_maps_to_slice_pixels():
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    outputs = {
        "pred_logits": torch.tensor([[logit(0.6), logit(0.2), logit(0.9), logit(0.7)]]),
        "pred_boxes": torch.tensor([[
            [0.5, 0.5, 0.5, 0.5],      # model xyxy (64, 64, 192, 192) at S = 256
            [0.1, 0.1, 0.1, 0.1],      # below threshold
            [0.25, 0.25, 0.1, 0.2],    # model (51.2, 38.4, 76.8, 89.6)
            [0.95, 0.5, 0.05, 0.1],    # wholly in the padding right of a 512 x 400 slice
        ]]),
    }
    transform = ResizeToSquare((512, 400), 256)           # scale 0.5
    (result,) = postprocess_detections(outputs, [transform], score_threshold=0.5)
    np.testing.assert_allclose(result["scores"], [0.9, 0.6], rtol=1e-5)
    np.testing.assert_allclose(result["boxes"], [[102.4, 76.8, 153.6, 179.2], [128, 128, 384, 384]], rtol=1e-5)
    with pytest.raises(ValueError):
        postprocess_detections(outputs, [transform, transform])


def test_postprocess_keeps_several_boxes_of_a_split_organ():
    outputs = {"pred_logits": torch.tensor([[3.0, 2.5, -3.0]]),
               "pred_boxes": torch.tensor([[[0.2, 0.5, 0.1, 0.2], [0.8, 0.5, 0.1, 0.2], [0.5, 0.5, 0.1, 0.1]]])}
    (result,) = postprocess_detections(outputs, [ResizeToSquare((100, 100), 64)])
    assert len(result["boxes"]) == 2 and result["boxes"][0, 0] < 50 < result["boxes"][1, 0]


def test_projector_maps_hidden_size_to_prompt_width():
    projector = build_projector(96)
    assert [type(m).__name__ for m in projector] == ["Linear", "GELU", "Linear"]
    assert projector(torch.randn(5, 96)).shape == (5, 256)
