"""Synthetic slides with ground truth, for tests, benchmarks and the demo."""

from wsi_mil.synthetic.slides import SyntheticSpec, SyntheticTruth, load_truth, write_synthetic_slide

__all__ = ["SyntheticSpec", "SyntheticTruth", "load_truth", "write_synthetic_slide"]
