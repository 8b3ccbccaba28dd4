"""``make bench``: the gateway against a fast fake upstream, each figure next to the same load sent
straight to the upstream.

One gateway process (``can serve`` with uvicorn, granian and daphne in turn) is pinned to one core;
this orchestrator, the load generator and the fake upstream share the other. Everything is on:
PostgreSQL, Redis, key authentication, RPM/TPM limits, budget reservation, the usage ledger. For
each server it runs non-streaming and streaming chat completions at concurrency 1, 10 and 64 and
reports requests/s, p50/p99 latency, the stream's time to first byte, the gateway's CPU time per
request and its peak memory; then it checks that the ledger got exactly one row per answered
request. The table goes to ``bench/results/latest.md`` (and ``.json``) and to stdout.

    python -m bench.run [--servers uvicorn,granian,daphne] [--duration 5] [--gateway-env K=V ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.load import Result, build_request, chat_body, result_dict, run_load

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MODES = ("json", "stream")
TARGETS = {"added_p50_ms": 2.0, "rps_c10": 1000.0, "added_ttfb_ms": 3.0, "rss_mib": 150.0}


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


def git_rev() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


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
    """Sum of each process's peak resident set (VmHWM): the gateway's whole footprint, an upper bound."""
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


# --- the pieces -----------------------------------------------------------------------------------


def base_env(args: argparse.Namespace, var_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("CHITTYCAN_TEST_DB_NAME", "TEST_REDIS_URL", "TEST_DATABASE_URL"):
        env.pop(name, None)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "chittycan.settings",
            "DATABASE_URL": args.database_url,
            "REDIS_URL": args.redis_url,
            "CHITTYCAN_REDIS_PREFIX": args.redis_prefix,
            "CHITTYCAN_MODE": "prod",
            "CHITTYCAN_VAR_DIR": var_dir,
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


def start_upstream(work: str) -> tuple[subprocess.Popen[bytes], str]:
    ready = os.path.join(work, "upstream.port")
    proc = subprocess.Popen([PY, "-m", "bench.fake_upstream", "--ready-file", ready], cwd=ROOT)
    deadline = time.monotonic() + 15
    while not os.path.exists(ready) or not Path(ready).read_text().strip():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the fake upstream did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{Path(ready).read_text().strip()}"


def seed(env: dict[str, str], command: list[str]) -> dict[str, Any]:
    out = subprocess.run([PY, "-m", "bench.seed", *command], cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench.seed {command[0]} failed:\n{out.stderr[-3000:]}")
    data: dict[str, Any] = orjson.loads(out.stdout.strip().splitlines()[-1])
    return data


def one_request(port: int, key: str) -> tuple[int, dict[str, str], bytes]:
    """A plain blocking request, to check the gateway answers correctly before loading it."""
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


def start_gateway(
    server: str, port: int, env: dict[str, str], core: int | None, logfile: Path
) -> subprocess.Popen[bytes]:
    def pin() -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})

    cmd = [PY, "-m", "chittycan.cli", "serve", "--server", server, "--host", "127.0.0.1", "--port", str(port)]
    with open(logfile, "wb") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, preexec_fn=pin)


def wait_ready(proc: subprocess.Popen[bytes], port: int, key: str, logfile: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited ({proc.returncode}):\n{logfile.read_text()[-3000:]}")
        try:
            status, headers, body = one_request(port, key)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not answer:\n{logfile.read_text()[-3000:]}") from None
            time.sleep(0.2)
    if status != 200:
        raise RuntimeError(f"the gateway answered {status}: {body[:500]!r}")
    data = orjson.loads(body)
    if not data.get("choices") or "x-chittycan-cost" not in headers or "x-request-id" not in headers:
        raise RuntimeError(f"unexpected gateway answer: {headers} {body[:500]!r}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def load(url: str, key: str, mode: str, concurrency: int, args: argparse.Namespace, target: str) -> Result:
    import uvloop

    return uvloop.run(
        run_load(
            url,
            key,
            stream=mode == "stream",
            concurrency=concurrency,
            duration=args.duration,
            warmup=args.warmup,
            target=target,
        )
    )


def wait_rows(env: dict[str, str], expected: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        rows = int(seed(env, ["count"])["rows"])
        if rows >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


# --- the report -----------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def render(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        "# ChittyCan benchmark",
        "",
        f"- Taken {meta['date']} at commit `{meta['git']}` on {meta['cpu']} ({meta['cores']} cores visible);"
        f" load average before {meta['load_before']}, after {meta['load_after']}.",
        f"- Gateway: one process pinned to core {meta['gateway_core']}; load generator and fake upstream on core"
        f" {meta['client_core']}. PostgreSQL + Redis, key auth, RPM/TPM limits, budget reservation and the usage"
        " ledger all on.",
        f"- Upstream transport `CHITTYCAN_HTTP_TRANSPORT={meta['transport']}`; extra gateway env:"
        f" {', '.join(meta['gateway_env']) or 'none'}.",
        f"- Each cell: {meta['duration']} s measured after {meta['warmup']} s warm-up; chat completions,"
        " 7 output tokens; `direct` = the same load sent straight to the fake upstream.",
        "",
    ]
    direct = report["direct"]
    for server in report["servers"]:
        name = server["server"]
        lines += [
            f"## {name}",
            "",
            f"Peak memory (VmHWM, whole process tree): **{_f(server['rss_mib'], 1)} MiB**."
            f" Ledger rows written: {server['ledger_rows']} for {server['answered']} answered requests"
            f" ({'exact' if server['ledger_rows'] == server['answered'] else 'MISMATCH'}).",
            "",
            "| mode | c | req/s | p50 ms | p99 ms | TTFB p50 ms | direct req/s | direct p50 ms | direct TTFB ms"
            " | added p50 ms | added TTFB ms | gateway CPU µs/req | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for cell in server["cells"]:
            d = direct[f"{cell['mode']}-{cell['concurrency']}"]
            added_ttfb = cell["ttfb_p50_ms"] - d["ttfb_p50_ms"] if cell["ttfb_p50_ms"] is not None else None
            lines.append(
                f"| {cell['mode']} | {cell['concurrency']} | {_f(cell['rps'], 0)} | {_f(cell['p50_ms'])}"
                f" | {_f(cell['p99_ms'])} | {_f(cell['ttfb_p50_ms'])} | {_f(d['rps'], 0)} | {_f(d['p50_ms'])}"
                f" | {_f(d['ttfb_p50_ms'])} | {_f(cell['p50_ms'] - d['p50_ms'])} | {_f(added_ttfb)}"
                f" | {_f(cell['cpu_us_per_req'], 0)} | {cell['errors']} |"
            )
        lines.append("")
    summary = report.get("summary")
    if summary:
        lines += [
            "## Against the targets",
            "",
            f"Fastest server (req/s at c=10, non-streaming): **{summary['server']}**.",
            "",
            "| target | goal | reached | |",
            "|---|---|---|---|",
        ]
        for row in summary["rows"]:
            lines.append(f"| {row[0]} | {row[1]} | {row[2]} | {'met' if row[3] else 'not met'} |")
        lines.append("")
    return "\n".join(lines)


def summarise(report: dict[str, Any]) -> dict[str, Any] | None:
    servers = report["servers"]
    direct = report["direct"]

    def cell(server: dict[str, Any], mode: str, c: int) -> dict[str, Any] | None:
        return next((x for x in server["cells"] if x["mode"] == mode and x["concurrency"] == c), None)

    ranked = [(c["rps"], s) for s in servers if (c := cell(s, "json", 10))]
    if not ranked:
        return None
    best = max(ranked, key=lambda pair: pair[0])[1]
    rows: list[tuple[str, str, str, bool]] = []
    c1 = cell(best, "json", 1)
    if c1:
        added = c1["p50_ms"] - direct["json-1"]["p50_ms"]
        rows.append(("added latency p50, c=1", "≤ 2 ms", f"{added:.2f} ms", added <= TARGETS["added_p50_ms"]))
    c10 = cell(best, "json", 10)
    if c10:
        rows.append(("non-streaming req/s, c=10", "≥ 1,000", f"{c10['rps']:,.0f}", c10["rps"] >= TARGETS["rps_c10"]))
    s1 = cell(best, "stream", 1)
    if s1 and s1["ttfb_p50_ms"] is not None:
        added = s1["ttfb_p50_ms"] - direct["stream-1"]["ttfb_p50_ms"]
        rows.append(("stream TTFB added p50, c=1", "≤ 3 ms", f"{added:.2f} ms", added <= TARGETS["added_ttfb_ms"]))
    rows.append(("peak memory", "< 150 MiB", f"{best['rss_mib']:.1f} MiB", best["rss_mib"] < TARGETS["rss_mib"]))
    return {"server": best["server"], "rows": rows}


# --- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="uvicorn,granian,daphne")
    parser.add_argument("--concurrency", default="1,10,64")
    parser.add_argument("--modes", default="json,stream")
    parser.add_argument("--duration", type=float, default=float(os.environ.get("BENCH_DURATION", "5")))
    parser.add_argument("--warmup", type=float, default=float(os.environ.get("BENCH_WARMUP", "1")))
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/chittycan_bench"),
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8"))
    parser.add_argument("--redis-prefix", default=os.environ.get("BENCH_REDIS_PREFIX", "ccbench"))
    parser.add_argument("--gateway-env", action="append", default=[], help="K=V for the gateway (repeatable)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.md"))
    args = parser.parse_args()

    servers = [s for s in args.servers.split(",") if s]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    modes = [m for m in args.modes.split(",") if m in MODES]
    cores = sorted(os.sched_getaffinity(0))
    gateway_core, client_core = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    if client_core is not None:
        os.sched_setaffinity(0, {client_core})  # this process, the load generator and the fake upstream
    else:
        log("only one core visible: not pinning (figures will include the client's own cost)")

    work = tempfile.mkdtemp(prefix="chittycan-bench-")
    env = base_env(args, work)
    transport = env.get("CHITTYCAN_HTTP_TRANSPORT", "aiohttp (default)")
    report: dict[str, Any] = {
        "meta": {
            "date": datetime.now(tz=UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "git": git_rev(),
            "cpu": cpu_model(),
            "cores": len(cores),
            "gateway_core": gateway_core,
            "client_core": client_core,
            "load_before": uptime_load(),
            "transport": transport,
            "gateway_env": args.gateway_env,
            "duration": args.duration,
            "warmup": args.warmup,
        },
        "direct": {},
        "servers": [],
    }
    flush_redis(args.redis_url, args.redis_prefix)
    upstream, upstream_url = start_upstream(work)
    try:
        seeded = seed(env, ["setup", "--upstream", f"{upstream_url}/v1"])
        key = str(seeded["key"])
        log(f"fake upstream at {upstream_url}; tenant and key ready")
        for mode in modes:
            for c in levels:
                res = load(f"{upstream_url}/v1/chat/completions", "", mode, c, args, "direct")
                report["direct"][f"{mode}-{c}"] = result_dict(res)
                log(f"direct   {mode:6} c={c:<3} {res.rps:>9,.0f} req/s  p50 {res.p50_ms:.2f} ms")
        for server in servers:
            report["servers"].append(bench_server(server, args, env, key, modes, levels, gateway_core, work))
    finally:
        stop(upstream)
    report["meta"]["load_after"] = uptime_load()
    report["summary"] = summarise(report)
    text = render(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(text)
    log(f"written to {out}")
    problems = [
        f"{s['server']}: {'ledger rows != answered requests' if s['ledger_rows'] != s['answered'] else 'errors'}"
        for s in report["servers"]
        if s["ledger_rows"] != s["answered"] or any(c["errors"] for c in s["cells"])
    ]
    if problems:
        log("FAILED: " + "; ".join(problems))
        sys.exit(1)


def bench_server(
    server: str,
    args: argparse.Namespace,
    env: dict[str, str],
    key: str,
    modes: list[str],
    levels: list[int],
    core: int | None,
    work: str,
) -> dict[str, Any]:
    port = free_port()
    logfile = Path(work) / f"gateway-{server}.log"
    rows_before = int(seed(env, ["count"])["rows"])
    proc = start_gateway(server, port, env, core, logfile)
    cells: list[dict[str, Any]] = []
    answered = 0
    try:
        wait_ready(proc, port, key, logfile)
        answered += 1
        log(f"{server} ready on port {port} (pid {proc.pid}, log {logfile})")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for mode in modes:
            for c in levels:
                cpu0 = tree_cpu_seconds(proc.pid)
                res = load(url, key, mode, c, args, server)
                cpu = tree_cpu_seconds(proc.pid) - cpu0
                answered += res.answered
                cell = result_dict(res)
                cell["cpu_us_per_req"] = cpu / res.answered * 1e6 if res.answered else None
                cells.append(cell)
                log(
                    f"{server:8} {mode:6} c={c:<3} {res.rps:>9,.0f} req/s  p50 {res.p50_ms:.2f} ms"
                    f"  p99 {res.p99_ms:.2f} ms  ttfb {_f(res.ttfb_p50_ms)} ms"
                    f"  cpu {_f(cell['cpu_us_per_req'], 0)} µs/req  errors {res.errors}"
                )
                if res.first_error:
                    log(f"  first error: {res.first_error}")
        rss = tree_peak_rss_mib(proc.pid)
        rows = wait_rows(env, rows_before + answered) - rows_before
    finally:
        stop(proc)
    return {"server": server, "rss_mib": rss, "cells": cells, "ledger_rows": rows, "answered": answered}


if __name__ == "__main__":
    main()
