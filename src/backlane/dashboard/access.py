"""Who may see and steer the dashboard, and how its forms are protected.

The rule, decided once when the dashboard is built:

1. **A dependency of yours** (``dashboard_auth=``): it alone decides. It runs on every
   page, action and the metrics endpoint, as any FastAPI dependency, and refuses by raising
   (``HTTPException(401)`` or ``403``). Use it to plug in your own login or SSO.
2. Else **a token** from ``BACKLANE_DASHBOARD_TOKEN`` (at least 16 characters), if set:
   required on every request, from anywhere, loopback included. It comes as
   ``Authorization: Bearer <token>`` (scripts, Prometheus) or through the login form,
   which sets an HttpOnly, SameSite=Strict session cookie (a signature of the token and
   the login time, never the token itself; valid 12 hours; ``Secure`` over HTTPS).
   Comparisons are constant-time.
3. Else **loopback only**: a request is served only if it reached the server on a loopback
   address (``scope["server"]``: the local address of the connection), names a loopback
   host in its ``Host`` header (which also defeats DNS rebinding), and carries no proxy
   header (``Forwarded``, ``X-Forwarded-For``/``-Host``/``-Proto``, ``X-Real-IP``).
   Everything else gets 401 with a page saying how to set a token. The client's address is
   never taken as proof: behind a reverse proxy on the same host every client looks local.

A reverse proxy on the same host that forwards to a loopback port, rewrites ``Host`` to
that address and adds no proxy header is indistinguishable from a local browser: set a
token (or a dependency) whenever anything proxies to the app.

Actions are POST forms, checked twice against cross-site requests: an ``Origin`` header,
when present, must name this host, and the form's ``csrf`` field must equal the
``backlane_csrf`` cookie (random per browser, HttpOnly, SameSite=Strict). A request
authenticated by an ``Authorization`` header (which a browser never adds cross-site) needs
neither.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from ..exceptions import ConfigurationError

TOKEN_ENV = "BACKLANE_DASHBOARD_TOKEN"
MIN_TOKEN_LENGTH = 16
SESSION_COOKIE = "backlane_session"
CSRF_COOKIE = "backlane_csrf"
SESSION_SECONDS = 12 * 3600.0
PROXY_HEADERS = (
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
)

Mode = Literal["dependency", "token", "loopback"]


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is loopback:
    ``localhost``, ``*.localhost``, 127.0.0.0/8 or ::1."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_without_port(host_header: str) -> str:
    """The host part of a ``Host`` header (``example.com:8000``, ``[::1]:8000``)."""
    value = host_header.strip()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def token_from_environment() -> str | None:
    """The dashboard token from ``BACKLANE_DASHBOARD_TOKEN``; None if unset or empty.
    Raises ``ConfigurationError`` for a token shorter than 16 characters."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        return None
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigurationError(
            f"{TOKEN_ENV} is {len(token)} characters long; use at least {MIN_TOKEN_LENGTH} "
            "random ones, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return token


def is_local_request(request: Request) -> bool:
    """Whether ``request`` came straight to a loopback address, for a loopback host name,
    through no proxy (rule 3 of the module docstring)."""
    server = request.scope.get("server")
    if not server or not isinstance(server[0], str) or not is_loopback_host(server[0]):
        return False
    if not is_loopback_host(host_without_port(request.headers.get("host", ""))):
        return False
    return not any(name in request.headers for name in PROXY_HEADERS)


@dataclass(frozen=True)
class Access:
    """The dashboard's access rule (see the module docstring) and its cookies."""

    mode: Mode
    token: str | None = None
    cookie_path: str = "/"

    @classmethod
    def decide(cls, *, auth: Callable[..., Any] | None, cookie_path: str) -> Access:
        """The rule for a dashboard: ``auth`` if given, else the environment's token, else
        loopback only."""
        if auth is not None:
            return cls("dependency", cookie_path=cookie_path)
        token = token_from_environment()
        if token is not None:
            return cls("token", token=token, cookie_path=cookie_path)
        return cls("loopback", cookie_path=cookie_path)

    # -- who is asking ---------------------------------------------------------------

    def bearer_ok(self, request: Request) -> bool:
        """Whether the request carries the token in ``Authorization: Bearer``."""
        if self.token is None:
            return False
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and _same(value.strip(), self.token)

    def session_ok(self, request: Request) -> bool:
        """Whether the request carries a valid, unexpired session cookie."""
        if self.token is None:
            return False
        cookie = request.cookies.get(SESSION_COOKIE, "")
        issued_text, _, mac = cookie.partition(".")
        try:
            issued = int(issued_text)
        except ValueError:
            return False
        age = time.time() - issued
        if not -60 <= age <= SESSION_SECONDS:
            return False
        return _same(mac, self._session_mac(issued))

    def allowed(self, request: Request) -> bool:
        """Whether the built-in rule lets ``request`` in (always True in dependency mode,
        where the user's dependency decides)."""
        if self.mode == "dependency":
            return True
        if self.mode == "token":
            return self.bearer_ok(request) or self.session_ok(request)
        return is_local_request(request)

    def check_login(self, offered: str) -> bool:
        """Whether a token typed into the login form is the right one (constant time)."""
        return self.token is not None and _same(offered.strip(), self.token)

    # -- cookies ---------------------------------------------------------------------

    def start_session(self, response: Response, request: Request) -> None:
        """Set the session cookie on ``response`` (after a successful login)."""
        issued = int(time.time())
        response.set_cookie(
            SESSION_COOKIE,
            f"{issued}.{self._session_mac(issued)}",
            max_age=int(SESSION_SECONDS),
            path=self.cookie_path_for(request),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def end_session(self, response: Response, request: Request) -> None:
        response.delete_cookie(
            SESSION_COOKIE, path=self.cookie_path_for(request), httponly=True, samesite="strict"
        )

    def cookie_path_for(self, request: Request) -> str:
        """The path the cookies apply to: ``cookie_path`` under the app's root path (an
        app mounted at ``/admin``, or served with ``--root-path``)."""
        return str(request.scope.get("root_path", "")) + self.cookie_path

    def csrf_token(self, request: Request) -> tuple[str, bool]:
        """This browser's CSRF token, and whether it is new (then ``set_csrf`` it)."""
        current = request.cookies.get(CSRF_COOKIE, "")
        if len(current) >= 32:
            return current, False
        return secrets.token_urlsafe(32), True

    def set_csrf(self, response: Response, request: Request, token: str) -> None:
        response.set_cookie(
            CSRF_COOKIE,
            token,
            path=self.cookie_path_for(request),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def csrf_ok(self, request: Request, form: dict[str, str]) -> bool:
        """Whether a POST is this dashboard's own: a header-authenticated request, or a
        same-origin one whose ``csrf`` field matches the cookie."""
        if self.mode == "token" and self.bearer_ok(request):
            return True
        if not same_origin(request):
            return False
        cookie = request.cookies.get(CSRF_COOKIE, "")
        return len(cookie) >= 32 and _same(form.get("csrf", ""), cookie)

    def _session_mac(self, issued: int) -> str:
        assert self.token is not None
        message = f"backlane-dashboard-session:{issued}".encode()
        return hmac.new(self.token.encode(), message, hashlib.sha256).hexdigest()


def same_origin(request: Request) -> bool:
    """False when the request names an ``Origin`` (or, lacking one, a ``Referer``) other
    than its own host, or one that is no URL; True when it names this host or neither."""
    origin = request.headers.get("origin")
    if origin is None:
        referer = request.headers.get("referer")
        if referer is None:
            return True
        origin = referer
    if origin == "null":
        return False
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # "http://[": an unclosed IPv6 address
        return False
    return netloc.lower() == request.headers.get("host", "").lower()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())
