"""``make bench``: ChittyCan against a fast fake upstream, side by side in one run with the same load
sent straight to the upstream and through a minimal aiohttp pass-through proxy (the Python ceiling),
and optionally with ChittyCan at an older commit (``--baseline REF``).

Every server under test (the ceiling proxy and each gateway: one process each) is pinned to one
core; this orchestrator, the load generator and the fake upstream share the other. The gateways run
with everything on: PostgreSQL, Redis, key authentication, RPM/TPM limits, budget reservation, the
usage ledger. All targets stay up for the whole run and are measured in interleaved rounds (the
order rotates every cell), so a burst of noise on the machine hits every target alike. For each
cell (non-streaming and streaming chat completions at each concurrency) it records requests/s,
p50/p99 latency, the stream's time to first byte and the server's CPU time per request; after each
concurrency level, its peak memory. The report gives every figure as a ratio to the ceiling's (and,
with a baseline, ChittyCan's over the baseline's), checks that each gateway's ledger got exactly
one row per answered request, and exits non-zero on errors. After the load, it times the routing
policy's cost per request on the gateways' core (``bench.routing --timing-only``: the roadmap
example policy's evaluation, and the route stage's decision with the policy attached and without;
the issue's target: under 50 µs). Markdown goes to stdout and to
``bench/results/latest.md``, the figures to ``latest.json``.

``--baseline REF`` checks REF out into a temporary ``git worktree`` (removed at the end), gives it
its own database (recreated and migrated) and Redis prefix, and serves it with this interpreter
from that worktree (cwd and ``PYTHONPATH``); a probe in the server process reports which files the
project was imported from, and the run fails if any came from outside the baseline's tree.

    python -m bench.run [--baseline REF] [--quick] [--rounds 3] [--duration 2] [--servers uvicorn]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from bench.load import Result, build_request, chat_body, result_dict, run_load

ROOT = Path(__file__).resolve().parent.parent
PROBE_DIR = Path(__file__).resolve().parent / "probe"
PY = sys.executable
MODES = ("json", "stream")
# The issue's targets: the ratios are to figures taken in the same run.
GOALS = {
    "rps_vs_ceiling": 0.2,
    "rps_vs_baseline": 1.5,
    "added_p50_vs_ceiling": 3.0,
    "rss_streams_mib": 150.0,
    "policy_added_us": 50.0,
}
QUICK = {"rounds": 1, "duration": 1.0, "warmup": 0.3, "prewarm": 0.5}
DEFAULTS = {"rounds": 3, "duration": 2.0, "warmup": 0.5, "prewarm": 1.0}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def uptime_load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git(*args: str, cwd: Path = ROOT) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def git_rev(cwd: Path = ROOT) -> str:
    try:
        rev = git("rev-parse", "--short", "HEAD", cwd=cwd)
        dirty = git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    except (OSError, RuntimeError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


# --- process tree accounting (/proc) --------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def tree_peak_rss_mib(pid: int) -> float:
    """Sum of each process's peak resident set (VmHWM): the server's whole footprint, an upper bound."""
    total_kib = 0
    for proc in _tree(pid):
        try:
            for line in Path(f"/proc/{proc}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return round(total_kib / 1024, 1)


def tree_cpu_seconds(pid: int) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for proc in _tree(pid):
        try:
            fields = Path(f"/proc/{proc}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / ticks


# --- what is measured -----------------------------------------------------------------------------


@dataclass
class Tree:
    """A checkout ChittyCan is served from: this one, or the baseline's temporary worktree."""

    label: str  # "current" | "baseline"
    path: Path
    rev: str
    database_url: str
    redis_prefix: str
    env: dict[str, str] = field(default_factory=dict)
    key: str = ""
    rows_before: int = 0

    @property
    def database(self) -> str:
        return self.database_url.rsplit("/", 1)[1].split("?")[0]


@dataclass
class Target:
    """One column of the comparison: the fake upstream itself, the ceiling proxy, or a gateway."""

    name: str
    kind: str  # direct | ceiling | gateway
    title: str
    url: str = ""
    key: str = ""
    proc: subprocess.Popen[bytes] | None = None
    tree: Tree | None = None
    server: str = ""
    logfile: Path | None = None
    probe_dir: Path | None = None
    rounds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    answered: int = 0
    rss_mib: dict[int, float] = field(default_factory=dict)
    origin: dict[str, Any] = field(default_factory=dict)


def cell_key(mode: str, concurrency: int) -> str:
    return f"{mode}-{concurrency}"


# --- the pieces -----------------------------------------------------------------------------------


def tree_env(args: argparse.Namespace, tree: Tree, var_dir: Path) -> dict[str, str]:
    """The environment of everything run from ``tree``: its own code first on the path, its database."""
    env = dict(os.environ)
    for name in ("CHITTYCAN_TEST_DB_NAME", "TEST_REDIS_URL", "TEST_DATABASE_URL", "PYTHONPATH"):
        env.pop(name, None)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(tree.path), str(PROBE_DIR)]),
            "DJANGO_SETTINGS_MODULE": "chittycan.settings",
            "DATABASE_URL": tree.database_url,
            "REDIS_URL": args.redis_url,
            "CHITTYCAN_REDIS_PREFIX": tree.redis_prefix,
            "CHITTYCAN_MODE": "prod",
            "CHITTYCAN_EGRESS_ALLOW": "127.0.0.1",  # the fake upstream is on loopback (docs/security.md)
            "CHITTYCAN_VAR_DIR": str(var_dir),
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
    )
    for item in args.gateway_env:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def flush_redis(url: str, prefix: str) -> None:
    import redis

    conn = redis.Redis.from_url(url)
    for key in conn.scan_iter(f"{prefix}:*", count=1000):
        conn.delete(key)
    conn.close()


def recreate_database(url: str) -> None:
    """A fresh database for the baseline: one migrated at another commit may not fit its models."""
    import psycopg
    from psycopg import sql

    name = url.rsplit("/", 1)[1].split("?")[0]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def run_in(tree: Tree, argv: list[str], what: str, timeout: float = 300) -> str:
    """Run ``python argv`` from ``tree`` (its cwd, its path, its database); the output on success."""
    out = subprocess.run([PY, *argv], cwd=tree.path, env=tree.env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed ({tree.label} tree):\n{(out.stdout + out.stderr)[-3000:]}")
    return out.stdout


def seed(tree: Tree, command: list[str]) -> dict[str, Any]:
    """bench/seed.py of the tree itself, so the baseline is seeded with the baseline's models."""
    out = run_in(tree, ["-m", "bench.seed", *command], f"bench.seed {command[0]}")
    data: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    return data


def check_import_origin(tree: Tree) -> str:
    """Before serving from ``tree``: where its environment resolves the ASGI entry point."""
    code = "import importlib.util as u; print(u.find_spec('chittycan.asgi').origin)"
    origin = run_in(tree, ["-c", code], "the import check", timeout=60).strip()
    if not os.path.realpath(origin).startswith(str(tree.path.resolve()) + os.sep):
        raise RuntimeError(f"the {tree.label} tree would import {origin} (expected under {tree.path})")
    return origin


def add_baseline_worktree(ref: str, stack: contextlib.ExitStack) -> tuple[Path, str]:
    sha = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    holder = Path(tempfile.mkdtemp(prefix="chittycan-bench-baseline-"))
    path = holder / "tree"

    def remove() -> None:
        try:
            git("worktree", "remove", "--force", str(path))
        except (OSError, RuntimeError) as exc:
            log(f"git worktree remove failed ({exc}); deleting the directory and pruning")
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError, RuntimeError):
                git("worktree", "prune")
        shutil.rmtree(holder, ignore_errors=True)
        log(f"removed the baseline worktree {path}")

    stack.callback(remove)
    git("worktree", "add", "--detach", str(path), sha)
    return path, sha


def install_artefacts(path: Path) -> list[str]:
    """Give the baseline's worktree what ``make install`` put next to the code in this one (git-ignored
    files such as the tokenizer tables; a gateway without them counts tokens differently), then run its
    own install step for them when it has one (a no-op once they are in place)."""
    copied = []
    listing = git("ls-files", "--others", "--ignored", "--exclude-standard", "--directory")
    for rel in listing.splitlines():
        if rel.endswith(("/", ".pyc")) or "/" not in rel:
            continue  # whole ignored directories (.venv, var, caches) and top-level files
        dest = path / rel
        if dest.parent.is_dir() and not dest.exists():
            shutil.copy2(ROOT / rel, dest)
            copied.append(rel)
    fetch = path / "scripts" / "fetch_tokenizers.py"
    if fetch.exists():
        out = subprocess.run([PY, str(fetch)], cwd=path, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"the baseline's scripts/fetch_tokenizers.py failed:\n{out.stderr[-2000:]}")
    return copied


def start_upstream(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    ready = work / "upstream.port"
    proc = subprocess.Popen([PY, "-m", "bench.fake_upstream", "--ready-file", str(ready)], cwd=ROOT)
    deadline = time.monotonic() + 15
    while not ready.exists() or not ready.read_text().strip():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the fake upstream did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{ready.read_text().strip()}"


def one_request(port: int, key: str) -> tuple[int, dict[str, str], bytes]:
    """A plain blocking request, to check a server answers correctly before loading it."""
    raw = build_request(f"http://127.0.0.1:{port}/v1/chat/completions", key, chat_body(False))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        decoded, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        body = decoded
    return status, headers, body


#: What an orchestrator and a Prometheus server ask every gateway process, every few seconds.
OPERATIONAL_PATHS = ("/healthz", "/readyz", "/metrics")


def probe_like_an_orchestrator(target: Target) -> dict[str, int]:
    """GET the liveness and readiness probes and a metrics scrape once, as a deployed gateway is
    asked all the time, so that the memory measured is that of a process in service (whatever
    these paths load stays loaded). The status of each: an older baseline may not serve one (404),
    a server error stops the run."""
    port = int(target.url.rsplit(":", 1)[1].split("/", 1)[0])
    statuses: dict[str, int] = {}
    for path in OPERATIONAL_PATHS:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            statuses[path] = response.status
        finally:
            conn.close()
    log(f"{target.name}: " + ", ".join(f"GET {path} {status}" for path, status in statuses.items()))
    if any(status >= 500 for status in statuses.values()):
        raise RuntimeError(f"{target.name}: the operational endpoints answered {statuses}")
    return statuses


def spawn(
    argv: list[str], cwd: Path, env: dict[str, str] | None, core: int | None, logfile: Path
) -> subprocess.Popen[bytes]:
    def pin() -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})

    with open(logfile, "wb") as fh:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, preexec_fn=pin)


def wait_ready(target: Target) -> None:
    assert target.proc is not None and target.logfile is not None
    port = int(target.url.rsplit(":", 1)[1].split("/", 1)[0])
    deadline = time.monotonic() + 90
    while True:
        if target.proc.poll() is not None:
            raise RuntimeError(
                f"{target.name} exited ({target.proc.returncode}):\n{target.logfile.read_text()[-3000:]}"
            )
        try:
            status, headers, body = one_request(port, target.key)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target.name} did not answer:\n{target.logfile.read_text()[-3000:]}") from None
            time.sleep(0.2)
    if status != 200:
        raise RuntimeError(f"{target.name} answered {status}: {body[:500]!r}")
    data = orjson.loads(body)
    if not data.get("choices"):
        raise RuntimeError(f"unexpected answer from {target.name}: {headers} {body[:500]!r}")
    if target.kind == "gateway" and ("x-chittycan-cost" not in headers or "x-request-id" not in headers):
        raise RuntimeError(f"unexpected gateway answer from {target.name}: {headers} {body[:500]!r}")
    target.answered += 1


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def load(target: Target, mode: str, concurrency: int, duration: float, warmup: float) -> Result:
    import uvloop

    return uvloop.run(
        run_load(
            target.url,
            target.key,
            stream=mode == "stream",
            concurrency=concurrency,
            duration=duration,
            warmup=warmup,
            target=target.name,
        )
    )


def wait_rows(tree: Tree, expected: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        rows = int(seed(tree, ["count"])["rows"]) - tree.rows_before
        if rows >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def read_probe(target: Target, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the server (SIGUSR1 to its process tree, see bench/probe) where it imported the project from."""
    assert target.proc is not None and target.probe_dir is not None
    for pid in _tree(target.proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while True:
        records = [orjson.loads(p.read_bytes()) for p in sorted(target.probe_dir.glob("*.json"))]
        serving = [r for r in records if r["app"]]
        if serving or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not serving:
        return {"verified": False, "note": "the server process wrote no probe record"}
    foreign = sorted({path for r in serving for path in r["foreign"]})
    return {
        "verified": not foreign,
        "app": serving[0]["app"],
        "packages": serving[0]["origins"],
        "pids": [r["pid"] for r in serving],
        "foreign": foreign[:20],
        "foreign_count": len(foreign),
    }


# --- the report -----------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return round(value / reference, 3)


def _x(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def aggregate(target: Target, key: str) -> dict[str, Any] | None:
    rounds = target.rounds.get(key)
    if not rounds:
        return None

    def med(name: str) -> float | None:
        values = [r[name] for r in rounds if r[name] is not None]
        return round(statistics.median(values), 3) if values else None

    answered = sum(r["answered"] for r in rounds)
    cpu = target.cpu_s.get(key)
    return {
        "mode": rounds[0]["mode"],
        "concurrency": rounds[0]["concurrency"],
        "rps": med("rps"),
        "p50_ms": med("p50_ms"),
        "p99_ms": med("p99_ms"),
        "ttfb_p50_ms": med("ttfb_p50_ms"),
        "requests": sum(r["requests"] for r in rounds),
        "answered": answered,
        "errors": sum(r["errors"] for r in rounds),
        "first_error": next((r["first_error"] for r in rounds if r["first_error"]), ""),
        "cpu_ms_per_req": round(cpu / answered * 1000, 4) if cpu is not None and answered else None,
        "rounds": [{k: r[k] for k in ("rps", "p50_ms", "p99_ms", "ttfb_p50_ms", "errors")} for r in rounds],
    }


def headline(cells: dict[str, Any], direct: dict[str, Any], rss: dict[str, float], levels: list[int]) -> dict[str, Any]:
    """The issue's figures for one target; ``added`` figures are against the direct run's medians."""

    def get(key: str, name: str) -> float | None:
        cell = cells.get(key)
        return None if cell is None else cell.get(name)

    def added(key: str, name: str) -> float | None:
        value, ref = get(key, name), (direct.get(key) or {}).get(name)
        return None if value is None or ref is None else round(value - ref, 3)

    top = max(levels)
    below = [c for c in levels if c < top]
    return {
        "rps_c10": get("json-10", "rps"),
        "added_p50_c1_ms": added("json-1", "p50_ms"),
        "added_ttfb_c1_ms": added("stream-1", "ttfb_p50_ms"),
        "cpu_ms_per_req_c10": get("json-10", "cpu_ms_per_req"),
        "rss_mib": rss.get(str(max(below))) if below else None,
        "rss_top_mib": rss.get(str(top)),
    }


FIGURES = ("rps_c10", "added_p50_c1_ms", "added_ttfb_c1_ms", "cpu_ms_per_req_c10", "rss_mib", "rss_top_mib")


def summarise(report: dict[str, Any], levels: list[int]) -> None:
    targets = report["targets"]
    direct = next(t for t in targets if t["kind"] == "direct")["cells"]
    for t in targets:
        t["figures"] = headline(t["cells"], direct, t["rss_mib"], levels)
        if t["kind"] == "direct":
            t["figures"]["added_p50_c1_ms"] = t["figures"]["added_ttfb_c1_ms"] = None
    ceiling = next(t for t in targets if t["kind"] == "ceiling")["figures"]
    for t in targets:
        t["vs_ceiling"] = {name: _ratio(t["figures"][name], ceiling[name]) for name in FIGURES}
    comparisons = []
    for t in targets:
        if t["kind"] != "gateway" or t["tree"] != "current":
            continue
        base = next((b for b in targets if b["tree"] == "baseline" and b["server"] == t["server"]), None)
        if base is not None:
            ratios = {name: _ratio(t["figures"][name], base["figures"][name]) for name in FIGURES}
            comparisons.append({"target": t["name"], "baseline": base["name"], "server": t["server"], "ratios": ratios})
    report["vs_baseline"] = comparisons
    report["goals"] = goals(report, levels)
    policy = report.get("policy") or {}
    added = policy.get("policy_added_us")
    report["goals"].append(
        _goal_row(
            "routing policy (examples/routing-policy.yaml)",
            "the policy adds < 50 µs per request",
            "not measured" if added is None else f"{added:.1f} µs",
            None if added is None else added < GOALS["policy_added_us"],
        )
    )


def _goal_row(target: str, goal: str, reached: str, met: bool | None) -> dict[str, Any]:
    return {"target": target, "goal": goal, "reached": reached, "met": met}


def goals(report: dict[str, Any], levels: list[int]) -> list[dict[str, Any]]:
    """The issue's targets for each current gateway; ``met`` is None when the run could not tell."""
    rows: list[dict[str, Any]] = []
    streams = max(levels) >= 64 and "stream" in report["meta"]["modes"]
    for t in report["targets"]:
        if t["kind"] != "gateway" or t["tree"] != "current":
            continue
        vs_base = next((c["ratios"] for c in report["vs_baseline"] if c["target"] == t["name"]), None)
        rps_c, p50_c = t["vs_ceiling"]["rps_c10"], t["vs_ceiling"]["added_p50_c1_ms"]
        rps_b = vs_base["rps_c10"] if vs_base else None
        rss = t["figures"]["rss_top_mib"] if streams else None

        row = functools.partial(_goal_row, t["title"])
        rows += [
            row(
                "c=10 req/s ≥ 1/5 of the ceiling's",
                _x(rps_c),
                rps_c is not None and rps_c >= GOALS["rps_vs_ceiling"],
            ),
            row(
                "c=10 req/s ≥ 1.5× the baseline's",
                _x(rps_b) if vs_base else "no --baseline",
                None if vs_base is None else rps_b is not None and rps_b >= GOALS["rps_vs_baseline"],
            ),
            row(
                "added p50 at c=1 ≤ 3× the ceiling's",
                _x(p50_c),
                p50_c is not None and p50_c <= GOALS["added_p50_vs_ceiling"],
            ),
            row(
                f"peak memory with {max(levels)} concurrent streams < 150 MiB",
                "not measured (needs stream at c ≥ 64)" if rss is None else f"{rss:.1f} MiB",
                None if rss is None else rss < GOALS["rss_streams_mib"],
            ),
        ]
    return rows


def render(report: dict[str, Any], levels: list[int]) -> str:
    meta = report["meta"]
    top = max(levels)
    below = [c for c in levels if c < top]
    base = meta.get("baseline")
    lines = [
        "# ChittyCan benchmark",
        "",
        f"- Taken {meta['date']} at commit `{meta['git']}`"
        + (f" against the baseline `{base['ref']}` = `{base['sha'][:10]}`" if base else "")
        + f" on {meta['cpu']} ({meta['cores']} cores visible); load average before {meta['load_before']},"
        f" after {meta['load_after']}.",
        f"- The ceiling proxy and each gateway (one process each) pinned to core {meta['server_core']}; the load"
        f" generator, the fake upstream and the runner on core {meta['client_core']}. Gateways: PostgreSQL +"
        " Redis, key auth, RPM/TPM limits, budget reservation and the usage ledger all on; servers"
        f" {', '.join(meta['servers'])}.",
        f"- {meta['rounds']} interleaved round(s), the target order rotating every cell; each cell"
        f" {meta['duration']} s measured after {meta['warmup']} s warm-up; figures are medians over rounds,"
        " CPU per request = the server's CPU time over its cells / requests answered. Chat completions,"
        " 7 output tokens.",
        f"- Upstream transport `CHITTYCAN_HTTP_TRANSPORT={meta['transport']}`; extra gateway env:"
        f" {', '.join(meta['gateway_env']) or 'none'}.",
        "",
        "## Side by side",
        "",
        "In brackets: the ratio to the ceiling (the minimal aiohttp pass-through proxy). *Added* = the target's"
        " median minus the same load's sent straight to the fake upstream.",
        "",
        f"| target | c=10 req/s | added p50, c=1 | stream TTFB added, c=1 | CPU per request, c=10"
        f" | peak RSS, c ≤ {max(below) if below else top} | peak RSS, after c={top} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    units = {
        "rps_c10": ("", 0),
        "added_p50_c1_ms": (" ms", 2),
        "added_ttfb_c1_ms": (" ms", 2),
        "cpu_ms_per_req_c10": (" ms", 3),
        "rss_mib": (" MiB", 1),
        "rss_top_mib": (" MiB", 1),
    }
    for t in report["targets"]:
        cols = []
        for name in FIGURES:
            value = t["figures"][name]
            if name == "rss_mib" and not below:
                value = None
            unit, digits = units[name]
            cols.append("–" if value is None else f"{_f(value, digits)}{unit} ({_x(t['vs_ceiling'][name])})")
        lines.append(f"| {t['title']} | " + " | ".join(cols) + " |")
    for comp in report["vs_baseline"]:
        lines.append(
            f"| **ChittyCan ÷ baseline ({comp['server']})** | "
            + " | ".join(_x(comp["ratios"][name]) for name in FIGURES)
            + " |"
        )
    lines += [
        "",
        "Direct: CPU and memory are the fake upstream's. Peak RSS is VmHWM summed over the server's process"
        f" tree, read after every target ran all cells up to c={max(below) if below else top} (json and"
        f" stream), then after c={top}"
        + (f" ({top} concurrent streams)." if "stream" in meta["modes"] else ".")
        + " Each gateway was first asked GET "
        + ", ".join(OPERATIONAL_PATHS)
        + " once, as an orchestrator's"
        " probes and a Prometheus scrape ask a deployed one, so what those load is in its memory.",
        "",
    ]
    if report["goals"]:
        lines += ["## Against the targets", "", "| target | goal | reached | |", "|---|---|---:|---|"]
        for row in report["goals"]:
            verdict = "–" if row["met"] is None else ("met" if row["met"] else "**not met**")
            lines.append(f"| {row['target']} | {row['goal']} | {row['reached']} | {verdict} |")
        lines.append("")
    policy = report.get("policy") or {}
    if policy:
        lines += ["## Routing policy cost per request", ""]
        if "error" in policy:
            lines += [f"Not measured: `{policy['error']}`", ""]
        else:
            lines += [
                "The roadmap's example policy (`examples/routing-policy.yaml`: two CEL rules, a default and a"
                " three-hop fallback chain) timed in one process pinned to the gateways' core after the load"
                f" (`bench/routing.py`, median of {policy['rounds']} rounds of {policy['per_round']} requests).",
                "",
                "| what | µs per request |",
                "|---|---:|",
                "| facts built + policy evaluated (`request_facts` + `evaluate`)"
                f" | {_f(policy['facts_and_evaluate_us'], 1)} |",
                f"| policy evaluated alone | {_f(policy['evaluate_us'], 1)} |",
                f"| route stage decision, policy attached (`decide`: facts, evaluation, route, explanation,"
                f" budget check) | {_f(policy.get('decide_with_policy_us'), 1)} |",
                f"| route stage decision, no policy | {_f(policy.get('decide_without_policy_us'), 1)} |",
                f"| **added by attaching the policy** | **{_f(policy.get('policy_added_us'), 1)}** |",
                "",
            ]
    lines += [
        "## Every cell",
        "",
        "| mode | c | target | req/s | × ceiling | p50 ms | p99 ms | TTFB p50 ms | added p50 ms | added TTFB ms"
        " | CPU ms/req | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    direct = next(t for t in report["targets"] if t["kind"] == "direct")["cells"]
    ceiling = next(t for t in report["targets"] if t["kind"] == "ceiling")["cells"]
    for mode in meta["modes"]:
        for c in levels:
            key = cell_key(mode, c)
            d, ceil = direct.get(key) or {}, ceiling.get(key) or {}
            for t in report["targets"]:
                cell = t["cells"].get(key)
                if cell is None:
                    continue
                add_p50 = add_ttfb = None
                if t["kind"] != "direct":
                    if d.get("p50_ms") is not None:
                        add_p50 = cell["p50_ms"] - d["p50_ms"]
                    if cell["ttfb_p50_ms"] is not None and d.get("ttfb_p50_ms") is not None:
                        add_ttfb = cell["ttfb_p50_ms"] - d["ttfb_p50_ms"]
                lines.append(
                    f"| {mode} | {c} | {t['title']} | {_f(cell['rps'], 0)} | {_x(_ratio(cell['rps'], ceil.get('rps')))}"
                    f" | {_f(cell['p50_ms'])} | {_f(cell['p99_ms'])} | {_f(cell['ttfb_p50_ms'])} | {_f(add_p50)}"
                    f" | {_f(add_ttfb)} | {_f(cell['cpu_ms_per_req'], 3)} | {cell['errors']} |"
                )
    lines += ["", "## Checks", ""]
    for ledger in report["ledger"]:
        verdict = "exact" if ledger["rows"] == ledger["answered"] else "**MISMATCH**"
        lines.append(
            f"- Ledger, {ledger['tree']} tree (database `{ledger['database']}`): {ledger['rows']} rows for"
            f" {ledger['answered']} answered requests ({verdict})."
        )
    for t in report["targets"]:
        origin = t.get("origin") or {}
        if t["kind"] != "gateway":
            continue
        if origin.get("verified"):
            lines.append(
                f"- {t['title']} served its own tree's code: `chittycan.asgi` from `{origin['app']}`,"
                f" {len(origin['packages'])} project packages, none from elsewhere."
            )
        elif origin.get("foreign_count"):
            lines.append(f"- {t['title']}: **{origin['foreign_count']} module(s) from outside its tree**.")
        else:
            lines.append(f"- {t['title']}: import origin not verified ({origin.get('note', 'unknown')}).")
    lines.append("")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    log(f"signal {signum}: stopping the servers and removing what this run set up")
    raise SystemExit(128 + signum)  # unwinds through the clean-ups (servers, baseline worktree)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", metavar="REF", help="also run ChittyCan at this git ref (e.g. HEAD~1, main)")
    parser.add_argument(
        "--quick", action="store_true", help="one 1 s round per cell (a minute or so): for trying things out"
    )
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds (default {DEFAULTS['rounds']})")
    parser.add_argument("--duration", type=float, help="seconds measured per cell and round (default 2)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up before each cell (default 0.5)")
    parser.add_argument("--prewarm", type=float, help="seconds of json and stream load per target first (default 1)")
    parser.add_argument("--settle", type=float, default=0.3, help="pause after a cell before reading CPU (s)")
    parser.add_argument(
        "--servers", default="uvicorn", help="ChittyCan servers, comma-separated (uvicorn,granian,daphne)"
    )
    parser.add_argument("--concurrency", default="1,10,64")
    parser.add_argument("--modes", default="json,stream")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/chittycan_bench"),
    )
    parser.add_argument(
        "--baseline-database-url",
        default=os.environ.get("BENCH_BASELINE_DATABASE_URL"),
        help="dropped and recreated by every baseline run (default: the database URL's name + _baseline)",
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8"))
    parser.add_argument("--redis-prefix", default=os.environ.get("BENCH_REDIS_PREFIX", "ccbench"))
    parser.add_argument("--gateway-env", action="append", default=[], help="K=V for the gateways (repeatable)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.md"))
    args = parser.parse_args()
    preset = QUICK if args.quick else DEFAULTS
    env_defaults = {"duration": os.environ.get("BENCH_DURATION"), "warmup": os.environ.get("BENCH_WARMUP")}
    for name, value in preset.items():
        if getattr(args, name) is None:
            from_env = None if args.quick else env_defaults.get(name)
            setattr(args, name, type(value)(from_env) if from_env else value)
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    servers = [s for s in args.servers.split(",") if s]
    levels = sorted({int(c) for c in args.concurrency.split(",") if c})
    modes = [m for m in args.modes.split(",") if m in MODES]
    cores = sorted(os.sched_getaffinity(0))
    server_core, client_core = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    if client_core is not None:
        os.sched_setaffinity(0, {client_core})  # this process, the load generator and the fake upstream
    else:
        log("only one core visible: not pinning (figures will include the client's own cost)")
    work = Path(tempfile.mkdtemp(prefix="chittycan-bench-"))
    report: dict[str, Any] = {
        "meta": {
            "date": datetime.now(tz=UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "git": git_rev(),
            "cpu": cpu_model(),
            "cores": len(cores),
            "server_core": server_core,
            "client_core": client_core,
            "load_before": uptime_load(),
            "transport": os.environ.get("CHITTYCAN_HTTP_TRANSPORT", "aiohttp (default)"),
            "gateway_env": args.gateway_env,
            "servers": servers,
            "modes": modes,
            "concurrency": levels,
            "rounds": args.rounds,
            "duration": args.duration,
            "warmup": args.warmup,
            "python": PY,
            "work_dir": str(work),
        },
    }
    for item in args.gateway_env:
        if item.startswith("CHITTYCAN_HTTP_TRANSPORT="):
            report["meta"]["transport"] = item.partition("=")[2]
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        targets, trees = bench(args, report, servers, levels, modes, server_core, work, stack)
    report["meta"]["load_after"] = uptime_load()
    report["meta"]["seconds"] = round(time.monotonic() - started)
    report["targets"] = [
        {
            "name": t.name,
            "kind": t.kind,
            "title": t.title,
            "tree": t.tree.label if t.tree else None,
            "rev": t.tree.rev if t.tree else None,
            "server": t.server,
            "cells": {k: v for k in t.rounds if (v := aggregate(t, k)) is not None},
            "rss_mib": {str(c): v for c, v in t.rss_mib.items()},
            "answered": t.answered,
            "origin": t.origin,
        }
        for t in targets
    ]
    summarise(report, levels)
    text = render(report, levels)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(text)
    log(f"written to {out} and {out.with_suffix('.json')} in {report['meta']['seconds']} s (logs in {work})")
    problems = [f"{t['name']}: errors" for t in report["targets"] if any(c["errors"] for c in t["cells"].values())]
    problems += [f"{lg['tree']} tree: ledger rows != answered requests" for lg in report["ledger"] if not lg["exact"]]
    problems += [
        f"{t['name']}: imported modules from outside its tree"
        for t in report["targets"]
        if t["origin"].get("foreign_count")
    ]
    if problems:
        log("FAILED: " + "; ".join(problems))
        sys.exit(1)


def bench(
    args: argparse.Namespace,
    report: dict[str, Any],
    servers: list[str],
    levels: list[int],
    modes: list[str],
    core: int | None,
    work: Path,
    stack: contextlib.ExitStack,
) -> tuple[list[Target], list[Tree]]:
    """Set everything up, measure, check the ledgers; ``stack`` undoes the set-up whatever happens."""
    current = Tree("current", ROOT, git_rev(), args.database_url, args.redis_prefix)
    trees = [current]
    if args.baseline:
        path, sha = add_baseline_worktree(args.baseline, stack)
        base_url = args.baseline_database_url or _suffixed(args.database_url, "_baseline")
        baseline = Tree("baseline", path, git_rev(path), base_url, f"{args.redis_prefix}_base")
        report["meta"]["baseline"] = {"ref": args.baseline, "sha": sha, "worktree": str(path)}
        log(f"baseline {args.baseline} = {sha[:10]} checked out at {path}")
        if not (path / "bench" / "seed.py").exists():
            raise RuntimeError(f"the baseline {args.baseline} has no bench/seed.py to seed its database with")
        copied = install_artefacts(path)
        log(f"baseline: copied {len(copied)} install artefact(s) from this tree: {', '.join(copied) or 'none'}")
        recreate_database(base_url)  # left in place afterwards: dropping waits for a checkpoint
        trees.append(baseline)
    for tree in trees:
        tree.env = tree_env(args, tree, work / f"var-{tree.label}")
        flush_redis(args.redis_url, tree.redis_prefix)
        if tree.label == "baseline":
            run_in(tree, ["manage.py", "migrate", "--no-input", "-v", "0"], "migrate")
            log(f"baseline database {tree.database} created and migrated")
        log(f"{tree.label} tree {tree.rev}: chittycan.asgi resolves to {check_import_origin(tree)}")

    upstream, upstream_url = start_upstream(work)
    stack.callback(stop, upstream)
    direct = Target("direct", "direct", "direct to the fake upstream", url=f"{upstream_url}/v1/chat/completions")
    direct.proc = upstream
    for tree in trees:
        seeded = seed(tree, ["setup", "--upstream", f"{upstream_url}/v1"])
        tree.key, tree.rows_before = str(seeded["key"]), int(seeded["rows"])
    log(f"fake upstream at {upstream_url}; tenants and keys ready")

    port = free_port()
    ceiling = Target(
        "ceiling", "ceiling", "ceiling: aiohttp pass-through", url=f"http://127.0.0.1:{port}/v1/chat/completions"
    )
    ceiling.logfile = work / "ceiling.log"
    argv = [PY, "-m", "bench.ceiling", "--upstream", f"{upstream_url}/v1", "--port", str(port)]
    ceiling.proc = spawn(argv, ROOT, None, core, ceiling.logfile)
    stack.callback(stop, ceiling.proc)
    targets = [direct, ceiling]
    for tree in trees:
        for server in servers:
            name = f"{'chittycan' if tree.label == 'current' else 'baseline'}-{server}"
            title = (
                f"ChittyCan `{tree.rev}` ({server})" if tree.label == "current" else f"baseline `{tree.rev}` ({server})"
            )
            port = free_port()
            target = Target(name, "gateway", title, url=f"http://127.0.0.1:{port}/v1/chat/completions", key=tree.key)
            target.tree, target.server = tree, server
            target.logfile, target.probe_dir = work / f"{name}.log", work / f"probe-{name}"
            target.probe_dir.mkdir()
            env = {**tree.env, "BENCH_PROBE_DIR": str(target.probe_dir), "BENCH_PROBE_TREE": str(tree.path)}
            argv = [PY, "manage.py", "serve", "--server", server, "--host", "127.0.0.1", "--port", str(port)]
            target.proc = spawn(argv, tree.path, env, core, target.logfile)
            stack.callback(stop, target.proc)
            targets.append(target)
    for target in targets[1:]:
        wait_ready(target)
        assert target.proc is not None
        log(f"{target.name} ready at {target.url} (pid {target.proc.pid}, log {target.logfile})")
        if target.kind == "gateway":
            probe_like_an_orchestrator(target)

    for target in targets:  # first requests, pools, gc.freeze: not in the first measured cell
        for mode in modes:
            target.answered += load(target, mode, 10, args.prewarm, 0.0).answered
    measure(args, targets, levels, modes)

    report["ledger"] = []
    for tree in trees:
        answered = sum(t.answered for t in targets if t.tree is tree)
        rows = wait_rows(tree, answered)
        report["ledger"].append(
            {
                "tree": tree.label,
                "database": tree.database,
                "rows": rows,
                "answered": answered,
                "exact": rows == answered,
            }
        )
        log(f"ledger, {tree.label} tree: {rows} rows for {answered} answered requests")
    for target in targets:
        if target.kind == "gateway" and target.proc is not None:
            target.origin = read_probe(target)
            stop(target.proc)
            log(f"{target.name}: imported from {target.origin}")
    report["policy"] = policy_cost(current, core, args.quick)
    return targets, trees


def policy_cost(tree: Tree, core: int | None, quick: bool) -> dict[str, Any]:
    """``bench.routing --timing-only`` of ``tree`` on the gateways' core, now idle: the roadmap
    policy's evaluation per request and what attaching it adds to the route stage's decision."""

    def pin() -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})

    rounds = "3" if quick else "7"
    argv = [PY, "-m", "bench.routing", "--timing-only", "--json", "--rounds", rounds]
    out = subprocess.run(argv, cwd=tree.path, env=tree.env, capture_output=True, text=True, timeout=600, preexec_fn=pin)
    if out.returncode != 0:
        log(f"policy timing failed: {(out.stdout + out.stderr)[-1000:]}")
        return {"error": (out.stdout + out.stderr)[-300:]}
    figures: dict[str, Any] = orjson.loads(out.stdout.strip().splitlines()[-1])
    log(
        f"policy: evaluation {figures['facts_and_evaluate_us']:.1f} us per request with the facts built;"
        f" the route stage adds {_f(figures.get('policy_added_us'), 1)} us with it attached"
    )
    return figures


def _suffixed(url: str, suffix: str) -> str:
    head, _, name = url.rpartition("/")
    name, sep, query = name.partition("?")
    return f"{head}/{name}{suffix}{sep}{query}"


def measure(args: argparse.Namespace, targets: list[Target], levels: list[int], modes: list[str]) -> None:
    """Every cell for every target, in rounds; the target order rotates every cell."""
    turn = 0
    total = len(levels) * args.rounds * len(modes)
    for level in levels:
        for _ in range(args.rounds):
            for mode in modes:
                turn += 1
                k = turn % len(targets)
                for target in targets[k:] + targets[:k]:
                    measure_cell(args, target, mode, level, f"{turn}/{total}")
        for target in targets:
            assert target.proc is not None
            target.rss_mib[level] = tree_peak_rss_mib(target.proc.pid)
        log("peak RSS after c=" + str(level) + ": " + ", ".join(f"{t.name} {t.rss_mib[level]} MiB" for t in targets))


def measure_cell(args: argparse.Namespace, target: Target, mode: str, level: int, turn: str) -> None:
    assert target.proc is not None
    key = cell_key(mode, level)
    cpu0 = tree_cpu_seconds(target.proc.pid)
    res = load(target, mode, level, args.duration, args.warmup)
    time.sleep(args.settle)  # the gateway's usage writer flushes the cell's tail; counted, not spilled
    cpu = tree_cpu_seconds(target.proc.pid) - cpu0
    target.answered += res.answered
    target.rounds.setdefault(key, []).append(result_dict(res))
    target.cpu_s[key] = target.cpu_s.get(key, 0.0) + cpu
    per_req = cpu / res.answered * 1000 if res.answered else None
    log(
        f"[{turn}] {target.name:17} {mode:6} c={level:<3} {res.rps:>9,.0f} req/s  p50 {res.p50_ms:.2f} ms"
        f"  p99 {res.p99_ms:.2f} ms  ttfb {_f(res.ttfb_p50_ms)} ms  cpu {_f(per_req, 3)} ms/req  errors {res.errors}"
    )
    if res.first_error:
        log(f"  first error: {res.first_error}")


if __name__ == "__main__":
    main()
