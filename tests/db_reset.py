"""The per-test database reset of the suite, made cheap (the suite's largest cost was here).

Every test on ``transactional_db`` ends with Django's ``flush``: one ``TRUNCATE`` of the 43 tables,
then the ``post_migrate`` signal, which re-creates every content type and permission. On a loaded
two-core machine that took one to two seconds per test (``TRUNCATE`` makes new files for each
table and waits for the locks the gateway's idle connections hold), most of the suite's time.

``fast_flush`` leaves the same database behind, quicker: the same tables (those ``flush`` empties)
are emptied with ``DELETE`` in one transaction (foreign keys are deferrable, so the order does not
matter; the suite's tables are small), and the content types and permissions are kept rather than
re-created, unless the test changed them (a digest of their rows differs from the one taken after
the migrations), in which case they are emptied and ``post_migrate`` re-creates them as ``flush``
does. Sequences are not reset, as ``flush`` does not reset them either. A test that asks for
``available_apps``, serialized rollback or another database engine gets Django's own ``flush``.

``relax_commit_durability`` turns ``synchronous_commit`` off for the test database: a commit no
longer waits for its WAL to reach the disk (a lost commit is only possible if the machine itself
crashes, which the suite never needs to survive); what each transaction sees is unchanged.
"""

from __future__ import annotations

from typing import Any

from django.core.management.sql import emit_post_migrate_signal
from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.test import TransactionTestCase

#: Tables ``flush`` empties and ``post_migrate`` fills again with the same rows.
REGISTRY_TABLES = ("django_content_type", "auth_permission")
REGISTRY_DIGEST = (
    "SELECT (SELECT md5(coalesce(string_agg(id || ':' || app_label || '.' || model, ',' ORDER BY id), ''))"
    " FROM django_content_type),"
    " (SELECT md5(coalesce(string_agg(id || ':' || content_type_id || '.' || codename || '.' || name, ','"
    " ORDER BY id), '')) FROM auth_permission)"
)

_digests: dict[str, tuple[str, str]] = {}
_test_case: Any = TransactionTestCase  # the method to replace is private (not in django-stubs)
_django_fixture_teardown = _test_case._fixture_teardown


def _registry_digest(connection: BaseDatabaseWrapper) -> tuple[str, str]:
    with connection.cursor() as cursor:
        cursor.execute(REGISTRY_DIGEST)
        row = cursor.fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


def _delete_all(connection: BaseDatabaseWrapper, tables: list[str]) -> None:
    quote = connection.ops.quote_name
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL DEFERRED")
        cursor.execute("; ".join(f"DELETE FROM {quote(table)}" for table in tables))


def take_registry_digest(alias: str = "default") -> None:
    """Remember the content types and permissions as the migrations left them."""
    connection = connections[alias]
    if connection.vendor == "postgresql":
        _digests[alias] = _registry_digest(connection)


def fast_flush(alias: str) -> None:
    """Empty the database ``alias`` as ``manage.py flush`` does (see the module's docstring)."""
    connection = connections[alias]
    tables = connection.introspection.django_table_names(only_existing=True, include_views=False)
    _delete_all(connection, [t for t in tables if t not in REGISTRY_TABLES])
    if _registry_digest(connection) != _digests[alias]:
        _delete_all(connection, [t for t in REGISTRY_TABLES if t in tables])
        emit_post_migrate_signal(0, False, alias)
        _digests[alias] = _registry_digest(connection)


def _fixture_teardown(self: Any) -> None:
    names = self._databases_names(include_mirrors=False)
    plain = self.available_apps is None and not self.serialized_rollback
    if not plain or any(connections[n].vendor != "postgresql" or n not in _digests for n in names):
        _django_fixture_teardown(self)
        return
    for name in names:
        fast_flush(name)


def install() -> None:
    """Make every ``TransactionTestCase`` (pytest-django's ``transactional_db``) end with ``fast_flush``."""
    _test_case._fixture_teardown = _fixture_teardown


def relax_commit_durability(alias: str = "default") -> None:
    """``synchronous_commit = off`` for the test database: for this connection and, through the
    database's own setting, for every later one (the gateway's threads and processes)."""
    connection: Any = connections[alias]
    if connection.vendor != "postgresql":
        return
    name = connection.settings_dict["NAME"]
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER DATABASE {connection.ops.quote_name(name)} SET synchronous_commit TO off")
        cursor.execute("SET synchronous_commit TO off")
