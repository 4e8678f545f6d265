"""Tissue segmentation at thumbnail resolution, all sizes in physical units."""

from wsi_mil.tissue.segment import SegmentConfig, TissueMask, segment_tissue

__all__ = ["SegmentConfig", "TissueMask", "segment_tissue"]
