"""Routing experiments (A/B tests): a weighted split with an id and named arms.

An experiment applies to a public model (the name the client asks for) or to one rule of a
routing policy (``policy:rule`` or the rule's name as ``X-ChittyCan-Route`` shows it), for the
tenant it belongs to and the tenants below it (or for every tenant when it is global). While it
runs, each request is assigned an arm: deterministically from the request id, or sticky per end
user when the request names one (``user`` in the body), so one user always sees the same arm.
The arm's target (a public model or ``provider/upstream-model``) serves the request; the arm is
written on the ledger row and in ``X-ChittyCan-Experiment: id=arm``.

Once promoted (by hand or by the auto-promotion task, see ``gateway.experiments``), every request
goes to the winning arm. This module is pure: no Django, no I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "STATUSES",
    "Arm",
    "ExperimentError",
    "ExperimentSpec",
    "assign",
    "bucket",
    "parse_arms",
]

#: draft: not assigning yet; running: assigning; paused: not assigning; promoted: the winner takes all.
STATUSES = ("draft", "running", "paused", "promoted")
ASSIGNING = frozenset({"running", "promoted"})

_ARM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,50}$")
#: Buckets per experiment: the split's resolution (weights are proportions over this many buckets).
BUCKETS = 10_000


class ExperimentError(ValueError):
    """An experiment that cannot be used; ``field`` names the field at fault."""

    def __init__(self, message: str, *, field: str = "arms") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True, slots=True)
class Arm:
    name: str
    target: str
    weight: int


@dataclass(frozen=True, slots=True)
class ExperimentSpec:
    slug: str
    arms: tuple[Arm, ...]
    model: str = ""  # the public model it applies to ...
    rule: str = ""  # ... or a routing policy's rule (``policy:rule`` or ``rule``)
    tenant_id: int | None = None  # None: every tenant
    status: str = "running"
    winner: str = ""

    def applies(self, model: str, rule: str, policy: str, lineage: Iterable[int]) -> bool:
        if self.status not in ASSIGNING:
            return False
        if self.tenant_id is not None and self.tenant_id not in lineage:
            return False
        if self.rule:
            return bool(rule) and self.rule in (rule, f"{policy}:{rule}")
        return self.model == model

    def arm(self, name: str) -> Arm | None:
        return next((a for a in self.arms if a.name == name), None)


def parse_arms(value: Any) -> tuple[Arm, ...]:
    """Arms from their configuration: ``[{name, route, weight}, ...]`` (two or more, unique names)."""
    if not isinstance(value, list) or len(value) < 2:
        raise ExperimentError("an experiment has at least two arms: [{name, route, weight}, ...]")
    arms: list[Arm] = []
    for item in value:
        if not isinstance(item, Mapping):
            raise ExperimentError(f"an arm is {{name, route, weight}}: {item!r}")
        unknown = sorted(set(item) - {"name", "route", "weight"})
        if unknown:
            raise ExperimentError(f"unknown key(s) in an arm: {', '.join(unknown)} (name, route, weight)")
        name, target, weight = item.get("name"), item.get("route"), item.get("weight", 1)
        if not isinstance(name, str) or not _ARM_NAME.match(name):
            raise ExperimentError(f"an arm's name is 1-50 letters, digits, '_', '.' or '-': {name!r}")
        if not isinstance(target, str) or not target.strip():
            raise ExperimentError(f"arm {name}: route names a model or a provider/upstream-model")
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ExperimentError(f"arm {name}: weight is an int >= 0, not {weight!r}")
        arms.append(Arm(name=name, target=target.strip(), weight=weight))
    names = [a.name for a in arms]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ExperimentError(f"two arms are named {duplicate!r}")
    if sum(a.weight for a in arms) <= 0:
        raise ExperimentError("the arms need a positive total weight")
    return tuple(arms)


def bucket(slug: str, unit: str) -> int:
    """A stable bucket 0..BUCKETS-1 for the unit (request id or end user) within the experiment."""
    digest = hashlib.sha256(f"{slug}\x00{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def assign(spec: ExperimentSpec, unit: str) -> Arm:
    """The unit's arm: the winner once promoted, else by weight over the buckets (same unit, same arm)."""
    if spec.status == "promoted" and spec.winner:
        won = spec.arm(spec.winner)
        if won is not None:
            return won
    return pick(spec.arms, bucket(spec.slug, unit))


def pick(arms: Sequence[Arm], point: int) -> Arm:
    total = sum(max(a.weight, 0) for a in arms)
    if total <= 0:
        return arms[0]
    scaled = point * total // BUCKETS
    edge = 0
    for arm in arms:
        edge += max(arm.weight, 0)
        if scaled < edge:
            return arm
    return arms[-1]
