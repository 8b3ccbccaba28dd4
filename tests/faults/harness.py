"""The fault suite's machinery: disposable PostgreSQL and Redis on private loopback ports (so a
scenario may kill them), a TCP proxy that delays Redis's replies, a fake upstream that counts
calls, two gateway processes in production mode, a bounded load driver, and the ledger, counter
and reservation checks every scenario reports.

Nothing here touches the machine's own PostgreSQL or Redis: the suite's data lives in temporary
directories that are removed at the end.
"""

from __future__ import annotations

import asyncio
import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import redis
from django.conf import settings

from budgets import counters, periods
from budgets.models import BudgetReservation
from ledger import writer
from tests.fakes.openai_upstream import FakeOpenAI, Reply
from tests.fakes.server import ServerThread
from tests.processes import ROOT, Gateway, free_port

# --- disposable PostgreSQL ------------------------------------------------------------------------


def postgres_bin() -> Path:
    """The newest PostgreSQL server binaries on this machine (initdb, pg_ctl)."""
    found = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("pg_ctl") is not None:
        return Path(initdb).parent
    raise RuntimeError(
        "The fault suite needs the PostgreSQL server binaries (initdb, pg_ctl) to start a disposable "
        "PostgreSQL it may restart: none in /usr/lib/postgresql/*/bin or on PATH. Install the "
        "postgresql server package (e.g. apt-get install postgresql)."
    )


def _as_postgres_user(argv: list[str]) -> list[str]:
    """initdb refuses to run as root: run PostgreSQL's tools as the ``postgres`` OS user then."""
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise RuntimeError("running as root, the fault suite needs `runuser` to start PostgreSQL as `postgres`")
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


class DisposablePostgres:
    """A PostgreSQL cluster of its own in a temporary directory, on a free loopback port."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="chittycan-faults-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/chittycan"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        out = subprocess.run(
            _as_postgres_user([str(self.bin / tool), *args]), capture_output=True, text=True, timeout=timeout
        )
        if out.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{out.stdout}{out.stderr}\n{log}")

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir} "
            "-c max_connections=400 -c fsync=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` disconnects clients and shuts down cleanly; ``immediate`` is a crash (recovery
        from the WAL on the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self) -> None:
        with psycopg.connect(f"postgres://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE chittycan")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


# --- disposable Redis ---------------------------------------------------------------------------


class DisposableRedis:
    """``redis-server`` without persistence (``--save "" --appendonly no``): stopped, it comes back
    empty, as a Redis without AOF does."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("The fault suite needs `redis-server` on PATH (e.g. apt-get install redis-server).")
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="chittycan-faults-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, port: int | None = None) -> str:
        return f"redis://127.0.0.1:{port or self.port}/0"

    def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.dir), "--daemonize", "no", "--maxclients", "10000", "--loglevel", "warning"]
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = redis.Redis.from_url(self.url(), socket_timeout=0.5, socket_connect_timeout=0.5)
                try:
                    if conn.ping():
                        return
                finally:
                    conn.close()
            except (redis.RedisError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: every connection drops; no data survives (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url(), socket_timeout=5)

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- a TCP proxy that delays Redis's replies ----------------------------------------------------


class DelayProxy:
    """Between the gateways and Redis: every chunk Redis sends back is held ``delay`` seconds
    (uniform in the range set with ``set_delay``), in order, without limiting throughput (a chunk
    is released at its arrival time plus its delay, never before the one ahead of it)."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.delay = (0.0, 0.0)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="delay-proxy", daemon=True)
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.replies_delayed = 0

    def set_delay(self, low: float, high: float) -> None:
        self.delay = (low, high)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _delayed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def release() -> None:
            try:
                while True:
                    due, data = await queue.get()
                    if not data:
                        return
                    wait = due - self.loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    writer.write(data)
                    await writer.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        releaser = asyncio.ensure_future(release())
        last = 0.0
        try:
            while data := await reader.read(65536):
                low, high = self.delay
                due = max(last, self.loop.time() + random.uniform(low, high))
                last = due
                if high > 0:
                    self.replies_delayed += 1
                queue.put_nowait((due, data))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            queue.put_nowait((last, b""))
            await releaser

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await asyncio.gather(self._forward(client_reader, up_writer), self._delayed(up_reader, client_writer))
        finally:
            self.tasks.discard(task)

    def start(self) -> DelayProxy:
        self.thread.start()

        async def go() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)
        return self

    def stop(self) -> None:
        async def go() -> None:
            if self.server is not None:
                self.server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.sleep(0.1)

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# --- the fake upstream --------------------------------------------------------------------------


class FaultUpstream(FakeOpenAI):
    """The OpenAI fake (tests/fakes) with a response delay and paced streams. Every call is
    recorded with its body, so a call is matched to its client request by the ``user`` tag the
    load driver sends (the gateway records it as the ledger row's ``end_user``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reply_delay = 0.0
        self.frame_delay = 0.0

    def default_reply(self, path: str, body: dict[str, Any]) -> Reply:
        reply = super().default_reply(path, body)
        reply.delay = self.reply_delay
        if reply.frames is not None:
            reply.frame_delay = self.frame_delay
        return reply

    def calls(self, prefix: str) -> Counter[str]:
        """Upstream calls per client tag, for the tags starting with ``prefix``."""
        found: Counter[str] = Counter()
        for rec in list(self.requests):
            user = rec.body.get("user") if isinstance(rec.body, dict) else None
            if isinstance(user, str) and user.startswith(prefix):
                found[user] += 1
        return found


# --- the load driver ----------------------------------------------------------------------------


@dataclass
class Outcome:
    tag: str
    tenant: str
    gateway: str
    started: float  # seconds since the load started
    ended: float
    status: int  # 0: no HTTP answer (connection refused or reset)
    code: str  # the error envelope's code, or the transport error's name
    request_id: str
    complete: bool  # a JSON completion read whole, or a stream that reached [DONE]


@dataclass
class Load:
    """Requests at ``rate`` per second (open loop) with at most ``concurrency`` in flight, for
    ``duration`` seconds or ``total`` requests, round-robin over the live gateways and the keys."""

    prefix: str
    keys: list[tuple[str, str]]  # (tenant label, API key)
    targets: Callable[[], list[str]]
    rate: float
    concurrency: int
    duration: float | None = None
    total: int | None = None
    stream: bool = False
    abort_after_first_chunk: bool = False
    max_tokens: int = 50
    timeout: float = 60.0
    model: str = "gpt-4o"
    stream_every: int = 0  # with stream False: every n-th request streams (0: none)
    # A change in the middle of the load (an outage starting): ``on_switch`` runs just before request
    # ``switch_at`` is sent; the requests before it ask for ``model_before`` (when set).
    switch_at: int | None = None
    on_switch: Callable[[], None] | None = None
    model_before: str = ""
    switched_at: float = 0.0  # seconds on the load's clock when ``on_switch`` ran
    outcomes: list[Outcome] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    t0: float = 0.0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def streams(self, tag: str) -> bool:
        if self.stream:
            return True
        return self.stream_every > 0 and int(tag.rsplit("-", 1)[1]) % self.stream_every == 0

    def before_switch(self, tag: str) -> bool:
        return self.switch_at is not None and int(tag.rsplit("-", 1)[1]) < self.switch_at

    def body(self, tag: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_before if self.model_before and self.before_switch(tag) else self.model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": self.max_tokens,
            "user": tag,
        }
        if self.streams(tag):
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def _one(self, client: httpx.AsyncClient, i: int, gateway: str) -> None:
        tenant, key = self.keys[i % len(self.keys)]
        tag = f"{self.prefix}-{i}"
        started = self.now()
        status, code, request_id, complete = 0, "", "", False
        headers = {"authorization": f"Bearer {key}"}
        try:
            async with client.stream(
                "POST", f"{gateway}/v1/chat/completions", json=self.body(tag), headers=headers
            ) as res:
                status = res.status_code
                request_id = res.headers.get("x-request-id", "")
                if status != 200:
                    raw = await res.aread()
                    try:
                        code = str(orjson.loads(raw)["error"].get("code") or "")
                    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                        code = raw[:80].decode(errors="replace")
                elif self.abort_after_first_chunk:
                    async for _chunk in res.aiter_raw():
                        break
                    # Leaving the block unread closes the connection: a client gone mid-stream.
                elif self.streams(tag):
                    async for line in res.aiter_lines():
                        if line == "data: [DONE]":
                            complete = True
                        elif line.startswith("data: ") and '"error"' in line[:20]:
                            code = "stream_error"
                else:
                    data = orjson.loads(await res.aread())
                    complete = bool(data.get("choices"))
        except httpx.TransportError as exc:
            code = code or type(exc).__name__
            self.transport_errors.append(f"{tag} {gateway} {type(exc).__name__}: {exc!r} cause={exc.__cause__!r}")
        self.outcomes.append(Outcome(tag, tenant, gateway, started, self.now(), status, code, request_id, complete))

    async def run(self) -> list[Outcome]:
        # A connection per request (no keep-alive): no request is ever sent on a connection the
        # server is just closing for idleness, and no pooled connection is shared between tasks, so
        # a transport error is the gateway's doing, not the client pool's.
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=0)
        sem = asyncio.Semaphore(self.concurrency)
        tasks: list[asyncio.Task[None]] = []
        self.t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits) as client:

            async def guarded(i: int, gateway: str) -> None:
                try:
                    await self._one(client, i, gateway)
                finally:
                    sem.release()

            i = 0
            while True:
                if self.total is not None and i >= self.total:
                    break
                if self.duration is not None and self.now() >= self.duration:
                    break
                due = i / self.rate
                if due > self.now():
                    await asyncio.sleep(due - self.now())
                await sem.acquire()
                if i == self.switch_at and self.on_switch is not None:
                    self.on_switch()
                    self.switched_at = self.now()
                live = self.targets()
                tasks.append(asyncio.ensure_future(guarded(i, live[i % len(live)])))
                i += 1
            await asyncio.gather(*tasks)
        return self.outcomes


async def during(load: Load, *steps: tuple[float, Callable[[], Any]]) -> list[Outcome]:
    """Run ``load`` and, concurrently, each blocking step at its second of the load's clock."""

    async def faults() -> None:
        while load.t0 == 0.0:
            await asyncio.sleep(0.01)
        for at, step in steps:
            wait = at - load.now()
            if wait > 0:
                await asyncio.sleep(wait)
            await asyncio.to_thread(step)

    results = await asyncio.gather(load.run(), faults())
    return results[0]


def statuses(outcomes: list[Outcome]) -> dict[str, int]:
    """Answers by status (and error code), e.g. ``{"200": 310, "503 enforcement_unavailable": 12}``."""
    found: Counter[str] = Counter()
    for o in outcomes:
        if o.status == 200:
            found["200"] += 1
        elif o.status == 0:
            found[f"no answer ({o.code})"] += 1
        else:
            found[f"{o.status} {o.code}".strip()] += 1
    return dict(sorted(found.items()))


# --- ledger, counters, reservations -------------------------------------------------------------


@dataclass
class Tenant:
    label: str
    tenant_id: int
    key: str
    limit_micro: int


class State:
    """Reads of the disposable PostgreSQL and Redis, as the checks need them."""

    def __init__(self, pg_url: str, redis_url: str) -> None:
        self.pg_url = pg_url
        self.redis_url = redis_url

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg_url, connect_timeout=5) as conn:
            return list(conn.execute(sql, params).fetchall())

    def rows_by_status(self, prefix: str) -> dict[str, int]:
        found = self._query(
            "SELECT status, COUNT(*) FROM gateway_usagerecord WHERE end_user LIKE %s GROUP BY status ORDER BY status",
            (prefix + "-%",),
        )
        return {str(status): int(n) for status, n in found}

    def rows(self, prefix: str) -> list[tuple[str, str, int, int]]:
        """(end_user tag, request_id, tenant_id, cost_micro) of the ledger rows of one scenario."""
        return [
            (str(a), str(b), int(c), int(d))
            for a, b, c, d in self._query(
                "SELECT end_user, request_id, tenant_id, cost_micro FROM gateway_usagerecord WHERE end_user LIKE %s",
                (prefix + "-%",),
            )
        ]

    def ledger_micro(self, tenant_id: int) -> int:
        start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        [(total,)] = self._query(
            "SELECT COALESCE(SUM(cost_micro), 0) FROM gateway_usagerecord WHERE tenant_id = %s AND created_at >= %s",
            (tenant_id, start),
        )
        return int(total)

    def _redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2)

    def counter(self, tenant_id: int) -> int | None:
        """The tenant's live month budget counter in Redis (None: not built, built on next use)."""
        name = f"t{tenant_id}:{periods.period_key('month', 'UTC', datetime.now(UTC))}"
        conn = self._redis()
        try:
            raw = conn.get(counters.counter_key(tenant_id, name))
        finally:
            conn.close()
        return int(raw) if raw is not None else None

    def open_reservations(self, tenant_id: int) -> tuple[int, int]:
        """(open reservations, micro-USD they hold on the tenant's month counter) in Redis."""
        name = f"t{tenant_id}:{periods.period_key('month', 'UTC', datetime.now(UTC))}"
        key = counters.counter_key(tenant_id, name)
        conn = self._redis()
        try:
            values = conn.hvals(f"{settings.REDIS_PREFIX}:bud:{{{tenant_id}}}:res")
        finally:
            conn.close()
        held = 0
        for raw in values:
            for counter_key, amount, _kind in orjson.loads(raw):
                if counter_key == key:
                    held += int(amount)
        return len(values), held

    def open_reservation_ids(self, tenant_ids: list[int]) -> set[str]:
        """The request ids holding a reservation in the tenants' trees."""
        conn = self._redis()
        try:
            return {
                field.decode() if isinstance(field, bytes) else str(field)
                for tenant_id in tenant_ids
                for field in conn.hkeys(f"{settings.REDIS_PREFIX}:bud:{{{tenant_id}}}:res")
            }
        finally:
            conn.close()

    def pg_open_reservations(self) -> int:
        """Reservations taken in PostgreSQL (policy degrade) and never settled."""
        table = BudgetReservation._meta.db_table
        [(n,)] = self._query(f"SELECT COUNT(*) FROM {table} WHERE settled_at IS NULL", ())
        return int(n)

    def stream_length(self) -> int:
        conn = self._redis()
        try:
            return int(conn.xlen(writer.stream_key()))
        finally:
            conn.close()


def spooled_bytes(var_dir: Path) -> int:
    return sum(p.stat().st_size for p in (var_dir / "spool").glob("*.jsonl") if p.exists())


# --- the environment ------------------------------------------------------------------------------

#: Knobs scaled down so each scenario fits the suite's time bound (all else is production default).
SCALED_SETTINGS = {
    "CHITTYCAN_RESERVATION_LEASE": "10",  # default 120 s: a killed process's reservations expire
    "CHITTYCAN_USAGE_CLAIM_IDLE_MS": "5000",  # default 60 s: a killed writer's rows are claimed
}


class FaultEnv:
    """Disposable PostgreSQL and Redis (migrated and seeded), the fake upstream, and two gateways
    per scenario. ``figures`` collects what each scenario reports."""

    def __init__(self, tenants: dict[str, int], resilience: dict[str, str] | None = None) -> None:
        """``resilience``: the URLs of the primary, fallback and black-hole upstreams to seed the
        resilience scenarios' models with (tests/faults/seed.py)."""
        self.root = Path(tempfile.mkdtemp(prefix="chittycan-faults-"))
        self.report_dir = Path(str(settings.VAR_DIR)) / "faults"
        self.report_dir.mkdir(parents=True, exist_ok=True)
        self.figures: dict[str, dict[str, Any]] = {}
        self.pg = DisposablePostgres()
        self.redis = DisposableRedis()
        self.upstream = FaultUpstream()
        self.upstream_server = ServerThread(self.upstream, name="fault-upstream")
        self.gateways: list[Gateway] = []
        self.state = State(self.pg.url, self.redis.url())
        try:
            self.pg.start()
            self.pg.create_database()
            self.redis.start()
            self.upstream_server.start()
            self.manage("migrate", "--no-input", "-v", "0")
            spec = orjson.dumps(
                {"upstream": f"{self.upstream_server.url}/v1", "tenants": tenants, "resilience": resilience}
            ).decode()
            seeded = orjson.loads(self.python("-m", "tests.faults.seed", spec).strip().splitlines()[-1])
        except BaseException:
            self.destroy()
            raise
        self.tenants = {label: Tenant(label, d["tenant_id"], d["key"], d["limit_micro"]) for label, d in seeded.items()}

    def env(self, var_dir: Path, redis_url: str | None = None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TEST_", "CHITTYCAN_", "PYTEST"))}
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "chittycan.settings",
                "DATABASE_URL": self.pg.url,
                "REDIS_URL": redis_url or self.redis.url(),
                "CHITTYCAN_REDIS_PREFIX": settings.REDIS_PREFIX,
                "CHITTYCAN_MODE": "prod",
                "CHITTYCAN_VAR_DIR": str(var_dir),
                "LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
                **SCALED_SETTINGS,
            }
        )
        env.update(extra)
        return env

    def python(self, *argv: str, timeout: float = 300) -> str:
        var_dir = self.root / "manage"
        var_dir.mkdir(exist_ok=True)
        out = subprocess.run(
            [sys.executable, *argv],
            cwd=ROOT,
            env=self.env(var_dir),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} failed:\n{(out.stdout + out.stderr)[-3000:]}")
        return out.stdout

    def manage(self, *argv: str) -> str:
        return self.python("manage.py", *argv)

    def start_gateways(self, scenario: str, count: int = 2, redis_url: str | None = None, **extra: str) -> Path:
        """``count`` gateways (``can serve``, uvicorn) sharing one var dir (one host: one spool)."""
        self.stop_gateways()
        var_dir = self.root / scenario
        var_dir.mkdir(exist_ok=True)
        env = self.env(var_dir, redis_url, **extra)
        logs = self.report_dir / "logs"
        logs.mkdir(exist_ok=True)
        started = [
            Gateway(env, production_server=True, log_path=logs / f"{scenario}-gateway-{n}.log", wait=False)
            for n in range(count)
        ]
        self.gateways = started
        for gw in started:
            gw.wait_ready()
        # One request each, so both are warm (imports, connections) before the measurement.
        for gw in started:
            res = httpx.get(f"{gw.url}/healthz", timeout=30)
            assert res.status_code == 200, res.text
        return var_dir

    def stop_gateways(self) -> None:
        for gw in self.gateways:
            gw.stop()
        self.gateways = []

    def destroy(self) -> None:
        self.stop_gateways()
        if self.upstream_server.thread.is_alive():
            self.upstream_server.stop()
        self.redis.destroy()
        self.pg.destroy()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- after the load ---------------------------------------------------------------------

    def wait_settled(self, prefix: str, var_dir: Path, timeout: float) -> float:
        """Wait until every handed-off row reached the ledger: the stream and the spool are empty
        and the scenario's row count held still for a second. Returns the seconds it took."""
        start = time.monotonic()
        last, since = -1, time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                pending = self.state.stream_length() + spooled_bytes(var_dir)
                count = len(self.state.rows(prefix))
            except (redis.RedisError, psycopg.Error, OSError):
                time.sleep(0.5)
                continue
            if count != last:
                last, since = count, time.monotonic()
            elif pending == 0 and time.monotonic() - since >= 1.0:
                break
            time.sleep(0.25)
        return time.monotonic() - start

    def wait_converged(self, tenants: list[Tenant], bound: float) -> tuple[dict[str, Any], float | None]:
        """Poll until, for every tenant, the live counter equals the ledger plus what open
        reservations hold and no reservation is open; at most ``bound`` seconds. Returns the last
        reading per tenant and the seconds it took (None: not within the bound)."""
        start = time.monotonic()
        while True:
            reading: dict[str, Any] = {}
            for t in tenants:
                live = self.state.counter(t.tenant_id)
                ledger = self.state.ledger_micro(t.tenant_id)
                open_n, held = self.state.open_reservations(t.tenant_id)
                drift = 0 if live is None else live - (ledger + held)
                reading[t.label] = {
                    "counter": live,
                    "ledger_micro": ledger,
                    "open_reservations": open_n,
                    "drift_micro": drift,
                }
            done = all(r["drift_micro"] == 0 and r["open_reservations"] == 0 for r in reading.values())
            elapsed = time.monotonic() - start
            if done:
                return reading, elapsed
            if elapsed > bound:
                return reading, None
            time.sleep(0.5)

    def wait_released(self, ids: set[str], tenant_ids: list[int], bound: float) -> float | None:
        """Seconds until none of the reservations ``ids`` is open any more (None: not within ``bound``)."""
        start = time.monotonic()
        while ids & self.state.open_reservation_ids(tenant_ids):
            if time.monotonic() - start > bound:
                return None
            time.sleep(0.25)
        return time.monotonic() - start

    def record(self, name: str, figures: dict[str, Any]) -> None:
        self.figures[name] = figures
        (self.report_dir / "figures.json").write_bytes(orjson.dumps(self.figures, option=orjson.OPT_INDENT_2))
        (self.report_dir / "figures.md").write_text(render(self.figures))
        print(f"\nfault scenario {name}: {orjson.dumps(figures).decode()}")


def render(figures: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| scenario | requests | answered 200 | errors by status | upstream calls | ledger rows | lost | doubled "
        "| answered without row | drift after recovery (µUSD) | converged in | overrun (µUSD) | recovery |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in figures.items():
        errors = ", ".join(f"{k}: {v}" for k, v in f["statuses"].items() if k not in ("200", "402 insufficient_quota"))
        converged = "—" if f["converged_s"] is None else f"{f['converged_s']:.1f} s"
        recovery = f.get("recovery", "")
        lines.append(
            f"| {name} | {f['requests']} | {f['statuses'].get('200', 0)} | {errors or 'none'} "
            f"| {f['upstream_calls']} | {f['ledger_rows']} | {f['lost']} | {f['doubled']} "
            f"| {f['answered_without_row']} | {f['drift_micro']} | {converged} | {f['overrun_micro']} | {recovery} |"
        )
    return "\n".join(lines) + "\n"


def errors(outcomes: list[Outcome]) -> list[Outcome]:
    """Answers that are neither served (200) nor a budget refusal (402)."""
    return [o for o in outcomes if o.status not in (200, 402)]


def measure(
    env: FaultEnv,
    name: str,
    outcomes: list[Outcome],
    tenants: list[Tenant],
    var_dir: Path,
    *,
    settle_timeout: float = 60,
    converge_bound: float = 30,
) -> dict[str, Any]:
    """The figures every scenario reports, once the load is over and the faults are repaired:
    ledger rows against upstream calls per client tag (lost: a call without a row; doubled: a
    second row for one call or a row without a call), answered requests without a row, counter
    drift after ``converge_bound`` seconds at most, overrun of each hard budget."""
    settle_s = env.wait_settled(name, var_dir, settle_timeout)
    calls = env.upstream.calls(name + "-")
    rows = env.state.rows(name)
    rows_per_tag = Counter(tag for tag, *_ in rows)
    request_ids = {request_id for _, request_id, *_ in rows}
    lost = sorted(tag for tag in calls if tag not in rows_per_tag)
    doubled = sum(n - 1 for n in rows_per_tag.values() if n > 1) + sum(n - 1 for n in calls.values() if n > 1)
    without_call = sorted(tag for tag in rows_per_tag if tag not in calls)
    answered = [o for o in outcomes if o.status == 200]
    answered_without_row = [o.tag for o in answered if o.tag not in rows_per_tag or o.request_id not in request_ids]
    reading, converged_s = env.wait_converged(tenants, converge_bound)
    overrun = {t.label: max(0, env.state.ledger_micro(t.tenant_id) - t.limit_micro) for t in tenants}
    return {
        "requests": len(outcomes),
        "statuses": statuses(outcomes),
        "upstream_calls": sum(calls.values()),
        "ledger_rows": len(rows),
        "tags_called": len(calls),
        "tags_recorded": len(rows_per_tag),
        "rows_by_status": env.state.rows_by_status(name),
        "lost": len(lost),
        "lost_tags": lost,
        "doubled": doubled,
        "rows_without_call": len(without_call),
        "answered_without_row": len(answered_without_row),
        "answered_without_row_tags": answered_without_row[:20],
        "settled_s": round(settle_s, 1),
        "counters": reading,
        "drift_micro": sum(abs(r["drift_micro"]) for r in reading.values()),
        "open_reservations": sum(r["open_reservations"] for r in reading.values()),
        "pg_open_reservations": env.state.pg_open_reservations(),
        "converged_s": None if converged_s is None else round(converged_s, 1),
        "converge_bound_s": converge_bound,
        "overrun_micro": sum(overrun.values()),
    }


def assert_money_invariants(
    figures: dict[str, Any], *, allowed_lost: set[str] | None = None, rows_without_call: int = 0
) -> None:
    """0 lost (beyond ``allowed_lost``), 0 doubled, no answered request without its row, no row
    without a call (but ``rows_without_call``: cache hits and coalesced followers, which made
    none), counters equal to the ledger within the bound, no reservation left, 0 overrun."""
    lost = sorted(set(figures["lost_tags"]) - (allowed_lost or set()))
    problems = []
    if lost:
        problems.append(f"{len(lost)} upstream call(s) without a ledger row: {lost[:10]}")
    if figures["doubled"]:
        problems.append(f"{figures['doubled']} doubled row(s) or call(s)")
    if figures["rows_without_call"] != rows_without_call:
        problems.append(
            f"{figures['rows_without_call']} ledger row(s) without an upstream call (expected {rows_without_call})"
        )
    if figures["answered_without_row"]:
        problems.append(
            f"{figures['answered_without_row']} answered request(s) without a ledger row: "
            f"{figures['answered_without_row_tags'][:10]}"
        )
    if figures["converged_s"] is None:
        problems.append(
            f"counters did not converge to the ledger within {figures['converge_bound_s']} s: {figures['counters']}"
        )
    if figures["overrun_micro"]:
        problems.append(f"hard budget overrun by {figures['overrun_micro']} micro-USD")
    assert not problems, "; ".join(problems)


def run(coro: Awaitable[list[Outcome]]) -> list[Outcome]:
    async def main() -> list[Outcome]:
        return await coro

    return asyncio.run(main())
