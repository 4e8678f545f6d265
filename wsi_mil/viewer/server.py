"""Run the viewer: build the app, print its address, serve it with uvicorn until Ctrl-C."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from wsi_mil.errors import WsiMilError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
#: Connections plus requests in flight before uvicorn answers 503 (about 80 browser tabs).
LIMIT_CONCURRENCY = 512
#: Pending connections the kernel queues before accepting (uvicorn's default).
BACKLOG = 2048
#: Warning lines printed at start (refused ids, ignored path columns); the rest are counted.
MAX_WARNINGS = 20


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
    token: str | None = None,
    max_open: int = 8,
    threads: int | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Serve the viewer of ``out`` at ``http://host:port/`` until interrupted.

    Parameters
    ----------
    out : path-like
        Cohort output folder (``OUT``).
    host : str
        Interface to bind; the loopback default keeps the slides private to this machine.
        Any other address requires an access token.
    port : int
        TCP port.
    run : str, optional
        Heatmap run (``OUT/heatmaps/<run>``); default: the newest.
    open_browser : bool
        Open the page in the default browser once the server is up.
    backend, colormap : str
        Slide backend of the tiles; matplotlib colormap of the overlay.
    token : str, optional
        Access token. Off loopback one is generated when not given; on loopback none is
        needed unless given. Printed in the address (``?token=...``).
    max_open : int
        Slides kept open at once.
    threads : int, optional
        Worker threads of the tile routes (default :func:`~wsi_mil.viewer.app.default_threads`).
    echo : callable
        Where the address and notes are printed.

    Examples
    --------
    >>> serve("demo_out", port=8765)  # doctest: +SKIP
    """
    import uvicorn

    from wsi_mil.viewer.app import create_app
    from wsi_mil.viewer.auth import check_token, new_token

    loopback = is_loopback(host)
    hosts = None
    if loopback:
        hosts = ["localhost", "127.0.0.1", "[::1]", "::1"]
    if token is not None:
        check_token(token)
    elif not loopback:
        token = new_token()
    app = create_app(
        out, run, backend=backend, colormap=colormap, allowed_hosts=hosts, token=token, max_open=max_open,
        threads=threads,
    )  # fmt: skip
    data = app.state.data
    for line in data.warnings[:MAX_WARNINGS]:
        echo(f"warning: {line}")
    if len(data.warnings) > MAX_WARNINGS:
        echo(f"warning: … and {len(data.warnings) - MAX_WARNINGS} more rows skipped or ignored")
    query = f"?token={token}" if token else ""
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else url_host}:{port}/{query}"
    echo(
        f"viewing {len(data.slides)} slides of {data.out}"
        + (f" with heatmaps of run {data.run}" if data.run else " (no heatmaps found)")
    )
    if not loopback:
        echo(f"bound to {host}: only requests with the access token are answered; share the address with care")
        if host in ("0.0.0.0", "::"):
            echo(f"on the network: http://{socket.gethostname()}:{port}/{query}")
    echo(f"open {url}   (Ctrl-C to stop)")
    if open_browser:
        import webbrowser

        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    try:
        # limit_concurrency: past this many connections and requests in flight, new ones get
        # an immediate 503 instead of queueing without bound; a browser opens about 6.
        uvicorn.run(
            app, host=host, port=port, log_level="warning", server_header=False,
            limit_concurrency=LIMIT_CONCURRENCY, backlog=BACKLOG,
        )  # fmt: skip
    except OSError as exc:  # port taken, address not available
        raise WsiMilError(f"cannot serve on {host}:{port} ({exc}); choose another --port") from exc
