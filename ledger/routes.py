"""The ``route`` field of a usage row ("why this model") as text: ``can trace`` and ``can route explain``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["describe_route"]


def describe_route(route: Mapping[str, Any]) -> list[str]:
    """One line per fact: the policy and rule, the model, each candidate and why it was skipped."""
    if not route:
        return ["no routing policy or experiment applied (the model's own deployments, in priority order)"]
    lines = [f"policy {route.get('policy') or '-'}  rule {route.get('rule') or '(none matched)'}"]
    if route.get("rejected"):
        lines.append(f"rejected: {route['rejected']}")
    if route.get("model"):
        lines.append(f"model {route.get('requested') or '-'} -> {route['model']}")
    if route.get("tags"):
        lines.append("tags " + ", ".join(str(t) for t in route["tags"]))
    experiment = route.get("experiment")
    if isinstance(experiment, Mapping):
        text = f"experiment {experiment.get('id')}  arm {experiment.get('arm')} -> {experiment.get('target')}"
        if experiment.get("promoted"):
            text += "  (promoted)"
        if experiment.get("skipped"):
            text += f"  skipped: {experiment['skipped']}"
        lines.append(text)
    extra = []
    if route.get("timeouts"):
        extra.append("timeouts " + ", ".join(f"{k} {v:g}s" for k, v in route["timeouts"].items()))
    if route.get("retries") is not None:
        extra.append(f"retries {route['retries']}")
    if route.get("budget_left_usd"):
        extra.append(f"budget left ${route['budget_left_usd']}")
    if extra:
        lines.append("  ".join(extra))
    candidates = route.get("candidates") or []
    if candidates:
        lines.append("candidates, in order:")
        for n, c in enumerate(candidates, 1):
            where = c.get("deployment") or c.get("target") or "-"
            text = f"  {n}. {where}  ({c.get('role', '-')}: {c.get('target', '-')})"
            if c.get("timeouts"):
                text += " timeouts " + ", ".join(f"{k} {v:g}s" for k, v in c["timeouts"].items())
            if c.get("weight") is not None:
                text += f" weight {c['weight']}"
            if c.get("skipped"):
                text += f"  skipped: {c['skipped']}"
                if c.get("reason"):
                    text += f" ({c['reason']})"
                if c.get("worst_case_usd"):
                    text += f" (worst case ${c['worst_case_usd']})"
            if c.get("note"):
                text += f"  {c['note']}"
            lines.append(text)
    if route.get("served") or route.get("outcome"):
        lines.append(f"served by {route.get('served') or '-'} ({route.get('outcome') or '-'})")
    for error in route.get("errors") or []:
        lines.append(f"condition error: {error}")
    return lines
