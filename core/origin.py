"""Where the current control-plane change comes from, for the audit log.

A context variable holds the surface (``admin``, ``api``, ``dashboard``, ``cli``, ``task``...), the
client's address and user agent, the operating-system user of a command, and the Django request (so
the audit writer can name the person a view or DRF authenticated). ``OriginMiddleware`` sets it for
every Django request; the ``can`` entry point sets it for commands; Celery sets it for tasks.
``tenants.audit.record()`` reads it.
"""

from __future__ import annotations

import getpass
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

__all__ = [
    "Origin",
    "OriginMiddleware",
    "current",
    "enter",
    "for_command",
    "for_request",
    "leave",
    "surface_of",
    "using",
]

USER_AGENT_MAX = 300

#: URL prefix -> surface name; any other Django request is ``http``.
SURFACES: tuple[tuple[str, str], ...] = (
    ("/admin/", "admin"),
    ("/api/", "api"),
    ("/dashboard/", "dashboard"),
)


@dataclass(frozen=True)
class Origin:
    surface: str = ""
    address: str = ""
    user_agent: str = ""
    os_user: str = ""
    request: HttpRequest | None = None

    def user(self) -> Any:
        """The authenticated Django user of the request (None outside a request or when anonymous)."""
        user = getattr(self.request, "user", None) if self.request is not None else None
        return user if user is not None and getattr(user, "is_authenticated", False) else None


_NOWHERE = Origin()
_current: ContextVar[Origin | None] = ContextVar("chittycan_origin", default=None)


def current() -> Origin:
    return _current.get() or _NOWHERE


def enter(origin: Origin) -> Token[Origin | None]:
    """Make ``origin`` current until ``leave(token)`` (for hooks that cannot wrap a block)."""
    return _current.set(origin)


def leave(token: Token[Origin | None]) -> None:
    _current.reset(token)


@contextmanager
def using(origin: Origin) -> Iterator[Origin]:
    """Make ``origin`` the current one inside the block."""
    token = _current.set(origin)
    try:
        yield origin
    finally:
        _current.reset(token)


def surface_of(path: str) -> str:
    for prefix, name in SURFACES:
        if path.startswith(prefix):
            return name
    return "http"


def for_request(request: HttpRequest) -> Origin:
    """The origin of a Django request: surface by URL, the peer's address (with any
    ``X-Forwarded-For`` a proxy added, as given), the user agent."""
    address = str(request.META.get("REMOTE_ADDR") or "")
    forwarded = str(request.META.get("HTTP_X_FORWARDED_FOR") or "").strip()
    if forwarded:
        address = f"{address} (forwarded for {forwarded})"
    return Origin(
        surface=surface_of(request.path),
        address=address[:255],
        user_agent=str(request.META.get("HTTP_USER_AGENT") or "")[:USER_AGENT_MAX],
        request=request,
    )


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (some containers)
        return ""


def for_command(surface: str = "cli", command: str = "") -> Origin:
    """The origin of a command run on this host: the OS user and the host name."""
    return Origin(
        surface=surface,
        address=socket.gethostname()[:255],
        user_agent=command[:USER_AGENT_MAX],
        os_user=_os_user(),
    )


class OriginMiddleware:
    """Sets the audit origin for the duration of every Django request; sync and async capable."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.is_async:
            return self._acall(request)
        with using(for_request(request)):
            response: HttpResponseBase = self.get_response(request)
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        with using(for_request(request)):
            response: HttpResponseBase = await self.get_response(request)
        return response
