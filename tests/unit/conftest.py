"""Unit tests: pure functions (translation, error mapping, token counting, system checks) fed
recorded inputs. They touch no database, no Redis and no server, so they run without services
(``make test-unit``, seconds) as well as in the whole suite (``make test``).

A test that needs PostgreSQL, Redis or the gateway belongs beside the others in ``tests/``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    """Replaces the suite's per-test reset (it empties Redis): there is nothing to reset here."""
    yield


@pytest.fixture(scope="session")
def django_db_setup() -> None:
    """No test database for unit tests: one that asks for the database is not a unit test."""
    pytest.fail("tests/unit/ is for tests without a database: move this test to tests/", pytrace=False)
