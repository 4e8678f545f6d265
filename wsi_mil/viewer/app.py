"""The viewer's routes: a read-only Starlette app over one output folder.

Every route answers ``GET`` (and ``HEAD``) only; slides are addressed by id and looked up
in :class:`~wsi_mil.viewer.data.ViewerData`, never by a path taken from the request, and
static files come from the package's ``static/`` folder through Starlette's
``StaticFiles`` (which refuses paths outside it). With a token (always, off loopback)
:class:`~wsi_mil.viewer.auth.TokenGate` answers 403 to a request without it. A slide whose
file is no longer the one that was tiled answers 409; one that cannot be read, 500.

Routes
------
``/``                                    the page
``/static/...``                          its JS/CSS and OpenSeadragon
``/api/slides``                          slide list: labels, predictions, probabilities
``/api/slides/{id}``                     one slide: size, mpp, scores, colormap
``/api/slides/{id}/patch?x=&y=``         scores of the patch at level-0 (x, y)
``/api/slides/{id}/top?score=&k=``       top-k patches by a score
``/api/slides/{id}/tissue``              tissue contours (``masks/<id>.geojson``)
``/slides/{id}.dzi``, ``/slides/{id}_files/{level}/{col}_{row}.jpeg``   slide Deep Zoom
``/overlay/{id}/{score}.dzi``, ``/overlay/{id}/{score}_files/{level}/{col}_{row}.png``
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from wsi_mil.errors import WsiMilError
from wsi_mil.io import h5
from wsi_mil.viewer.data import (
    ViewerData,
    ViewerError,
    patch_at,
    patch_scores,
    score_keys,
    score_values,
    top_patches,
)
from wsi_mil.viewer.tiles import OverlayTiles, SlideChangedError, SlideTiles, overlay_dzi

#: The package's own page, scripts and styles (committed) and OpenSeadragon (put there by the package build's npm step).
STATIC_DIR = Path(__file__).parent / "static"
OSD_FILE = Path("openseadragon") / "openseadragon.min.js"
MAX_TOP_K = 100

_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Everything comes from this server: no CDN, no inline script.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; frame-ancestors 'none'",
}


def check_static(static_dir: Path = STATIC_DIR) -> None:
    """Raise :class:`ViewerError` when OpenSeadragon has not been installed into ``static_dir``."""
    if not (static_dir / OSD_FILE).is_file():
        raise ViewerError(
            f"{static_dir / OSD_FILE}: OpenSeadragon is missing; install npm and run 'make install' "
            "(the package build runs npm install and npm run build, which copy it there)"
        )


def create_app(
    out: str | Path,
    run: str | None = None,
    *,
    backend: str = "openslide",
    colormap: str = "jet",
    static_dir: Path | None = None,
    require_static: bool = True,
    allowed_hosts: list[str] | None = None,
    token: str | None = None,
    max_open: int = 8,
    threads: int | None = None,
) -> Any:
    """Build the viewer app for one output folder.

    Parameters
    ----------
    out : path-like
        Cohort output folder (``OUT``).
    run : str, optional
        Heatmap run (``OUT/heatmaps/<run>``); default: the newest.
    backend : str
        Slide backend that reads the tiles.
    colormap : str
        matplotlib colormap of the overlay.
    static_dir : Path, optional
        Folder of the page's files (default: the package's ``static/``).
    require_static : bool
        Refuse to start without OpenSeadragon (HTTP tests of the API turn it off).
    allowed_hosts : list of str, optional
        Host headers accepted (guards a loopback server against DNS rebinding); None: any.
    token : str, optional
        Access token every request must carry (``?token=`` once, then the cookie it sets);
        None: no token (loopback only: :func:`~wsi_mil.viewer.server.serve` insists on one
        elsewhere).
    max_open : int
        Slides kept open at once (least recently used closed once no request reads it).
    threads : int, optional
        Worker threads of the sync routes (anyio's thread limiter); default
        :func:`default_threads`.

    Returns
    -------
    starlette.applications.Starlette

    Examples
    --------
    >>> from starlette.testclient import TestClient  # doctest: +SKIP
    >>> TestClient(create_app("demo_out")).get("/api/slides").json()  # doctest: +SKIP
    """
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    static_dir = Path(static_dir) if static_dir is not None else STATIC_DIR
    if require_static:
        check_static(static_dir)
    data = ViewerData(out, run)
    views = _Views(data, SlideTiles(backend, max_open=max_open), OverlayTiles(colormap), static_dir)
    get = ["GET", "HEAD"]
    routes = [
        Route("/", views.index, methods=get),
        Route("/api/slides", views.slides, methods=get),
        Route("/api/slides/{sid}", views.slide, methods=get),
        Route("/api/slides/{sid}/patch", views.patch, methods=get),
        Route("/api/slides/{sid}/top", views.top, methods=get),
        Route("/api/slides/{sid}/tissue", views.tissue, methods=get),
        Route("/slides/{sid}.dzi", views.slide_dzi, methods=get),
        Route("/slides/{sid}_files/{level:int}/{col:int}_{row:int}.{fmt}", views.slide_tile, methods=get),
        Route("/overlay/{sid}/{score}.dzi", views.overlay_dzi, methods=get),
        Route("/overlay/{sid}/{score}_files/{level:int}/{col:int}_{row:int}.{fmt}", views.overlay_tile, methods=get),
        Mount("/static", StaticFiles(directory=static_dir, follow_symlink=False), name="static"),
    ]
    middleware = [Middleware(_Headers)]
    if token is not None:
        from wsi_mil.viewer.auth import TokenGate

        middleware.append(Middleware(TokenGate, token=token))
    if allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    n_threads = threads if threads is not None else default_threads()

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        import anyio.to_thread

        # Starlette runs the sync routes in anyio's default thread pool; its limiter is per
        # event loop, so it is set here, once the loop runs.
        anyio.to_thread.current_default_thread_limiter().total_tokens = n_threads
        yield

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.data = data
    app.state.threads = n_threads
    return app


def default_threads() -> int:
    """Worker threads of the sync routes: 4 per CPU core, at least 8 and at most 32.

    A tile is CPU work (decode, resize, encode; about 10 ms) that releases the GIL in
    OpenSlide, libjpeg and zlib, so a few threads per core keep the cores busy while others
    wait on the disk. More threads would not add throughput; each one in flight can hold a
    slide open (see :class:`~wsi_mil.viewer.tiles.SlideTiles`) and a decoded tile in memory,
    so the cap bounds both. Requests beyond it wait in the event loop's queue.

    Examples
    --------
    >>> 8 <= default_threads() <= 32
    True
    """
    return min(32, max(8, 4 * (os.cpu_count() or 1)))


class _Headers:
    """Pure ASGI middleware: security headers on every response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for k, v in _SECURITY_HEADERS.items():
                    if k.lower().encode() not in names:
                        headers.append((k.lower().encode(), v.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _not_found(detail: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": detail}, status_code=404)


def _unreadable(detail: str) -> Any:
    """500: the slide is known but its file cannot be read (the reason names file and cause)."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": detail}, status_code=500)


def _changed(detail: str) -> Any:
    """409: the slide file is no longer the one that was tiled."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": detail}, status_code=409)


def _slide_failure(exc: WsiMilError) -> Any:
    return _changed(str(exc)) if isinstance(exc, SlideChangedError) else _unreadable(str(exc))


def _bad_request(detail: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": detail}, status_code=400)


class _Views:
    """Request handlers; sync, so Starlette runs them in its thread pool (slide reads block)."""

    def __init__(self, data: ViewerData, slides: SlideTiles, overlays: OverlayTiles, static_dir: Path) -> None:
        self.data, self.slides_tiles, self.overlays, self.static_dir = data, slides, overlays, static_dir

    # -- page and lists ------------------------------------------------------------------
    def index(self, request: Any) -> Any:
        from starlette.responses import FileResponse

        return FileResponse(self.static_dir / "index.html", media_type="text/html")

    def slides(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        d = self.data
        return JSONResponse(
            {
                "out": d.out.name,
                "run": d.run,
                "runs": d.runs,
                "slides": [rec.summary() for rec in d.slides.values()],
            }
        )

    def slide(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        rec = self.data.get(request.path_params["sid"])
        if rec is None:
            return _not_found("unknown slide")
        info: dict[str, Any] = rec.summary()
        hm = self.data.heatmap(rec.slide_id)
        dims = None
        if hm is not None:
            dims = [int(v) for v in hm.attrs[h5.ATTR_SLIDE_DIMENSIONS]]
            info.update(
                classes=hm.class_names,
                scores=score_keys(hm),
                patch_size=hm.patch_size_level0,
                n_patches=len(hm.coords),
                mpp=float(hm.attrs.get(h5.ATTR_MPP, math.nan)),
            )
        dzi = None
        if rec.path is not None:
            try:
                dims = list(self.slides_tiles.geometry(rec.slide_id, rec.path, rec.fingerprint).dimensions)
                dzi = f"/slides/{quote(rec.slide_id, safe='')}.dzi"
            except WsiMilError as exc:  # listed, but unreadable or changed: show the heatmap alone
                info["slide_error"] = str(exc)
        elif rec.slide_error is not None:
            info["slide_error"] = rec.slide_error
        info.update(
            dimensions=dims,
            dzi=dzi,
            colormap=self.overlays.colormap,
            legend=self.overlays.legend(),
        )
        return JSONResponse(info)

    # -- patches -------------------------------------------------------------------------
    def _heatmap(self, request: Any) -> Any:
        return self.data.heatmap(request.path_params["sid"])

    def patch(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        hm = self._heatmap(request)
        if hm is None:
            return _not_found("unknown slide or no heatmap")
        try:
            x, y = float(request.query_params["x"]), float(request.query_params["y"])
        except (KeyError, ValueError):
            return _bad_request("give level-0 coordinates as ?x=<number>&y=<number>")
        if not (math.isfinite(x) and math.isfinite(y)):
            return _bad_request("coordinates must be finite numbers")
        index = patch_at(hm, x, y)
        return JSONResponse({"patch": None if index is None else patch_scores(hm, index)})

    def top(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        hm = self._heatmap(request)
        if hm is None:
            return _not_found("unknown slide or no heatmap")
        try:
            k = int(request.query_params.get("k", "10"))
        except ValueError:
            return _bad_request("k must be an integer")
        patches = top_patches(hm, request.query_params.get("score", "attention"), min(max(k, 0), MAX_TOP_K))
        if patches is None:
            return _not_found("unknown score")
        return JSONResponse({"patches": patches})

    def tissue(self, request: Any) -> Any:
        from starlette.responses import FileResponse

        rec = self.data.get(request.path_params["sid"])
        if rec is None or rec.mask is None:
            return _not_found("unknown slide or no tissue mask")
        return FileResponse(rec.mask, media_type="application/geo+json")

    # -- Deep Zoom -----------------------------------------------------------------------
    def slide_dzi(self, request: Any) -> Any:
        from starlette.responses import Response

        rec = self.data.get(request.path_params["sid"])
        if rec is None or rec.path is None:
            return _not_found(rec.slide_error if rec and rec.slide_error else "unknown slide or slide file not found")
        try:
            xml = self.slides_tiles.dzi(rec.slide_id, rec.path, rec.fingerprint)
        except WsiMilError as exc:
            return _slide_failure(exc)
        return Response(xml, media_type="application/xml")

    def slide_tile(self, request: Any) -> Any:
        from starlette.responses import Response

        p = request.path_params
        rec = self.data.get(p["sid"])
        if rec is None or rec.path is None or p["fmt"] != "jpeg":
            return _not_found("unknown slide, slide file not found or tile format")
        try:
            tile = self.slides_tiles.tile(rec.slide_id, rec.path, p["level"], p["col"], p["row"], rec.fingerprint)
        except WsiMilError as exc:
            return _slide_failure(exc)
        if tile is None:
            return _not_found("no such tile")
        return Response(tile, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    def overlay_dzi(self, request: Any) -> Any:
        from starlette.responses import Response

        hm = self._heatmap(request)
        if hm is None or score_values(hm, request.path_params["score"]) is None:
            return _not_found("unknown slide, score or no heatmap")
        width, height = (int(v) for v in hm.attrs[h5.ATTR_SLIDE_DIMENSIONS])
        return Response(overlay_dzi(width, height), media_type="application/xml")

    def overlay_tile(self, request: Any) -> Any:
        from starlette.responses import Response

        p = request.path_params
        hm = self._heatmap(request)
        values = None if hm is None else score_values(hm, p["score"])
        if values is None or p["fmt"] != "png":
            return _not_found("unknown slide, score or tile format")
        tile = self.overlays.tile(p["sid"], hm, p["score"], values, p["level"], p["col"], p["row"])
        if tile is None:
            return _not_found("no such tile")
        return Response(tile, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
