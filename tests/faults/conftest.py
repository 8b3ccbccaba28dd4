"""The fault suite's environment: one disposable PostgreSQL and Redis, migrated and seeded once for
the module (tests/faults/harness.py) and gone when its last scenario ends, so nothing of it lingers
while the rest of the suite runs; the figures table is printed at the end of the run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.harness import FaultEnv, render

#: Hard monthly budgets (micro-USD) per tenant. ``main`` never runs out (every request still
#: reserves and settles); ``tight`` runs out during the scenario's load, so overrun is measured.
#: A request of the suite costs 95 micro-USD (10 prompt tokens at $2.50/M, 7 completion at $10/M).
MAIN_LIMIT = 10**12
TENANTS = {
    "a-main": MAIN_LIMIT,
    "a-tight": 15_000,
    "b-main": MAIN_LIMIT,
    "b-tight": 15_000,
    "c-main": MAIN_LIMIT,
    "c-tight": 10_000,
    "d-main": MAIN_LIMIT,
    "d-tight": 10_000,
    "e-main": MAIN_LIMIT,
    "e-tight": 10_000,
    "f-main": MAIN_LIMIT,
    "f-tight": 20_000,
    "g-main": MAIN_LIMIT,
}

_ENVS: list[FaultEnv] = []


@pytest.fixture(scope="module")
def faults_env() -> Iterator[FaultEnv]:
    env = FaultEnv(TENANTS)
    _ENVS.append(env)
    try:
        yield env
    finally:
        env.destroy()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for env in _ENVS:
        if env.figures:
            terminalreporter.section("fault suite figures")
            terminalreporter.write(render(env.figures))
            terminalreporter.write_line(f"(also in {env.report_dir}/figures.json and figures.md)")
