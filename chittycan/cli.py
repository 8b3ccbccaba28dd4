"""The ``can`` console script: ``can <command> ...`` runs the Django management command of that name.

``can serve``, ``can apply -f chittycan.yaml``, ``can export``, ``can keys create|list|revoke|rotate``,
``can tenants create|list``, ... are all management commands of the project's apps, so they work
the same as ``python manage.py <command>``.
"""

from __future__ import annotations

import os
import sys

from django.core.management import execute_from_command_line

from core import origin

# Every management command of our apps, with the line ``can --help`` shows for it (kept here, not
# read from the command classes, so ``can --help`` works before settings or a database are set up;
# tests/test_cli_help.py fails when a command is missing here).
COMMANDS: dict[str, str] = {
    "serve": "run the gateway (ASGI) with uvicorn, granian or daphne",
    "quickstart": "create a demo tenant, an admin user and an API key; print how to call the gateway",
    "apply": "make the database match a configuration file (-f chittycan.yaml [--dry-run] [--prune])",
    "export": "write the current configuration as YAML in the `can apply` format (secrets as ${ENV})",
    "tenants": "create tenants and show the tenant tree",
    "keys": "create, list, revoke and rotate API keys (new keys are printed once)",
    "budgets": "set, delete and list budgets; reconcile live counters with the ledger",
    "analytics": "cost analytics from the usage ledger; rollups and retention (costs|rollup|prune)",
    "metrics": "latency percentiles, models and cache hits from the usage ledger",
    "cache": "the response cache: count or drop a tenant's cached answers (invalidate|stats --tenant SLUG)",
    "trace": "one request's usage row and per-stage timings, by its x-request-id",
    "route": "explain the routing policy's decision for a request without sending it (explain --key K -f req.json)",
    "experiments": "routing experiments (A/B): per arm results and significance, promote a winner (show ID)",
    "billing": "Stripe usage export: the meter CSV, pushing meter events, runs and reconciliation",
    "members": "give users a role on a tenant for the management REST API",
    "apitoken": "create, list and revoke management REST API tokens",
    "providers": "provider deployments: circuit breakers and health (status [--json]), probes now (probe)",
    "otp": "enrol, list and remove the TOTP devices staff use to log in to the admin",
    "audit": "the tamper-evident audit log: verify the hash chain, export (csv|jsonl), prune past retention",
}
OUR_COMMANDS = tuple(COMMANDS)

# Django's own commands an operator needs most often (every Django command works).
DJANGO_COMMANDS: dict[str, str] = {
    "migrate": "create or upgrade the database tables",
    "createsuperuser": "create an admin user (--username NAME)",
    "changepassword": "change a user's password",
    "shell": "a Python shell with the project loaded",
    "check": "check the configuration (--deploy for production settings)",
}


def help_text() -> str:
    """What ``can``, ``can -h``, ``can --help`` and ``can help`` print."""
    width = max(len(name) for name in (*COMMANDS, *DJANGO_COMMANDS))
    lines = ["usage: can <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "Django commands (every Django management command works):"]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in DJANGO_COMMANDS.items()]
    lines += ["", "`can <command> --help` shows a command's options."]
    return "\n".join(lines)


def command_origin(args: list[str]) -> origin.Origin:
    """The audit log records commands as `cli`, with the OS user, the host and the command's name
    (the words before its first option: options and values may hold secrets, so never those)."""
    words = ["can"]
    for arg in args[:2]:
        if arg.startswith("-"):
            break
        words.append(arg)
    return origin.for_command("cli", " ".join(words))


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chittycan.settings")
    if not args or args in (["-h"], ["--help"], ["help"]):
        print(help_text())
        return
    with origin.using(command_origin(args)):
        execute_from_command_line(["can", *args])


if __name__ == "__main__":
    main()
