"""Who may see arguments and tracebacks and press the dashboard's buttons.

Only a browser that presented the token. The token never travels again after the login:
the session cookie is an HMAC keyed by it (so no server-side state, and changing the
token ends every session), and each form carries a CSRF value bound to that session. A
state-changing POST needs all three: the cookie, its CSRF value, and an Origin (or
Referer) naming this very host, so another site can neither forge nor replay one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Callable, Mapping, Optional
from urllib.parse import urlsplit

SESSION_COOKIE = "procqueue_dashboard"
SESSION_SECONDS = 12 * 3600


class Sessions:
    def __init__(self, token: Optional[str], *, clock: Callable[[], float] = time.time) -> None:
        self.token = token
        self.clock = clock
        self.key = hmac.new(token.encode(), b"procqueue dashboard sessions", hashlib.sha256).digest() if token else b""

    @property
    def configured(self) -> bool:
        return self.token is not None

    def token_matches(self, offered: str) -> bool:
        """Constant time, whatever the lengths: both sides are hashed first."""
        if self.token is None:
            return False
        return hmac.compare_digest(hashlib.sha256(offered.encode("utf-8", "replace")).digest(),
                                   hashlib.sha256(self.token.encode()).digest())

    def new_session(self) -> str:
        body = f"{int(self.clock())}.{secrets.token_hex(16)}"
        return f"{body}.{self._mac('session ' + body)}"

    def valid(self, session: Optional[str]) -> bool:
        if not self.configured or not session or session.count(".") != 2:
            return False
        body, _, mac = session.rpartition(".")
        if not hmac.compare_digest(mac, self._mac("session " + body)):
            return False
        issued = body.partition(".")[0]
        return issued.isdigit() and 0 <= self.clock() - int(issued) < SESSION_SECONDS

    def csrf_for(self, session: str) -> str:
        return self._mac("csrf " + session)

    def csrf_valid(self, session: str, offered: str) -> bool:
        return hmac.compare_digest(offered.encode("utf-8", "replace"), self.csrf_for(session).encode())

    def _mac(self, message: str) -> str:
        return hmac.new(self.key, message.encode(), hashlib.sha256).hexdigest()


def session_from(headers: Mapping[str, str]) -> Optional[str]:
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == SESSION_COOKIE:
            return value
    return None


def session_cookie(session: str) -> str:
    return f"{SESSION_COOKIE}={session}; Path=/; Max-Age={SESSION_SECONDS}; HttpOnly; SameSite=Strict"


def expired_cookie() -> str:
    return f"{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"


def same_origin(headers: Mapping[str, str]) -> bool:
    """The request came from a page of this host: its Origin (or, without one, its
    Referer) names the host the request was sent to. Neither: refused."""
    host = headers.get("host", "").lower()
    source = headers.get("origin") or headers.get("referer") or ""
    if not host or source in ("", "null"):
        return False
    try:
        parts = urlsplit(source)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host
