"""Routing policies: ordered rules whose conditions are CEL expressions, first match wins.

A policy is a list of rules (and an optional fallback chain); a rule has a name, a condition (a CEL
expression over the variables below; empty: always true) and an action: route to a model or a
list of deployments, a weighted split, reject with a message, a fallback chain, timeouts and
retries, tags; or ``include`` another named rule set (a *library* policy) whose rules are tried
in its place.

Conditions are compiled once, when the route table snapshot is built (``gateway.routing.table``),
and evaluated per request with only the variables a rule references (the CEL binding converts
every value it is given, so the activation is kept flat and small; see docs/routing.md for the
measurements). ``evaluate`` never raises: a condition that fails at run time (a missing map key,
a type mismatch) or returns a non-boolean counts as not matched and is reported in
``Decision.errors``.

This module is pure: it knows nothing of Django, the catalogue or live state. The route stage
(``gateway.pipeline.route``) builds the facts, evaluates, and resolves the targets.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.routing import celcore

if TYPE_CHECKING:
    import cel  # the types of the package's stubs; the module itself is loaded by celcore.core()

#: The condition variables (flat names: see docs/routing.md), with what they hold.
VARIABLES: dict[str, str] = {
    "model": "the public model the client asked for (string)",
    "tokens": "estimated prompt tokens (int)",
    "max_tokens": "max output tokens the client asked for, 0 when unset (int)",
    "has_tools": "the request declares tools (bool)",
    "has_images": "a message carries an image (bool)",
    "stream": "the client asked for a stream (bool)",
    "tags": "tags from the X-ChittyCan-Tags header, comma-separated (list of strings)",
    "metadata": "the request's metadata object, string values (map)",
    "endpoint": "chat | completions | embeddings | messages (string)",
    "key_name": "the API key's name (string)",
    "key_scopes": "the key's endpoint scopes, ['*'] when unrestricted (list of strings)",
    "tenant": "the tenant's slug (string)",
    "tenant_path": "slugs from the root of the tenant tree down to the tenant (list of strings)",
    "plan": "the tenant's plan name, '' without one (string)",
    "hour": "hour of day in the tenant's time zone, 0-23 (int)",
    "weekday": "day of week in the tenant's time zone, 0 = Monday .. 6 = Sunday (int)",
    "health": "breaker state per deployment 'provider/upstream-model': closed | open | half_open (map)",
    "p50_ms": "median latency per deployment 'provider/upstream-model' in ms, -1.0 when unknown (map)",
    "budget_used": "the most used budget of the key and its tenant chain, as a fraction 0.0-1.0+ (double)",
}

#: Variables that cost something to compute (live state): built only when a rule references them.
LIVE_VARIABLES = frozenset({"health", "p50_ms", "budget_used"})

MAX_INCLUDE_DEPTH = 8

_HOP_TEXT = re.compile(r"^\s*(?P<target>[^\s(]+)\s*(?:\(\s*timeout\s*:\s*(?P<timeout>[^)]+)\)\s*)?$")
_DURATION = re.compile(r"^\s*(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>ms|s)?\s*$")


class PolicyError(ValueError):
    """A policy that cannot be compiled; ``field`` names the rule field at fault."""

    def __init__(self, message: str, *, field: str = "", rule: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.rule = rule

    def __str__(self) -> str:
        where = f"rule {self.rule!r}, {self.field}: " if self.rule and self.field else ""
        return f"{where}{self.message}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-hop limits in seconds; None: the provider's own setting."""

    connect: float | None = None
    first_byte: float | None = None
    total: float | None = None

    def as_dict(self) -> dict[str, float]:
        return {
            k: v
            for k, v in (("connect", self.connect), ("first_byte", self.first_byte), ("total", self.total))
            if v is not None
        }


@dataclass(frozen=True, slots=True)
class Hop:
    """One step of a fallback chain: a target (model or ``provider/upstream-model``) and its limits."""

    target: str
    timeouts: Timeouts = Timeouts()


@dataclass(frozen=True, slots=True)
class Action:
    route: tuple[str, ...] = ()
    split: tuple[tuple[str, int], ...] = ()
    reject: str = ""
    fallback: tuple[Hop, ...] | None = None  # None: the policy's chain
    timeouts: Timeouts | None = None
    retries: int | None = None
    tags: tuple[str, ...] = ()
    include: str = ""


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    condition: str
    program: cel.Program | None
    variables: frozenset[str]
    action: Action


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    rules: tuple[Rule, ...]
    fallback: tuple[Hop, ...] = ()
    tenant_id: int | None = None
    library: bool = False

    @property
    def variables(self) -> frozenset[str]:
        return frozenset().union(*(r.variables for r in self.rules)) if self.rules else frozenset()


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every active policy of the snapshot: the global one, one per tenant, and all by name."""

    global_policy: Policy | None = None
    by_tenant: Mapping[int, Policy] = field(default_factory=dict)
    by_name: Mapping[str, Policy] = field(default_factory=dict)

    def chain(self, lineage: Iterable[int]) -> list[Policy]:
        """The policies a tenant sees, nearest first: its own, each ancestor's, then the global one."""
        found = [self.by_tenant[t] for t in lineage if t in self.by_tenant]
        if self.global_policy is not None:
            found.append(self.global_policy)
        return found

    def variables(self, policies: Sequence[Policy]) -> frozenset[str]:
        """Every variable the policies (and the rule sets they include) reference."""
        names: set[str] = set()
        seen: set[str] = set()
        todo = list(policies)
        while todo:
            policy = todo.pop()
            if policy.name in seen:
                continue
            seen.add(policy.name)
            names |= policy.variables
            todo.extend(self.by_name[r.action.include] for r in policy.rules if r.action.include in self.by_name)
        return frozenset(names)


@dataclass(slots=True)
class Decision:
    """What the policy says about one request (empty ``rule``: no rule matched)."""

    policy: str = ""
    rule: str = ""
    route: tuple[str, ...] = ()
    split: tuple[tuple[str, int], ...] = ()
    split_pick: str = ""
    reject: str = ""
    fallback: tuple[Hop, ...] = ()
    timeouts: Timeouts | None = None
    retries: int | None = None
    tags: tuple[str, ...] = ()
    errors: list[str] = field(default_factory=list)

    @property
    def targets(self) -> tuple[str, ...]:
        """The targets to route to: the split's pick, or the route list."""
        return (self.split_pick,) if self.split_pick else self.route


# --- compiling --------------------------------------------------------------------------------------


def compile_condition(condition: str, *, rule: str = "") -> tuple[cel.Program | None, frozenset[str]]:
    """Compile a CEL condition; its referenced variables must be known ones."""
    text = condition.strip()
    if not text:
        return None, frozenset()
    try:
        program: cel.Program = celcore.core().compile(text)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise PolicyError(f"CEL syntax error: {_one_line(str(exc))}", field="condition", rule=rule) from None
    names = frozenset(program.variables())
    unknown = sorted(names - VARIABLES.keys())
    if unknown:
        raise PolicyError(
            f"unknown variable(s) {', '.join(unknown)}; known: {', '.join(sorted(VARIABLES))}",
            field="condition",
            rule=rule,
        )
    return program, names


def parse_duration(value: Any, *, field_name: str, rule: str = "") -> float:
    """Seconds from ``2``, ``2.5``, ``"2s"`` or ``"500ms"``."""
    if isinstance(value, bool):
        raise PolicyError(f"not a duration: {value!r}", field=field_name, rule=rule)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match["value"]) / (1000.0 if match["unit"] == "ms" else 1.0)
    else:
        raise PolicyError(f"not a duration (e.g. 2, '2s', '500ms'): {value!r}", field=field_name, rule=rule)
    if not 0 < seconds <= 3600:
        raise PolicyError(f"a duration must be over 0 and at most 3600 s: {value!r}", field=field_name, rule=rule)
    return seconds


def parse_timeouts(value: Any, *, field_name: str = "timeouts", rule: str = "") -> Timeouts | None:
    """``{connect, first_byte, total}`` (any subset), or one duration meaning ``total``."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        return Timeouts(total=parse_duration(value, field_name=field_name, rule=rule))
    unknown = sorted(set(value) - {"connect", "first_byte", "total"})
    if unknown:
        raise PolicyError(
            f"unknown timeout(s) {', '.join(unknown)} (connect, first_byte, total)", field=field_name, rule=rule
        )
    parts = {k: parse_duration(v, field_name=field_name, rule=rule) for k, v in value.items() if v is not None}
    return Timeouts(**parts)


def parse_hop(item: Any, *, field_name: str = "fallback", rule: str = "") -> Hop:
    """``"groq/llama-3-70b (timeout: 2s)"``, ``"model"`` or ``{route: ..., timeout(s): ...}``."""
    if isinstance(item, str):
        match = _HOP_TEXT.match(item)
        if not match:
            raise PolicyError(f"not a fallback hop: {item!r}", field=field_name, rule=rule)
        timeout = match["timeout"]
        limits = Timeouts(total=parse_duration(timeout, field_name=field_name, rule=rule)) if timeout else Timeouts()
        return Hop(match["target"], limits)
    if isinstance(item, dict):
        target = item.get("route") or item.get("target")
        if not isinstance(target, str) or not target.strip():
            raise PolicyError("a fallback hop needs `route: model-or-deployment`", field=field_name, rule=rule)
        unknown = sorted(set(item) - {"route", "target", "timeout", "timeouts"})
        if unknown:
            raise PolicyError(f"unknown key(s) in a fallback hop: {', '.join(unknown)}", field=field_name, rule=rule)
        raw = item.get("timeouts", item.get("timeout"))
        return Hop(target.strip(), parse_timeouts(raw, field_name=field_name, rule=rule) or Timeouts())
    raise PolicyError(f"not a fallback hop: {item!r}", field=field_name, rule=rule)


def parse_chain(value: Any, *, field_name: str = "fallback", rule: str = "") -> tuple[Hop, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PolicyError("a fallback chain is a list of hops", field=field_name, rule=rule)
    return tuple(parse_hop(item, field_name=field_name, rule=rule) for item in value)


def _targets(value: Any, *, rule: str) -> tuple[str, ...]:
    if value is None or value == "" or value == []:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i.strip() for i in items):
        raise PolicyError(
            "route is a model name, a `provider/upstream-model`, or a list of them", field="route", rule=rule
        )
    return tuple(i.strip() for i in items)


def _split(value: Any, *, rule: str) -> tuple[tuple[str, int], ...]:
    if not value:
        return ()
    if not isinstance(value, list):
        raise PolicyError("split is a list of {route, weight}", field="split", rule=rule)
    arms: list[tuple[str, int]] = []
    for arm in value:
        if not isinstance(arm, dict) or set(arm) - {"route", "weight"}:
            raise PolicyError("each split arm is {route: target, weight: int}", field="split", rule=rule)
        target, weight = arm.get("route"), arm.get("weight", 1)
        if not isinstance(target, str) or not target.strip():
            raise PolicyError("a split arm needs a route", field="split", rule=rule)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise PolicyError(f"a split weight is an int >= 0: {weight!r}", field="split", rule=rule)
        arms.append((target.strip(), weight))
    if sum(w for _, w in arms) <= 0:
        raise PolicyError("a split needs a positive total weight", field="split", rule=rule)
    return tuple(arms)


RULE_FIELDS = ("name", "condition", "route", "split", "reject", "fallback", "timeouts", "retries", "tags", "include")


def parse_rule(data: Mapping[str, Any], index: int = 0) -> Rule:
    """A rule from its configuration mapping (the config file and the admin share this)."""
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise PolicyError("every rule needs a name", field="name", rule=f"#{index + 1}")
    name = name.strip()
    unknown = sorted(set(data) - set(RULE_FIELDS))
    if unknown:
        raise PolicyError(f"unknown field(s) {', '.join(unknown)}", field="name", rule=name)
    condition = data.get("condition") or ""
    if isinstance(condition, bool):
        condition = "true" if condition else "false"
    if not isinstance(condition, str):
        raise PolicyError("a condition is a CEL expression (a string)", field="condition", rule=name)
    program, variables = compile_condition(condition, rule=name)
    retries = data.get("retries")
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10):
        raise PolicyError("retries is an int from 0 to 10", field="retries", rule=name)
    tags = data.get("tags") or []
    if isinstance(tags, str):
        tags = [t.strip() for t in tags.split(",") if t.strip()]
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise PolicyError("tags is a list of strings", field="tags", rule=name)
    reject = data.get("reject") or ""
    if not isinstance(reject, str):
        raise PolicyError("reject is the message the client gets", field="reject", rule=name)
    include = data.get("include") or ""
    if not isinstance(include, str):
        raise PolicyError("include names a rule set", field="include", rule=name)
    fallback_raw = data.get("fallback")
    action = Action(
        route=_targets(data.get("route"), rule=name),
        split=_split(data.get("split"), rule=name),
        reject=reject.strip(),
        fallback=parse_chain(fallback_raw, rule=name) if fallback_raw is not None else None,
        timeouts=parse_timeouts(data.get("timeouts"), rule=name),
        retries=retries,
        tags=tuple(tags),
        include=include.strip(),
    )
    chosen = [
        f
        for f, v in (
            ("route", action.route),
            ("split", action.split),
            ("reject", action.reject),
            ("include", action.include),
        )
        if v
    ]
    if len(chosen) > 1:
        raise PolicyError(
            f"a rule does one of route, split, reject, include; this one has {', '.join(chosen)}",
            field=chosen[1],
            rule=name,
        )
    return Rule(name=name, condition=condition.strip(), program=program, variables=variables, action=action)


def parse_policy(
    name: str,
    rules: Sequence[Mapping[str, Any]],
    fallback: Any = None,
    *,
    tenant_id: int | None = None,
    library: bool = False,
) -> Policy:
    parsed = tuple(parse_rule(r, i) for i, r in enumerate(rules))
    names = [r.name for r in parsed]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise PolicyError(f"two rules are named {duplicate!r}", field="name", rule=duplicate)
    return Policy(
        name=name,
        rules=parsed,
        fallback=parse_chain(fallback, field_name="fallback_chain"),
        tenant_id=tenant_id,
        library=library,
    )


def check_includes(policies: Mapping[str, Policy]) -> None:
    """Every ``include`` names a known rule set, and no rule set includes itself (directly or not)."""
    for policy in policies.values():
        for rule in policy.rules:
            if rule.action.include and rule.action.include not in policies:
                raise PolicyError(
                    f"includes an unknown rule set {rule.action.include!r}", field="include", rule=rule.name
                )

    def walk(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise PolicyError(f"include cycle: {' -> '.join((*path, name))}", field="include")
        if len(path) > MAX_INCLUDE_DEPTH:
            raise PolicyError(f"includes nest deeper than {MAX_INCLUDE_DEPTH}", field="include")
        for rule in policies[name].rules:
            if rule.action.include in policies:
                walk(rule.action.include, (*path, name))

    for name in policies:
        walk(name, ())


# --- evaluating -------------------------------------------------------------------------------------


def matches(rule: Rule, facts: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the rule's condition holds; never raises (an error is a non-match, with its text)."""
    if rule.program is None:
        return True, ""
    try:
        result = rule.program.execute({name: facts[name] for name in rule.variables if name in facts})
    except Exception as exc:  # noqa: BLE001 - the binding raises several types; a rule never breaks a request
        return False, f"{rule.name}: {_one_line(str(exc))}"
    if result is True:
        return True, ""
    if result is False:
        return False, ""
    return False, f"{rule.name}: the condition gave {type(result).__name__}, not a bool"


def evaluate(
    policies: Sequence[Policy],
    facts: Mapping[str, Any],
    library: Mapping[str, Policy] | None = None,
    choose: Callable[[Sequence[tuple[str, int]]], str] | None = None,
) -> Decision:
    """The first matching rule of the policies (nearest first), as a ``Decision``; never raises."""
    decision = Decision()
    try:
        for policy in policies:
            found = _first_match(policy, facts, library or {}, decision, (), ())
            if found is not None:
                rule, owner, outer_tags = found
                decision.policy = policy.name
                _apply(decision, rule, owner, policies, outer_tags, choose or weighted_choice)
                return decision
    except Exception as exc:  # noqa: BLE001 - never break a request over a policy
        decision.errors.append(f"policy evaluation failed: {_one_line(str(exc))}")
        decision.rule = ""
    return decision


def _first_match(
    policy: Policy,
    facts: Mapping[str, Any],
    library: Mapping[str, Policy],
    decision: Decision,
    path: tuple[str, ...],
    tags: tuple[str, ...],
) -> tuple[Rule, Policy, tuple[str, ...]] | None:
    if policy.name in path or len(path) > MAX_INCLUDE_DEPTH:
        decision.errors.append(f"include cycle at {policy.name}")
        return None
    for rule in policy.rules:
        ok, error = matches(rule, facts)
        if error:
            decision.errors.append(error)
        if not ok:
            continue
        if rule.action.include:
            included = library.get(rule.action.include)
            if included is None:
                decision.errors.append(f"{rule.name}: unknown rule set {rule.action.include!r}")
                continue
            inner = _first_match(included, facts, library, decision, (*path, policy.name), (*tags, *rule.action.tags))
            if inner is not None:
                return inner
            continue
        return rule, policy, tags
    return None


def _apply(
    decision: Decision,
    rule: Rule,
    owner: Policy,
    policies: Sequence[Policy],
    outer_tags: tuple[str, ...],
    choose: Callable[[Sequence[tuple[str, int]]], str],
) -> None:
    action = rule.action
    decision.rule = rule.name if owner.name == decision.policy else f"{owner.name}:{rule.name}"
    decision.route = action.route
    decision.split = action.split
    decision.split_pick = choose(action.split) if action.split else ""
    decision.reject = action.reject
    if action.fallback is not None:
        decision.fallback = action.fallback
    else:
        decision.fallback = owner.fallback or next((p.fallback for p in policies if p.fallback), ())
    decision.timeouts = action.timeouts
    decision.retries = action.retries
    decision.tags = (*outer_tags, *action.tags)


def weighted_choice(arms: Sequence[tuple[str, int]]) -> str:
    weights = [max(w, 0) for _, w in arms]
    if sum(weights) <= 0:
        return arms[0][0]
    return random.choices([t for t, _ in arms], weights=weights)[0]


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]
