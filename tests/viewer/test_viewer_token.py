"""Sharing: off loopback every request needs the access token (URL once, then the cookie).

Real servers: ``wsi-mil view`` in a child process, bound to 0.0.0.0 (reached through this
machine's non-loopback address when it has one) and to loopback, with and without a token.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.viewer.conftest import ViewerOut
from wsi_mil.viewer import _load as load

TOKEN = "a-shared-token-of-32-characters-"


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback, if it has one (the default route's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP: picks the outgoing interface, sends nothing
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def _serve(out: Path, log: Path, *extra: str, host: str = "127.0.0.1", env: dict[str, str] | None = None) -> Iterator:
    port = load.free_port()
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        proc = load.start_server(load.server_command(out, port, *extra, host=host), f"http://127.0.0.1:{port}", log)
    finally:
        os.environ.clear()
        os.environ.update(old)
    try:
        yield port, proc
    finally:
        load.stop_server(proc)


@pytest.fixture(scope="module")
def shared(viewer_out: ViewerOut, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """``wsi-mil view --host 0.0.0.0``: (base URL to reach it, printed token, printed output)."""
    log = tmp_path_factory.mktemp("shared") / "server.log"
    for port, _ in _serve(viewer_out.out, log, host="0.0.0.0"):
        printed = log.read_text()
        token = re.search(rf"open http://127\.0\.0\.1:{port}/\?token=([A-Za-z0-9_-]+)", printed).group(1)
        yield f"http://{_non_loopback_address() or '127.0.0.1'}:{port}", token, printed


def _cookie_header(headers: list[str]) -> str:
    return "; ".join(h.split(";", 1)[0] for h in headers)


def test_off_loopback_a_token_is_generated_and_printed(shared: tuple[str, str, str]) -> None:
    _, token, printed = shared
    assert len(token) >= 40  # secrets.token_urlsafe(32)
    assert "only requests with the access token are answered" in printed


@pytest.mark.parametrize("path", ["/", "/api/slides", "/api/slides/case_1", "/slides/case_1.dzi", "/static/viewer.js"])
def test_off_loopback_no_token_is_403(shared: tuple[str, str, str], path: str) -> None:
    base, token, _ = shared
    status, body = load.get(base + path)
    assert status == 403 and b"access token" in body
    assert load.get(f"{base}{path}?token={token[:-1]}x")[0] == 403  # a wrong token
    assert load.get(base + path, headers={"Cookie": f"wsi_mil_token_{base.rsplit(':', 1)[1]}=nope"})[0] == 403


def test_off_loopback_token_in_url_then_cookie(shared: tuple[str, str, str]) -> None:
    import urllib.request

    base, token, _ = shared
    port = base.rsplit(":", 1)[1]
    with urllib.request.urlopen(f"{base}/?token={token}", timeout=10) as r:
        assert r.status == 200 and b"<html" in r.read().lower()
        cookies = r.headers.get_all("Set-Cookie")
    assert len(cookies) == 1
    cookie = cookies[0]
    assert cookie.startswith(f"wsi_mil_token_{port}={token};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    # The page's later requests carry only the cookie.
    jar = {"Cookie": _cookie_header(cookies)}
    status, body = load.get(f"{base}/api/slides", headers=jar)
    assert status == 200 and b"case_1" in body
    assert load.get(f"{base}/slides/case_1_files/0/0_0.jpeg", headers=jar)[0] == 200
    assert load.get(f"{base}/overlay/case_1/attention_files/0/0_0.png", headers=jar)[0] == 200


def test_off_loopback_still_read_only(shared: tuple[str, str, str]) -> None:
    import urllib.error
    import urllib.request

    base, token, _ = shared
    req = urllib.request.Request(f"{base}/api/slides?token={token}", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 405


def test_loopback_needs_no_token(viewer_out: ViewerOut, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    for port, _ in _serve(viewer_out.out, log):
        assert load.get(f"http://127.0.0.1:{port}/api/slides")[0] == 200
        assert "token" not in log.read_text()


def test_loopback_with_a_token_from_the_environment_needs_it(viewer_out: ViewerOut, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    for port, _ in _serve(viewer_out.out, log, env={"WSI_MIL_VIEW_TOKEN": TOKEN}):
        base = f"http://127.0.0.1:{port}"
        assert f"open {base}/?token={TOKEN}" in log.read_text()
        assert load.get(f"{base}/api/slides")[0] == 403
        assert load.get(f"{base}/api/slides?token={TOKEN}")[0] == 200
