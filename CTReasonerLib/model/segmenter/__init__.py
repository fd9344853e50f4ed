"""Promptable segmenters (SAM, SAM2) behind one interface; see ``base.Segmenter``."""
from CTReasonerLib.model.segmenter.base import EmbeddingCache, ImageFeatures, Segmenter, SegmenterConfig


def build_segmenter(config: SegmenterConfig, device=None) -> Segmenter:
    """Build the segmenter ``config`` describes (``config.type`` "sam" or "sam2"), weights included."""
    from CTReasonerLib.errors import ConfigError

    if config.type == "sam":
        from CTReasonerLib.model.segmenter.sam import build_segmenter_from_config
    elif config.type == "sam2":
        from CTReasonerLib.model.segmenter.sam2 import build_segmenter_from_config
    else:
        raise ConfigError(f"unknown segmenter type {config.type!r}", 'use "sam" or "sam2"')
    return build_segmenter_from_config(config, device=device)


__all__ = ["EmbeddingCache", "ImageFeatures", "Segmenter", "SegmenterConfig", "build_segmenter"]
