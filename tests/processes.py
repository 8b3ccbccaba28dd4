"""Gateway processes for the multi-process tests: ``tests/test_budgets_concurrency.py`` (on the test
database and Redis) and the fault suite ``tests/faults/`` (on disposable PostgreSQL and Redis).

A ``Gateway`` is a real server process on a free loopback port: by default
``python -m uvicorn chittycan.asgi:application`` as the concurrency tests always started it, or with
``production_server=True`` exactly what ``can serve`` runs in production (``manage.py serve``,
which execs uvicorn with uvloop and httptools in the same process, so ``pid`` is the server's).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def database_url() -> str:
    """The test database as a URL (what a gateway process needs to reach it)."""
    db = settings.DATABASES["default"]
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def services_env() -> dict[str, str]:
    """The environment of a gateway on the test database and the test Redis."""
    return {
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "CHITTYCAN_REDIS_PREFIX": settings.REDIS_PREFIX,
        "CHITTYCAN_AUTH_CACHE_TTL": "30",
        "LOG_LEVEL": os.environ.get("TEST_GATEWAY_LOG_LEVEL", "CRITICAL"),  # e.g. INFO to debug a test
    }


class Gateway:
    """A gateway process on a free port; ``env`` is added to this process's environment."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        production_server: bool = False,
        log_path: Path | None = None,
        wait: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full = dict(os.environ)
        full.update(env)
        if production_server:
            argv = [sys.executable, "manage.py", "serve", "--server", "uvicorn", "--host", "127.0.0.1"]
            argv += ["--port", str(self.port)]
        else:
            argv = [sys.executable, "-m", "uvicorn", "chittycan.asgi:application", "--host", "127.0.0.1"]
            argv += ["--port", str(self.port), "--lifespan", "off", "--log-level", "warning", "--no-access-log"]
        self._log: IO[bytes] | None = open(log_path, "ab") if log_path is not None else None
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=full, stdout=self._log, stderr=self._log)
        self.pid = self.proc.pid
        if wait:
            self.wait_ready()

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n" + self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway process exited ({self.proc.returncode}){self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway process did not start{self._log_tail()}") from None
                time.sleep(0.1)

    def rss_mib(self) -> float:
        """Resident memory of the server process (VmRSS), in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc status")

    def kill(self) -> None:
        """SIGKILL: the process dies without running any cleanup."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None


def start_together(envs: Sequence[Mapping[str, str]], *, production_server: bool = False) -> list[Gateway]:
    """Start one gateway per ``env`` at once and wait until all listen: a start is mostly imports
    (seconds of CPU on a loaded machine), so two in parallel take about as long as one."""
    gateways = [Gateway(env, production_server=production_server, wait=False) for env in envs]
    try:
        for gateway in gateways:
            gateway.wait_ready()
    except BaseException:
        for gateway in gateways:
            gateway.stop()
        raise
    return gateways
