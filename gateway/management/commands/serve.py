"""``can serve``: the production server for the ASGI app (uvicorn by default; granian, daphne).

Outside dev mode it refuses to start without a real SECRET_KEY and prints what Django's
``check --deploy`` finds (errors stop it, warnings do not)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from core import preflight
from gateway import metrics


class Command(BaseCommand):
    help = "Run the gateway (ASGI) with uvicorn, granian or daphne."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("CHITTYCAN_HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("CHITTYCAN_PORT", "8080")))
        parser.add_argument("--server", choices=["uvicorn", "granian", "daphne"], default=settings.CHITTYCAN_SERVER)
        parser.add_argument("--workers", type=int, default=int(os.environ.get("CHITTYCAN_WORKERS", "1")))
        parser.add_argument("--access-log", action="store_true", help="log every request (slower)")

    def handle(self, *args: Any, **opts: Any) -> None:
        if settings.CHITTYCAN_MODE != "dev":
            self.preflight()
        host, port, workers = opts["host"], opts["port"], opts["workers"]
        app = "chittycan.asgi:application"
        if opts["server"] == "uvicorn":
            argv = [
                sys.executable,
                "-m",
                "uvicorn",
                app,
                "--host",
                host,
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--loop",
                "uvloop",
                "--http",
                "chittycan.http_protocol:CoalescingHttpToolsProtocol",
                "--lifespan",
                "off",
                "--no-server-header",
            ]
            if not opts["access_log"]:
                argv.append("--no-access-log")
        elif opts["server"] == "granian":
            argv = [
                sys.executable,
                "-m",
                "granian",
                "--interface",
                "asgi",
                "--host",
                host,
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--loop",
                "uvloop",
                app,
            ]
            if opts["access_log"]:
                argv.append("--access-log")
        else:
            argv = [sys.executable, "-m", "daphne", "-b", host, "-p", str(port), app]
            if not opts["access_log"]:
                argv.extend(["--access-log", os.devnull])
        os.environ["CHITTYCAN_SERVING"] = opts["server"]  # read by settings (see INSTALLED_APPS)
        # glibc gives each thread that allocates its own malloc arena, which keeps what it freed;
        # two arenas hold the peak memory with 64 concurrent streams ~4 MiB lower (docs/benchmark.md).
        os.environ.setdefault("MALLOC_ARENA_MAX", "2")
        if workers > 1 and opts["server"] != "daphne":
            # Every worker writes its metric values there; any worker's /metrics adds them all up.
            os.environ[metrics.MULTIPROC_ENV] = str(metrics.prepare_multiprocess_dir(Path(settings.VAR_DIR)))
        self.stdout.write(f"ChittyCan gateway on http://{host}:{port} ({opts['server']}, {workers} worker(s))")
        sys.stdout.flush()
        os.execv(sys.executable, argv)

    def preflight(self) -> None:
        """Production only: refuse a missing or weak SECRET_KEY; print ``check --deploy`` findings."""
        problem = preflight.secret_key_problem()
        if problem:
            raise CommandError(f"ChittyCan refuses to start: {problem}")
        findings = preflight.deploy_findings()
        for message in findings:
            self.stderr.write(f"check --deploy: {message}")
        serious = [m for m in findings if preflight.is_serious(m)]
        if serious:
            raise CommandError(
                f"ChittyCan refuses to start: `check --deploy` found {len(serious)} error(s) (above); fix them first."
            )
        if findings:
            self.stderr.write(
                f"check --deploy: {len(findings)} warning(s), serving anyway"
                " (see docs/deployment.md, 'Security checks')."
            )
