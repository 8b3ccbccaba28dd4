"""Database connections used from the event loop's worker threads survive a PostgreSQL restart.

``sync_to_async(..., thread_sensitive=False)`` runs ORM code on the loop's default executor.
Those threads live for the whole process and Django never health-checks their connections
(its request signals do not fire for Channels consumers), so after a database restart or
failover each thread would keep a dead connection and fail every call until the process
restarts. Like Channels' ``database_sync_to_async``, this executor drops unusable or expired
connections before and after each call; with ``CONN_HEALTH_CHECKS`` the first query after a
restart reconnects instead of failing.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from django.db import close_old_connections

P = ParamSpec("P")
T = TypeVar("T")

_installed: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def _with_fresh_connections(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    close_old_connections()
    try:
        return fn(*args, **kwargs)
    finally:
        close_old_connections()


class DatabaseSafeExecutor(ThreadPoolExecutor):
    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        return super().submit(_with_fresh_connections, fn, *args, **kwargs)


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``DatabaseSafeExecutor`` the loop's default executor (once per loop)."""
    if loop in _installed:
        return
    _installed.add(loop)
    loop.set_default_executor(DatabaseSafeExecutor(thread_name_prefix="chittycan-sync"))
