"""Browser tests: Playwright for Python driving Debian's chromium (never a browser Playwright
downloads) against the real ASGI app, served by uvicorn in a thread (``gateway_server`` from
tests/conftest.py: the admin, the control API and /v1 all answer on it).

``scripts/test.sh`` installs Debian's ``chromium`` package when it is missing (``ensure_browser`` in
scripts/services.sh). Every test here is marked ``browser``: ``-m "not browser"`` leaves them out.
Tests use ``transactional_db`` (through the fixtures below) so what they create is committed and the
server's threads see it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, Response, sync_playwright

from tests.fakes.server import ServerThread

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
HERE = Path(__file__).resolve().parent
TIMEOUT_MS = 15_000
ASYNC_UNSAFE = "DJANGO_ALLOW_ASYNC_UNSAFE"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="module")
def orm_beside_playwright() -> Iterator[None]:
    """Playwright's sync API keeps an asyncio loop marked running on the main thread while it is
    started, and Django then refuses ORM calls there (SynchronousOnlyOperation): the test body's
    set-up and checks, and the database flush between tests. Allow them for this module's
    lifetime only (the rest of the suite keeps the check); Playwright is stopped at the end of
    each module so the next tests run without its loop."""
    previous = os.environ.get(ASYNC_UNSAFE)
    os.environ[ASYNC_UNSAFE] = "true"
    yield
    if previous is None:
        os.environ.pop(ASYNC_UNSAFE, None)
    else:
        os.environ[ASYNC_UNSAFE] = previous


@pytest.fixture(scope="module")
def playwright_driver(
    django_db_setup: Any, gateway_server: ServerThread, orm_beside_playwright: None
) -> Iterator[Playwright]:
    """Started after the test database and the server (so their session set-up and tear-down
    run without Playwright's loop), stopped at the end of the module."""
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright_driver: Playwright) -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: run the suite through scripts/test.sh (it installs Debian's chromium), "
            'or `apt-get install chromium`, or set CHROMIUM=/path/to/chromium; -m "not browser" skips these tests',
            pytrace=False,
        )
    # Headless; Playwright passes --no-sandbox itself (we run as root in CI).
    browser = playwright_driver.chromium.launch(executable_path=CHROMIUM)
    yield browser
    browser.close()


@pytest.fixture
def app_server(gateway_server: ServerThread, transactional_db: Any) -> ServerThread:
    """The real app (admin, /api, /v1) on a loopback port, against the test database."""
    return gateway_server


@pytest.fixture
def responses() -> list[Response]:
    """Every response the browser received in this test, in order (headers, Set-Cookie included)."""
    return []


@pytest.fixture
def context(browser: Browser, app_server: ServerThread, responses: list[Response]) -> Iterator[BrowserContext]:
    """A fresh browser profile per test: no cookies carried over from another test."""
    ctx = browser.new_context(base_url=app_server.url)
    ctx.set_default_timeout(TIMEOUT_MS)
    ctx.on("response", lambda response: responses.append(response))
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    page = context.new_page()
    yield page
    page.close()
