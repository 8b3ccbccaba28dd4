"""Money under faults (issue 9): two gateway processes in production mode (``can serve``) against a
disposable PostgreSQL and Redis, under bounded load, while Redis stops, slows down, PostgreSQL
restarts, a gateway is killed, clients drop streams and streams run long.

Every scenario reports its figures (tests/faults/harness.py ``measure``, written to
``$CHITTYCAN_VAR_DIR/faults/``) before it asserts the invariants: every upstream call has exactly
one ledger row, every answered request has its row, counters equal the ledger within a bound after
recovery, no reservation is left open, no hard budget is overrun.

    bash scripts/test.sh -m faults tests/faults          # this suite (about 4 minutes)
    bash scripts/test.sh -m "not faults"                 # everything else
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.harness import (
    DelayProxy,
    FaultEnv,
    Load,
    Outcome,
    Tenant,
    assert_money_invariants,
    during,
    errors,
    measure,
    run,
)

pytestmark = pytest.mark.faults

RATE = 30.0  # requests per second, over both gateways
#: After Redis answers again, a request that starts later than this is served (the issue asks for
#: recovery within a second; one more second allows for a loaded two-core CI machine).
RECOVERY_BOUND = 2.0
#: Counters must equal the ledger (and no reservation be open) at most this long after the load
#: (docs/operations.md "Failure behaviour" states 10 s after the last incident).
CONVERGE_BOUND = 15.0


def pair(env: FaultEnv, scenario: str) -> list[Tenant]:
    return [env.tenants[f"{scenario}-main"], env.tenants[f"{scenario}-tight"]]


def keys(tenants: list[Tenant]) -> list[tuple[str, str]]:
    return [(t.label, t.key) for t in tenants]


def live(env: FaultEnv) -> Callable[[], list[str]]:
    """The gateways a load balancer would still send to: those whose process is alive."""
    return lambda: [g.url for g in env.gateways if g.proc.poll() is None]


def last_error_after(outcomes: list[Outcome], moment: float) -> float:
    """Seconds after ``moment`` at which the last failing request started (0: none failed after)."""
    late = [o.started - moment for o in errors(outcomes) if o.started >= moment]
    return round(max(late), 2) if late else 0.0


@pytest.fixture(autouse=True)
def _calm_upstream(faults_env: FaultEnv) -> None:
    faults_env.upstream.reply_delay = 0.05
    faults_env.upstream.frame_delay = 0.0


def redis_stopped(env: FaultEnv, scenario: str, policy: str) -> tuple[list[Outcome], dict[str, float], Path]:
    """30 req/s for 16 s; Redis is killed at 3 s and restarted (empty) at 13 s."""
    var_dir = env.start_gateways(scenario, CHITTYCAN_REDIS_FAILURE_POLICY=policy)
    tenants = pair(env, scenario)
    load = Load(scenario, keys(tenants), live(env), rate=RATE, concurrency=60, duration=16)
    marks: dict[str, float] = {}

    def down() -> None:
        marks["down"] = load.now()
        env.redis.kill()

    def up() -> None:
        env.redis.start()
        marks["up"] = load.now()

    outcomes = run(during(load, (3, down), (13, up)))
    return outcomes, marks, var_dir


def test_a_redis_stopped_10s_degrade(faults_env: FaultEnv) -> None:
    env = faults_env
    outcomes, marks, var_dir = redis_stopped(env, "a", "degrade")
    figures = measure(env, "a", outcomes, pair(env, "a"), var_dir, converge_bound=CONVERGE_BOUND)
    figures["recovery"] = f"last error {last_error_after(outcomes, marks['up'])} s after Redis answered"
    env.record("a. Redis stopped 10 s (degrade)", figures)
    # Policy degrade: budgets are enforced in PostgreSQL while Redis is down; nothing is refused
    # for want of Redis.
    assert not errors(outcomes), figures["statuses"]
    assert_money_invariants(figures)


def test_b_redis_stopped_10s_refuse(faults_env: FaultEnv) -> None:
    env = faults_env
    outcomes, marks, var_dir = redis_stopped(env, "b", "refuse")
    figures = measure(env, "b", outcomes, pair(env, "b"), var_dir, converge_bound=CONVERGE_BOUND)
    recovery = last_error_after(outcomes, marks["up"])
    figures["recovery"] = f"last 503 {recovery} s after Redis answered"
    env.record("b. Redis stopped 10 s (refuse)", figures)
    # Policy refuse: 503 enforcement_unavailable while Redis is down, and only then.
    bad = [o for o in errors(outcomes) if o.status != 503 or o.code != "enforcement_unavailable"]
    assert not bad, figures["statuses"]
    # A 503 is right only for a request that overlapped the outage: answered after Redis went
    # down and started before it had been back for RECOVERY_BOUND seconds.
    outside = [
        (round(o.started, 2), round(o.ended, 2))
        for o in errors(outcomes)
        if not (o.ended >= marks["down"] and o.started <= marks["up"] + RECOVERY_BOUND)
    ]
    assert not outside, (
        f"503s outside the outage ({marks['down']:.2f} s to {marks['up']:.2f} s + {RECOVERY_BOUND} s), "
        f"(started, answered): {outside[:10]}"
    )
    assert_money_invariants(figures)


def test_c_redis_slow_is_not_an_outage(faults_env: FaultEnv) -> None:
    """Redis's replies are delayed 50-300 ms each from 2 s to 10 s of a 12 s load (policy refuse,
    the default, so a false outage shows as a 503)."""
    env = faults_env
    proxy = DelayProxy(env.redis.port).start()
    try:
        var_dir = env.start_gateways("c", redis_url=env.redis.url(proxy.port))
        tenants = pair(env, "c")
        load = Load("c", keys(tenants), live(env), rate=RATE, concurrency=100, duration=12)
        outcomes = run(during(load, (2, lambda: proxy.set_delay(0.05, 0.3)), (10, lambda: proxy.set_delay(0, 0))))
        figures = measure(env, "c", outcomes, tenants, var_dir, converge_bound=CONVERGE_BOUND)
        slow = sorted(o.ended - o.started for o in outcomes if 2 <= o.started < 10 and o.status == 200)
        figures["recovery"] = (
            f"p50 {slow[len(slow) // 2]:.2f} s, max {slow[-1]:.2f} s while slow" if slow else "none served while slow"
        )
        figures["replies_delayed"] = proxy.replies_delayed
        env.record("c. Redis slow (50-300 ms per reply)", figures)
    finally:
        env.stop_gateways()
        proxy.stop()
    assert figures["replies_delayed"] > 0
    assert not errors(outcomes), figures["statuses"]
    assert_money_invariants(figures)


def test_d_postgres_restarted(faults_env: FaultEnv) -> None:
    """PostgreSQL stops (fast shutdown: every connection cut) at 3 s and is back at 6 s."""
    env = faults_env
    var_dir = env.start_gateways("d")
    tenants = pair(env, "d")
    load = Load("d", keys(tenants), live(env), rate=RATE, concurrency=60, duration=12)
    marks: dict[str, float] = {}

    def down() -> None:
        marks["down"] = load.now()
        env.pg.stop("fast")

    def up() -> None:
        env.pg.start()
        marks["up"] = load.now()

    outcomes = run(during(load, (3, down), (6, up)))
    figures = measure(env, "d", outcomes, tenants, var_dir, converge_bound=CONVERGE_BOUND)
    figures["recovery"] = f"last error {last_error_after(outcomes, marks['up'])} s after PostgreSQL answered"
    env.record("d. PostgreSQL restarted", figures)
    late = [o.started for o in errors(outcomes) if o.started > marks["up"] + RECOVERY_BOUND]
    assert not late, f"errors after PostgreSQL was back (+{RECOVERY_BOUND} s): {figures['statuses']}"
    assert_money_invariants(figures)


def test_e_gateway_killed(faults_env: FaultEnv) -> None:
    """One of the two gateways gets SIGKILL at 4 s of a 12 s load; the load balancer (the driver)
        then sends everything to the other. Its reservations must be released by the survivor's sweeper
        once their lease (10 s here) expires, and its unwritten stream rows claimed and written. The
    upstream answers in 0.5 s, so the killed process holds reservations when it dies."""
    env = faults_env
    env.upstream.reply_delay = 0.5  # about 15 requests in flight, holding reservations, at the kill
    var_dir = env.start_gateways("e")
    tenants = pair(env, "e")
    load = Load("e", keys(tenants), live(env), rate=RATE, concurrency=60, duration=12)
    victim = env.gateways[0]
    marks: dict[str, float] = {}
    held: set[str] = set()
    tenant_ids = [t.tenant_id for t in tenants]

    def kill() -> None:
        marks["kill"] = load.now()
        victim.kill()
        # The reservations open at the kill: the victim's stay open until their lease expires.
        held.update(env.state.open_reservation_ids(tenant_ids))

    outcomes = run(during(load, (4, kill)))
    released = env.wait_released(held, tenant_ids, bound=CONVERGE_BOUND)
    released_after_kill = None if released is None else round(load.now() - marks["kill"], 1)
    figures = measure(env, "e", outcomes, tenants, var_dir, converge_bound=CONVERGE_BOUND)
    in_flight = {o.tag for o in outcomes if o.status == 0 and o.gateway == victim.url}
    figures["killed_in_flight"] = len(in_flight)
    figures["reservations_open_at_kill"] = len(held)
    figures["released_after_kill_s"] = released_after_kill
    figures["recovery"] = f"{len(held)} reservations open at the kill, all released {released_after_kill} s after it"
    env.record("e. gateway killed (SIGKILL)", figures)
    # Only requests in flight on the killed process may fail (no answer), and only their upstream
    # calls may lack a row: that process died before it could record them; nobody was answered.
    assert all(o.status in (200, 402) or o.tag in in_flight for o in outcomes), figures["statuses"]
    assert held, "no reservation was open at the kill: the scenario did not test lease expiry"
    assert released_after_kill is not None, f"reservations open at the kill still open: {figures['counters']}"
    assert_money_invariants(figures, allowed_lost=in_flight)


def test_f_1000_mid_stream_disconnects(faults_env: FaultEnv) -> None:
    """1,000 streaming requests, all at once (1,000 clients), each dropped by its client after the
    first chunk (the upstream spaces its frames 0.2 s apart, so the stream is really cut mid-way)."""
    env = faults_env
    env.upstream.frame_delay = 0.2
    var_dir = env.start_gateways("f")
    tenants = pair(env, "f")
    disconnects = env.upstream.disconnects
    load = Load(
        "f",
        keys(tenants),
        live(env),
        rate=1000,
        concurrency=1000,
        total=1000,
        stream=True,
        abort_after_first_chunk=True,
    )
    outcomes = run(load.run())
    figures = measure(env, "f", outcomes, tenants, var_dir, converge_bound=CONVERGE_BOUND)
    figures["upstream_saw_disconnect"] = env.upstream.disconnects - disconnects
    env.record("f. 1,000 mid-stream disconnects", figures)
    assert not errors(outcomes), figures["statuses"]
    assert_money_invariants(figures)


def test_g_200_concurrent_streams_60s(faults_env: FaultEnv) -> None:
    """200 streams at a time for 60 s (each about 9 s: frames 1 s apart); RSS of each gateway
    before and after."""
    env = faults_env
    env.upstream.frame_delay = 1.0
    var_dir = env.start_gateways("g")
    tenants = [env.tenants["g-main"]]
    rss_before = [round(g.rss_mib(), 1) for g in env.gateways]
    load = Load("g", keys(tenants), live(env), rate=50, concurrency=200, duration=60, stream=True)
    outcomes = run(load.run())
    rss_after = [round(g.rss_mib(), 1) for g in env.gateways]
    figures = measure(env, "g", outcomes, tenants, var_dir, converge_bound=CONVERGE_BOUND)
    incomplete = [o.tag for o in outcomes if o.status == 200 and not o.complete]
    figures["incomplete_streams"] = len(incomplete)
    figures["rss_mib_before"] = rss_before
    figures["rss_mib_after"] = rss_after
    figures["recovery"] = f"RSS MiB {rss_before} -> {rss_after}"
    figures["transport_errors"] = load.transport_errors[:20]
    env.record("g. 200 concurrent streams, 60 s", figures)
    assert not errors(outcomes), figures["statuses"]
    assert not incomplete, f"{len(incomplete)} streams did not reach [DONE]"
    assert_money_invariants(figures)
