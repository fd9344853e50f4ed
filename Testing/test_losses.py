"""Perception losses: mask BCE + Dice, Hungarian-matched box losses, connected zeros for empty batches."""
import pytest
import torch

from CTReasonerLib.model.detection import DetectionHead, DetectionHeadConfig, HungarianMatcher
from CTReasonerLib.model.segmenter import ImageFeatures
from CTReasonerLib.train.losses import detection_loss, mask_loss


def _logits_for(mask: torch.Tensor, confidence: float = 20.0) -> torch.Tensor:
    return (mask.float() * 2 - 1) * confidence


def test_mask_loss_near_zero_when_right_and_large_when_wrong():
    targets = torch.zeros(2, 1, 256, 256)
    targets[0, :, 64:192, 64:128] = 1
    targets[1, :, 8:40, 200:248] = 1
    perfect = _logits_for(torch.nn.functional.avg_pool2d(targets, 4) > 0.5)   # at 64x64, lower resolution
    good = mask_loss(perfect, targets)
    bad = mask_loss(-perfect, targets)
    assert good["bce"] < 0.01 and good["dice"] < 0.02
    assert bad["bce"] > 5 and bad["dice"] > 0.9


def test_mask_loss_on_high_res_logits_and_iou_head():
    targets = torch.zeros(1, 1, 512, 512)
    targets[..., :256, :] = 1
    logits = _logits_for(targets).requires_grad_()
    iou_scores = torch.tensor([[0.2]], requires_grad=True)
    terms = mask_loss(logits, targets, iou_scores=iou_scores)
    assert terms["dice"] < 0.01 and terms["iou"].item() == pytest.approx(0.64)   # real IoU is 1
    sum(terms.values()).backward()
    assert logits.grad is not None and iou_scores.grad.item() < 0


def test_mask_loss_empty_batch_is_connected_zero():
    weight = torch.nn.Parameter(torch.ones(1))
    logits = torch.zeros(0, 1, 32, 32) * weight
    iou_scores = torch.zeros(0, 1) * weight
    terms = mask_loss(logits, torch.zeros(0, 1, 64, 64), iou_scores=iou_scores)
    total = sum(terms.values())
    assert total.item() == 0 and total.requires_grad
    total.backward()
    assert weight.grad is not None and weight.grad.item() == 0
    with pytest.raises(ValueError):
        mask_loss(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8))


# --- matching ---------------------------------------------------------------------------------------

TARGETS = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2], [0.5, 0.9, 0.2, 0.1]])


def test_matcher_recovers_a_permutation_and_leaves_extra_queries():
    order = [4, 0, 2]                         # query q holds target order.index(q)
    boxes = torch.full((1, 6, 4), 0.05) + torch.tensor([0.0, 0.1, 0.2, 0.3]) * 0  # far-off small boxes
    boxes[0, :, :2] = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.05, 0.95], [0.1, 0.9], [0.95, 0.95], [0.9, 0.9]])
    for target, query in enumerate(order):
        boxes[0, query] = TARGETS[target] + 0.01
    outputs = {"pred_logits": torch.zeros(1, 6), "pred_boxes": boxes}
    (queries, targets), = HungarianMatcher()(outputs, [{"boxes": TARGETS}])
    assert dict(zip(targets.tolist(), queries.tolist())) == {0: 4, 1: 0, 2: 2}


def test_matcher_prefers_confident_query_when_boxes_tie():
    boxes = TARGETS[:1].repeat(1, 3, 1)
    outputs = {"pred_logits": torch.tensor([[-5.0, 5.0, -5.0]]), "pred_boxes": boxes}
    (queries, _), = HungarianMatcher()(outputs, [{"boxes": TARGETS[:1]}])
    assert queries.tolist() == [1]


def test_matcher_handles_no_targets_and_more_targets_than_queries():
    outputs = {"pred_logits": torch.zeros(2, 2), "pred_boxes": torch.rand(2, 2, 4) * 0.5 + 0.25}
    matches = HungarianMatcher()(outputs, [{"boxes": torch.zeros(0, 4)}, {"boxes": TARGETS}])
    assert matches[0][0].numel() == 0
    assert len(matches[1][0]) == 2 and len(set(matches[1][1].tolist())) == 2
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)


# --- detection loss ---------------------------------------------------------------------------------

def test_detection_loss_zero_for_perfect_and_larger_for_wrong():
    boxes = torch.rand(1, 5, 4) * 0.3 + 0.3
    boxes[0, [3, 1]] = TARGETS[:2]
    logits = torch.full((1, 5), -20.0)
    logits[0, [3, 1]] = 20.0
    perfect = detection_loss({"pred_logits": logits, "pred_boxes": boxes}, [{"boxes": TARGETS[:2]}])
    assert all(value < 1e-4 for value in perfect.values())
    wrong = detection_loss({"pred_logits": -logits, "pred_boxes": boxes.flip(-1)}, [{"boxes": TARGETS[:2]}])
    assert wrong["l1"] > 0.05 and wrong["giou"] > 0.1 and wrong["objectness"] > 10


def test_detection_loss_without_targets_keeps_head_in_graph():
    torch.manual_seed(0)
    head = DetectionHead(DetectionHeadConfig(num_queries=4, num_layers=1, feedforward_dim=64))
    features = ImageFeatures(torch.randn(1, 256, 4, 4), None, 64)
    for count, targets in ((2, [{"boxes": torch.zeros(0, 4)}] * 2), (0, [])):
        head.zero_grad(set_to_none=True)
        outputs = head(features, torch.randn(count, 256), torch.zeros(count, dtype=torch.long))
        terms = detection_loss(outputs, targets)
        assert terms["l1"].item() == 0 and terms["giou"].item() == 0
        assert (terms["objectness"].item() > 0) == (count > 0)   # absent organ: every query negative
        sum(terms.values()).backward()
        assert all(p.grad is not None for p in head.parameters())
