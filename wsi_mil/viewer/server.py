"""Run the viewer: build the app, print its address, serve it with uvicorn until Ctrl-C."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable
from pathlib import Path

from wsi_mil.errors import WsiMilError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (the server is then private to this machine).

    Examples
    --------
    >>> is_loopback("127.0.0.1"), is_loopback("0.0.0.0")
    (True, False)
    """
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    out: str | Path,
    host: str = "127.0.0.1",
    port: int = 8765,
    run: str | None = None,
    open_browser: bool = False,
    *,
    backend: str = "openslide",
    colormap: str = "jet",
    echo: Callable[[str], None] = print,
) -> None:
    """Serve the viewer of ``out`` at ``http://host:port/`` until interrupted.

    Parameters
    ----------
    out : path-like
        Cohort output folder (``OUT``).
    host : str
        Interface to bind; the loopback default keeps the slides private to this machine.
    port : int
        TCP port.
    run : str, optional
        Heatmap run (``OUT/heatmaps/<run>``); default: the newest.
    open_browser : bool
        Open the page in the default browser once the server is up.
    backend, colormap : str
        Slide backend of the tiles; matplotlib colormap of the overlay.
    echo : callable
        Where the address and notes are printed.

    Examples
    --------
    >>> serve("demo_out", port=8765)  # doctest: +SKIP
    """
    import uvicorn

    from wsi_mil.viewer.app import create_app

    loopback = is_loopback(host)
    hosts = None
    if loopback:
        hosts = ["localhost", "127.0.0.1", "[::1]", "::1"]
    app = create_app(out, run, backend=backend, colormap=colormap, allowed_hosts=hosts)
    data = app.state.data
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else url_host}:{port}/"
    echo(
        f"viewing {len(data.slides)} slides of {data.out}"
        + (f" with heatmaps of run {data.run}" if data.run else " (no heatmaps found)")
    )
    if not loopback:
        echo(f"warning: bound to {host}: anyone who can reach this machine can see these slides")
    echo(f"open {url}   (Ctrl-C to stop)")
    if open_browser:
        import webbrowser

        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)
    except OSError as exc:  # port taken, address not available
        raise WsiMilError(f"cannot serve on {host}:{port} ({exc}); choose another --port") from exc
