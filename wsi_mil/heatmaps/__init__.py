"""Stage 4 renderings: per-patch attention and class probabilities back on the slide.

:func:`write_heatmaps` writes ``heatmaps/<run>/<id>.h5`` and renders from it the PNG
overlay, the pyramidal TIFF (and OME-Zarr), the QuPath GeoJSON and the patch gallery;
:func:`render_heatmaps` re-renders stored data with other :class:`HeatmapOptions`.
"""

from wsi_mil.heatmaps.options import HeatmapOptions
from wsi_mil.heatmaps.write import heatmap_dir, heatmap_paths, render_heatmaps, write_heatmaps

__all__ = ["HeatmapOptions", "heatmap_dir", "heatmap_paths", "render_heatmaps", "write_heatmaps"]
