"""Localisation scored against annotations (``wsi-mil evaluate``); see docs/evaluate.md."""

from wsi_mil.evaluate.annotations import Annotation, AnnotationError, read_annotation
from wsi_mil.evaluate.export import write_asap_xml, write_geojson_annotation, write_synthetic_annotations
from wsi_mil.evaluate.run import EvaluateConfig, Evaluation, evaluate, evaluate_run, load_evaluate_config

__all__ = [
    "Annotation",
    "AnnotationError",
    "EvaluateConfig",
    "Evaluation",
    "evaluate",
    "evaluate_run",
    "load_evaluate_config",
    "read_annotation",
    "write_asap_xml",
    "write_geojson_annotation",
    "write_synthetic_annotations",
]
