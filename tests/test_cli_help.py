"""``can --help``: every command of ours, each with a one-line description, without a database.

When a new management command is added to one of our apps, add a line for it to
``chittycan.cli.COMMANDS``; ``test_every_command_of_ours_is_listed`` fails until then.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chittycan import cli

ROOT = Path(__file__).resolve().parent.parent
CAN = Path(sys.executable).with_name("can")


def our_commands() -> set[str]:
    """The management commands our apps define (``_helpers.py`` modules are not commands)."""
    found = set()
    for path in ROOT.glob("*/management/commands/*.py"):
        if ".venv" not in path.parts and not path.name.startswith("_"):
            found.add(path.stem)
    return found


def run_can(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    # A clean environment: no settings module, no database URL, not dev mode. Help must not need any.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **extra_env}
    return subprocess.run([str(CAN), *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_every_command_of_ours_is_listed() -> None:
    commands = our_commands()
    assert {"budgets", "keys", "apply", "serve", "trace", "billing"} <= commands  # the scan itself works
    assert set(cli.COMMANDS) == commands


@pytest.mark.parametrize("flag", [[], ["--help"], ["-h"], ["help"]])
def test_help_lists_every_command_with_a_description(flag: list[str]) -> None:
    res = run_can(*flag)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "usage: can <command> [options]"
    for name in our_commands() | set(cli.DJANGO_COMMANDS):
        [line] = [ln for ln in lines if ln.split()[:1] == [name]]
        description = line.strip()[len(name) :].strip()
        assert len(description) > 10, f"{name} has no description: {line!r}"
    assert "budgets" in res.stdout and "set, delete and list budgets" in res.stdout
    assert res.stderr == ""


def test_help_on_one_command_shows_its_options() -> None:
    res = run_can("help", "trace", CHITTYCAN_MODE="dev")
    assert res.returncode == 0, res.stderr
    assert "request_id" in res.stdout and "x-request-id" in res.stdout


def test_unknown_command_is_a_clear_error() -> None:
    res = run_can("no-such-command", CHITTYCAN_MODE="dev")
    assert res.returncode != 0
    assert "Unknown command: 'no-such-command'" in res.stderr


def test_make_run_says_how_to_reach_can() -> None:
    """`make run` prints where the CLI is and how to put it on PATH (before the server starts)."""
    res = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "The can CLI is .venv/bin/can" in text and "source .venv/bin/activate" in text
    assert text.index("source .venv/bin/activate") < text.index("can serve")
