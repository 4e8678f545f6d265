"""The viewer's access token: required off loopback, given once in the URL, then kept in a cookie.

As Jupyter does it: ``wsi-mil view OUT --host 0.0.0.0`` generates a token
(:func:`secrets.token_urlsafe`) and prints ``http://host:port/?token=...``. The first
request that carries ``?token=`` gets the token back as a cookie (``HttpOnly``,
``SameSite=Strict``, named after the port so two viewers on one machine keep theirs), and
every later request of the page (API calls, tiles) sends the cookie. Anything else gets 403.
Tokens are compared with :func:`secrets.compare_digest`.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from wsi_mil.viewer.data import ViewerError

#: Query parameter of the token.
QUERY = "token"
#: Cookie name prefix; the server's port is appended.
COOKIE_PREFIX = "wsi_mil_token_"
#: Shortest token accepted (a generated one has 43 characters).
MIN_CHARS = 16
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~-]+")


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe).

    Examples
    --------
    >>> len(new_token()) >= MIN_CHARS
    True
    """
    return secrets.token_urlsafe(32)


def check_token(token: str, where: str = "--token") -> str:
    """Return ``token`` or raise :class:`ViewerError` when it is too short or not URL-safe.

    Examples
    --------
    >>> check_token("a" * 16)
    'aaaaaaaaaaaaaaaa'
    """
    if len(token) < MIN_CHARS:
        raise ViewerError(f"{where}: the access token has {len(token)} characters; give at least {MIN_CHARS}")
    if not _TOKEN_CHARS.fullmatch(token):
        raise ViewerError(f"{where}: the access token may hold only letters, digits and . _ ~ -")
    return token


def cookie_name(port: int | None) -> str:
    """The cookie of the viewer on ``port``."""
    return f"{COOKIE_PREFIX}{port or 0}"


class TokenGate:
    """Pure ASGI middleware: 403 unless the request carries the token (query or cookie).

    Parameters
    ----------
    app : ASGI app
        The viewer.
    token : str
        The access token.
    """

    def __init__(self, app: Any, token: str) -> None:
        self.app, self._token = app, token.encode()

    def _matches(self, given: str | None) -> bool:
        return given is not None and secrets.compare_digest(given.encode("utf-8", "surrogatepass"), self._token)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.requests import HTTPConnection

        conn = HTTPConnection(scope)
        port = (scope.get("server") or (None, None))[1]
        name = cookie_name(port)
        if self._matches(conn.query_params.get(QUERY)):
            cookie = f"{name}={self._token.decode()}; Path=/; HttpOnly; SameSite=Strict"

            async def send_with_cookie(message: Any) -> None:
                if message["type"] == "http.response.start":
                    headers = [*message.get("headers", []), (b"set-cookie", cookie.encode())]
                    message = {**message, "headers": headers}
                await send(message)

            await self.app(scope, receive, send_with_cookie)
        elif self._matches(conn.cookies.get(name)):
            await self.app(scope, receive, send)
        else:
            body = json.dumps(
                {"error": "this viewer needs its access token: open the address 'wsi-mil view' printed (?token=...)"}
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
