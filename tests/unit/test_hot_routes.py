"""``chittycan.routing.HotRoutes``: which requests go straight to a /v1 consumer, which go on."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from django.urls import resolve

from chittycan.routing import HOT, PROBES, HotRoutes


class _Recorder:
    """Stands in for a consumer class (a new instance per request) and for the app behind."""

    def __init__(self, name: str, seen: list[tuple[str, str]]) -> None:
        self.name, self.seen = name, seen

    def __call__(self) -> Any:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            self.seen.append((self.name, scope["path"]))

        return app


def _route(path: str, *, kind: str = "http", root_path: str = "", method: str = "POST") -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    behind = _Recorder("django", seen)()
    router = HotRoutes(behind, {"v1/chat/completions": _Recorder("chat", seen)}, {"healthz": _Recorder("probe", seen)})
    scope: dict[str, Any] = {"type": kind, "path": path, "root_path": root_path}
    if kind == "http":
        scope["method"] = method
    asyncio.run(router(scope, None, None))
    return seen


@pytest.mark.parametrize(
    ("path", "kind", "root_path", "served_by"),
    [
        ("/v1/chat/completions", "http", "", "chat"),
        ("/gateway/v1/chat/completions", "http", "/gateway", "chat"),  # mounted under a prefix
        ("/v1/chat/completions/", "http", "", "django"),  # exact paths only, as path() matched
        ("/v1/chat/completionsX", "http", "", "django"),
        ("/v1/models", "http", "", "django"),
        ("/v1/chat/completions", "websocket", "", "django"),
    ],
)
def test_only_exact_hot_paths_skip_the_routers(path: str, kind: str, root_path: str, served_by: str) -> None:
    assert _route(path, kind=kind, root_path=root_path) == [(served_by, path)]


@pytest.mark.parametrize(
    ("path", "method", "served_by"),
    [
        ("/healthz", "GET", "probe"),
        ("/healthz", "HEAD", "probe"),
        ("/healthz", "POST", "django"),  # the probes answer GET and HEAD; Django's views the rest
        ("/healthz/", "GET", "django"),
        ("/v1/chat/completions", "GET", "chat"),  # the consumer answers 405 in the API's envelope
    ],
)
def test_probes_skip_the_routers_for_get_and_head(path: str, method: str, served_by: str) -> None:
    assert _route(path, method=method) == [(served_by, path)]


def test_every_probe_has_a_django_view_of_the_same_path() -> None:
    for name in PROBES:
        assert resolve(f"/{name}").func.__module__ == "chittycan.probes"


def test_every_hot_path_is_a_v1_route_with_its_own_consumer() -> None:
    assert all(p.startswith("v1/") and not p.endswith("/") for p in HOT)
    assert HOT["v1/chat/completions"].wire.endpoint == "chat"
    assert HOT["v1/messages"].wire is not HOT["v1/chat/completions"].wire
