"""The detection branch: box-query head, Hungarian matcher and post-processing."""
from CTReasonerLib.model.detection.head import DetectionHead, DetectionHeadConfig
from CTReasonerLib.model.detection.matcher import HungarianMatcher
from CTReasonerLib.model.detection.postprocess import postprocess_detections

__all__ = ["DetectionHead", "DetectionHeadConfig", "HungarianMatcher", "postprocess_detections"]
