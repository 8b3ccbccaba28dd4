"""Test harness: a real gateway (ASGI server on a free port) against fake upstreams on loopback,
with the real PostgreSQL and Redis, driven by the official SDKs.

Run through ``make test`` (which starts PostgreSQL and Redis if needed and sets DATABASE_URL and
REDIS_URL). Tests that need the gateway use ``transactional_db`` so what they create is committed
and visible to the server's threads.

``tests/unit/`` holds the tests of pure functions: they need none of this and also run alone with
no services (``make test-unit``); its conftest opts them out of the per-test reset below.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
from django.conf import settings
from django.contrib.auth.hashers import get_hashers, get_hashers_by_algorithm

from tests import db_reset, hashing
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.server import ServerThread

UNIT_TESTS = Path(__file__).resolve().parent / "unit"

# The fake upstreams and webhook receivers listen on loopback, which the egress policy refuses
# unless the operator allows it (core.egress, docs/security.md): the suite allows it, for this
# process and for the gateway processes some tests start. tests/test_egress.py narrows it again.
TEST_EGRESS_ALLOW = "127.0.0.1,::1,localhost"
os.environ["CHITTYCAN_EGRESS_ALLOW"] = TEST_EGRESS_ALLOW
settings.CHITTYCAN_EGRESS_ALLOW = TEST_EGRESS_ALLOW

# Test-only: users' passwords hashed at 1,000 PBKDF2 iterations, not 1,000,000 (tests/hashing.py).
settings.PASSWORD_HASHERS = hashing.quick_first(list(settings.PASSWORD_HASHERS))
for cached in (get_hashers, get_hashers_by_algorithm):
    cast(Any, cached).cache_clear()  # lru_cache'd; override_settings would clear them the same way


def pytest_collection_finish(session: pytest.Session) -> None:
    """Refuse to run service-backed tests (everything outside tests/unit/) on the embedded
    defaults; a run of unit tests only needs no services."""
    if all(item.path.resolve().is_relative_to(UNIT_TESTS) for item in session.items):
        return
    db = settings.DATABASES["default"]["ENGINE"]
    if "postgresql" not in db or not settings.REDIS_URL:
        raise pytest.UsageError(
            "The suite runs against real PostgreSQL and Redis: run it with `make test`, or set "
            "DATABASE_URL=postgres://... and REDIS_URL=redis://... yourself. "
            "`make test-unit` runs tests/unit/ without them."
        )


db_reset.install()  # each transactional test ends with db_reset.fast_flush, not Django's flush


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> None:
    """pytest-django's test database, with commits that do not wait for the disk and the content
    types and permissions noted for the fast per-test reset (tests/db_reset.py)."""
    with django_db_blocker.unblock():
        db_reset.relax_commit_durability()
        db_reset.take_registry_digest()


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[tuple[FakeOpenAI, ServerThread]]:
    app = FakeOpenAI()
    server = ServerThread(app, name="fake-openai").start()
    yield app, server
    server.stop()


@pytest.fixture(scope="session")
def gateway_server(django_db_setup: Any, django_db_blocker: Any) -> Iterator[ServerThread]:
    """The real gateway ASGI app, served by uvicorn in a thread against the test database."""
    django_db_blocker.unblock()  # the server's own threads use the database between tests too
    # As `make install` and the image build do: the admin's CSS and JS into STATIC_ROOT (a fresh
    # directory per run), which the served app indexes when it is built.
    from django.core.management import call_command

    call_command("collectstatic", interactive=False, verbosity=0)
    from chittycan.asgi import application
    from chittycan.http_protocol import CoalescingHttpToolsProtocol

    # The HTTP protocol `can serve` gives uvicorn (writes of one loop turn sent together).
    server = ServerThread(application, name="gateway", http=CoalescingHttpToolsProtocol).start()
    RUNNING_GATEWAYS.append(server)
    yield server
    RUNNING_GATEWAYS.remove(server)
    from core import runtime
    from gateway import http

    async def shutdown() -> None:
        await runtime.stop_background()
        await http.aclose()

    server.call_soon(shutdown)
    server.stop()
    # The server's worker threads keep database connections open; close them so the test
    # database can be dropped.
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )


RUNNING_GATEWAYS: list[ServerThread] = []


@pytest.fixture
def paused_gateway_writer() -> Iterator[None]:
    """Stop the in-process gateway's background tasks (its usage writer) for a test that drives
    the usage stream itself; the gateway restarts them on its next request."""
    from core import runtime

    for server in RUNNING_GATEWAYS:
        server.call_soon(runtime.stop_background)
    yield


def _flush_redis() -> None:
    import redis

    conn = redis.Redis.from_url(settings.REDIS_URL)
    for key in conn.scan_iter(f"{settings.REDIS_PREFIX}:*", count=1000):
        conn.delete(key)
    conn.close()


def _wait_usage_drained(timeout: float = 5.0) -> None:
    """Wait until the usage writer has written every queued row (the stream is empty)."""
    import redis

    from ledger import writer

    conn = redis.Redis.from_url(settings.REDIS_URL)
    deadline = time.monotonic() + timeout
    try:
        time.sleep(0.05)  # a row handed off just after the response ended
        while conn.xlen(writer.stream_key()) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        conn.close()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Before the database is flushed, let the asynchronous writer finish this test's rows, so
    they never land in the next test's (emptied) ledger."""
    if "gateway_server" in getattr(item, "fixturenames", ()):
        _wait_usage_drained()


def _drop_routing_memory() -> None:
    """What each process remembers about deployments (breaker snapshots, latency averages,
    outlier ejections, in-flight counts) is keyed by provider and upstream model, names every
    test reuses: a test starts with none of an earlier test's."""
    from gateway.routing import breaker, health, inflight, latency

    breaker.reset_local()
    health.reset_local()
    inflight.reset_local()
    latency.reset()


@pytest.fixture(autouse=True)
def _fresh_state(request: pytest.FixtureRequest) -> Iterator[None]:
    from core import invalidation
    from ledger import writer

    _flush_redis()
    writer._memory_queue.clear()  # embedded mode's queue: a row an earlier test left is not this test's
    invalidation.drop_local()
    _drop_routing_memory()
    if "fake_openai" in request.fixturenames:
        request.getfixturevalue("fake_openai")[0].reset()
    yield
    invalidation.drop_local()


# --- data helpers -------------------------------------------------------------------------------


@pytest.fixture
def make_tenant(transactional_db: Any) -> Callable[..., Any]:
    from tenants import services

    def make(slug: str, parent: Any = None, **kwargs: Any) -> Any:
        return services.tenant_create(slug=slug, parent=parent, **kwargs)

    return make


@pytest.fixture
def make_key(transactional_db: Any) -> Callable[..., str]:
    from tenants import services

    def make(tenant: Any, **kwargs: Any) -> str:
        _, plaintext = services.key_issue(tenant=tenant, **kwargs)
        return plaintext

    return make


def add_model(
    name: str,
    provider: Any,
    *,
    kind: str = "chat",
    upstream: str | None = None,
    prices: tuple[str, ...] = ("2.50", "1.25", "10.00"),
    priority: int = 0,
    max_output_tokens: int = 4096,
    aliases: list[str] | None = None,
) -> Any:
    from gateway.models import Deployment, LLMModel, Price

    model, _ = LLMModel.objects.get_or_create(
        name=name, defaults={"kind": kind, "max_output_tokens": max_output_tokens, "aliases": aliases or []}
    )
    Deployment.objects.create(model=model, provider=provider, upstream_model=upstream or name, priority=priority)
    if not model.prices.exists():
        inp, cached, out = (Decimal(p) for p in prices)
        Price.objects.create(
            model=model,
            effective_from=time_zero(),
            input_per_mtok=inp,
            cached_input_per_mtok=cached,
            output_per_mtok=out,
        )
    return model


def time_zero() -> Any:
    from datetime import UTC, datetime

    return datetime(2020, 1, 1, tzinfo=UTC)


@pytest.fixture
def upstream(transactional_db: Any, fake_openai: tuple[FakeOpenAI, ServerThread]) -> FakeOpenAI:
    """An OpenAI-compatible provider pointing at the fake, with chat, embedding and completion models."""
    from gateway.models import Provider

    app, server = fake_openai
    provider = Provider(slug="fake-openai", kind="openai", base_url=f"{server.url}/v1", max_retries=1)
    provider.api_key = "sk-upstream-secret"
    provider.save()
    add_model("gpt-4o", provider, upstream="gpt-4o-2024-08-06")
    add_model("text-embedding-3-small", provider, kind="embedding", prices=("0.02", "0.02", "0"))
    add_model("gpt-3.5-turbo-instruct", provider, kind="completion", prices=("1.50", "1.50", "2.00"))
    return app


@pytest.fixture
def tenant_key(make_tenant: Callable[..., Any], make_key: Callable[..., str]) -> tuple[Any, str]:
    tenant = make_tenant("acme")
    return tenant, make_key(tenant, name="test")


@pytest.fixture
def openai_client(gateway_server: ServerThread, tenant_key: tuple[Any, str]) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=tenant_key[1], max_retries=0)


def wait_usage(count: int, timeout: float = 10.0, **filters: Any) -> list[Any]:
    """Wait until the ledger holds ``count`` rows matching ``filters`` (the writer is asynchronous)."""
    from ledger.models import UsageRecord

    deadline = time.monotonic() + timeout
    while True:
        rows = list(UsageRecord.objects.filter(**filters).order_by("created_at"))
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


@pytest.fixture(scope="session")
def fake_ollama_server() -> Iterator[tuple[Any, ServerThread]]:
    from tests.fakes.ollama_upstream import FakeOllama

    app = FakeOllama()
    server = ServerThread(app, name="fake-ollama").start()
    yield app, server
    server.stop()


@pytest.fixture
def fake_ollama(fake_ollama_server: tuple[Any, ServerThread]) -> Any:
    """The fake native Ollama server, its recorded requests cleared (``.url`` is its base URL)."""
    app, server = fake_ollama_server
    app.reset()
    app.url = server.url
    return app


def exact_usage(tenant: Any, count: int, settle: float = 0.3) -> list[Any]:
    """The tenant's ledger rows once ``count`` arrived, re-read after ``settle`` seconds so a test
    asserting "exactly N rows" also catches a late extra one. Filtering by tenant keeps rows that a
    previous test's requests hand to the asynchronous writer late out of the count."""
    wait_usage(count, tenant_id=tenant.pk)
    time.sleep(settle)
    return wait_usage(count, timeout=0, tenant_id=tenant.pk)
