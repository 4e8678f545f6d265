"""``wsi-mil view OUT``: a local, read-only web viewer of slides with heatmap overlays.

The slide list (labels, predictions, probabilities), a deep-zoom view of each slide
(OpenSeadragon, served from the package), the heatmap as an aligned overlay, patch scores on
hover or click, top-k patches and tissue contours. Modules: :mod:`~wsi_mil.viewer.data`
(reading ``OUT``), :mod:`~wsi_mil.viewer.tiles` (Deep Zoom tiles and their cache),
:mod:`~wsi_mil.viewer.app` (routes), :mod:`~wsi_mil.viewer.server` (uvicorn).
Importing this package loads neither Starlette nor a slide library.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """See :func:`wsi_mil.viewer.app.create_app`."""
    from wsi_mil.viewer.app import create_app as _create_app

    return _create_app(*args, **kwargs)


def serve(*args: Any, **kwargs: Any) -> None:
    """See :func:`wsi_mil.viewer.server.serve`."""
    from wsi_mil.viewer.server import serve as _serve

    _serve(*args, **kwargs)
