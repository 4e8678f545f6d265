"""Stage 4: diagnosis of slides with a trained run, and their heatmaps.

:func:`predict_slide` diagnoses one slide from its stored bag and writes its heatmaps (the
per-slide task that ``wsi-mil run`` fans out); :func:`predict_cohort` tiles and extracts
new slides with the model's own settings first; :func:`heatmap_cohort` renders stored bags.
"""

from wsi_mil.io.run_folder import ModelSettings, load_settings
from wsi_mil.predict.cohort import PredictSummary, heatmap_cohort, predict_cohort
from wsi_mil.predict.slide import predict_slide, resolve_heatmap_options, write_predictions_csv

__all__ = [
    "ModelSettings",
    "PredictSummary",
    "heatmap_cohort",
    "load_settings",
    "predict_cohort",
    "predict_slide",
    "resolve_heatmap_options",
    "write_predictions_csv",
]
