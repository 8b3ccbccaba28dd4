"""Routing policies (gateway.routing.policy): compiling, every condition variable, every action,
includes, and the evaluator never raising whatever the request."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.routing.policy import (
    VARIABLES,
    Hop,
    Policy,
    PolicyError,
    PolicySet,
    Timeouts,
    check_includes,
    evaluate,
    parse_chain,
    parse_hop,
    parse_policy,
    parse_rule,
)

ROOT = Path(__file__).resolve().parents[2]

FACTS: dict[str, Any] = {
    "model": "gpt-4o",
    "tokens": 42,
    "max_tokens": 256,
    "has_tools": False,
    "has_images": False,
    "stream": False,
    "tags": ["batch"],
    "metadata": {"team": "search"},
    "endpoint": "chat",
    "key_name": "ci",
    "key_scopes": ["*"],
    "tenant": "acme-search",
    "tenant_path": ["acme", "acme-search"],
    "plan": "pro",
    "hour": 14,
    "weekday": 2,
    "health": {"openai/gpt-4o": "closed", "groq/llama": "open"},
    "p50_ms": {"openai/gpt-4o": 420.0, "groq/llama": -1.0},
    "budget_used": 0.5,
}


def policy(*rules: dict[str, Any], name: str = "p", fallback: Any = None) -> Policy:
    return parse_policy(name, list(rules), fallback)


def first_rule(condition: str, facts: dict[str, Any] | None = None) -> str:
    decision = evaluate([policy({"name": "hit", "condition": condition, "route": "m"})], facts or FACTS)
    return decision.rule


# Every variable, a condition that holds on FACTS and one that does not.
VARIABLE_CASES = {
    "model": ('model == "gpt-4o"', 'model.startsWith("claude")'),
    "tokens": ("tokens < 100", "tokens > 500"),
    "max_tokens": ("max_tokens == 256", "max_tokens > 1000"),
    "has_tools": ("!has_tools", "has_tools"),
    "has_images": ("!has_images", "has_images"),
    "stream": ("stream == false", "stream"),
    "tags": ('"batch" in tags', '"urgent" in tags'),
    "metadata": ('metadata["team"] == "search"', '"team" in metadata && metadata["team"] == "ads"'),
    "endpoint": ('endpoint == "chat"', 'endpoint == "embeddings"'),
    "key_name": ('key_name == "ci"', 'key_name == "prod"'),
    "key_scopes": ('"*" in key_scopes', '"embeddings" in key_scopes'),
    "tenant": ('tenant.endsWith("-search")', 'tenant == "other"'),
    "tenant_path": ('"acme" in tenant_path', 'tenant_path[0] == "globex"'),
    "plan": ('plan == "pro"', 'plan == "free"'),
    "hour": ("hour >= 9 && hour < 18", "hour < 6"),
    "weekday": ("weekday < 5", "weekday >= 5"),
    "health": ('health["openai/gpt-4o"] == "closed"', 'health["groq/llama"] == "closed"'),
    "p50_ms": ('p50_ms["openai/gpt-4o"] < 1000.0', 'p50_ms["openai/gpt-4o"] > 1000.0'),
    "budget_used": ("budget_used < 0.8", "budget_used >= 0.8"),
}


def test_every_variable_has_a_case() -> None:
    assert set(VARIABLE_CASES) == set(VARIABLES)


@pytest.mark.parametrize("name", sorted(VARIABLE_CASES))
def test_condition_variable(name: str) -> None:
    yes, no = VARIABLE_CASES[name]
    assert first_rule(yes) == "hit"
    assert first_rule(no) == ""


def test_roadmap_policy_first_match_wins_and_default() -> None:
    p = policy(
        {"name": "cheap_for_simple", "condition": "tokens < 100", "route": "groq/llama-3-8b"},
        {"name": "smart_for_complex", "condition": "tokens > 500", "route": "anthropic/claude-sonnet"},
        {"name": "default", "route": "openai/gpt-4"},
        fallback=[
            "groq/llama-3-70b (timeout: 2s)",
            "anthropic/claude-sonnet (timeout: 5s)",
            "openai/gpt-4 (timeout: 10s)",
        ],
    )
    short = evaluate([p], {**FACTS, "tokens": 10})
    assert (short.rule, short.targets) == ("cheap_for_simple", ("groq/llama-3-8b",))
    assert [h.timeouts.total for h in short.fallback] == [2.0, 5.0, 10.0]
    assert evaluate([p], {**FACTS, "tokens": 900}).rule == "smart_for_complex"
    assert evaluate([p], {**FACTS, "tokens": 300}).targets == ("openai/gpt-4",)


def test_route_to_a_deployment_list() -> None:
    d = evaluate([policy({"name": "r", "route": ["openai/gpt-4o", "azure/gpt-4o"]})], FACTS)
    assert d.targets == ("openai/gpt-4o", "azure/gpt-4o")


def test_weighted_split_picks_by_weight() -> None:
    p = policy({"name": "ab", "split": [{"route": "a", "weight": 3}, {"route": "b", "weight": 1}]})
    picks = [evaluate([p], FACTS).split_pick for _ in range(2000)]
    share = picks.count("a") / len(picks)
    assert 0.68 < share < 0.82
    assert evaluate([p], FACTS, choose=lambda arms: "b").targets == ("b",)
    zero = policy({"name": "only", "split": [{"route": "a", "weight": 0}, {"route": "b", "weight": 5}]})
    assert {evaluate([zero], FACTS).split_pick for _ in range(50)} == {"b"}


def test_reject_timeouts_retries_tags_and_rule_fallback() -> None:
    p = policy(
        {"name": "no-images", "condition": "has_images", "reject": "Images are not allowed on this plan."},
        {
            "name": "tuned",
            "route": "m",
            "timeouts": {"connect": "500ms", "first_byte": 3, "total": "30s"},
            "retries": 1,
            "tags": ["tuned", "x"],
            "fallback": [{"route": "n", "timeouts": {"total": 4}}],
        },
        fallback=["policy-level (timeout: 9s)"],
    )
    rejected = evaluate([p], {**FACTS, "has_images": True})
    assert rejected.reject == "Images are not allowed on this plan."
    tuned = evaluate([p], FACTS)
    assert tuned.timeouts == Timeouts(connect=0.5, first_byte=3.0, total=30.0)
    assert tuned.retries == 1 and tuned.tags == ("tuned", "x")
    assert tuned.fallback == (Hop("n", Timeouts(total=4.0)),)  # the rule's own chain wins


def test_include_a_named_rule_set() -> None:
    library = policy({"name": "night", "condition": "hour < 6", "route": "cheap"}, name="lib")
    outer = policy(
        {"name": "use-lib", "condition": "tenant != 'x'", "include": "lib", "tags": ["outer"]},
        {"name": "default", "route": "strong"},
        name="main",
    )
    at_night = evaluate([outer], {**FACTS, "hour": 3}, {"lib": library})
    assert (at_night.policy, at_night.rule, at_night.targets, at_night.tags) == (
        "main",
        "lib:night",
        ("cheap",),
        ("outer",),
    )
    by_day = evaluate([outer], FACTS, {"lib": library})
    assert (by_day.rule, by_day.targets) == ("default", ("strong",))


def test_include_cycles_and_unknown_sets_are_refused_and_survived() -> None:
    a = policy({"name": "to-b", "include": "b"}, name="a")
    b = policy({"name": "to-a", "include": "a"}, name="b")
    with pytest.raises(PolicyError, match="cycle"):
        check_includes({"a": a, "b": b})
    with pytest.raises(PolicyError, match="unknown rule set"):
        check_includes({"a": a})
    decision = evaluate([a], FACTS, {"a": a, "b": b})  # a cycle slipped through: no match, no exception
    assert decision.rule == "" and decision.errors


def test_child_policy_overrides_parent_and_global() -> None:
    child = parse_policy("child", [{"name": "child-rule", "condition": "tokens < 100", "route": "c"}], tenant_id=2)
    parent = parse_policy("parent", [{"name": "parent-rule", "route": "p"}], tenant_id=1)
    glob = parse_policy("global", [{"name": "global-rule", "route": "g"}])
    policies = PolicySet(global_policy=glob, by_tenant={1: parent, 2: child}, by_name={})
    chain = policies.chain([2, 1])  # lineage: the tenant, then its parent
    assert [p.name for p in chain] == ["child", "parent", "global"]
    assert evaluate(chain, FACTS).rule == "child-rule"
    assert evaluate(chain, {**FACTS, "tokens": 900}).rule == "parent-rule"
    assert evaluate(policies.chain([3]), FACTS).rule == "global-rule"
    assert policies.variables(chain) == {"tokens"}


@pytest.mark.parametrize(
    ("rule", "field", "message"),
    [
        ({"name": "x", "condition": "tokens <"}, "condition", "CEL syntax error"),
        ({"name": "x", "condition": "tokenz < 100"}, "condition", "unknown variable"),
        ({"name": "x", "route": 5}, "route", "route is"),
        ({"name": "x", "route": "a", "reject": "no"}, "reject", "one of"),
        ({"name": "x", "split": [{"route": "a", "weight": -1}]}, "split", "weight"),
        ({"name": "x", "timeouts": {"connect": "soon"}}, "timeouts", "not a duration"),
        ({"name": "x", "timeouts": {"read": 1}}, "timeouts", "unknown timeout"),
        ({"name": "x", "retries": 99}, "retries", "retries"),
        ({"name": "x", "fallback": ["a (timeout: forever)"]}, "fallback", "not a duration"),
        ({"name": "x", "colour": "red"}, "name", "unknown field"),
        ({"condition": "true"}, "name", "needs a name"),
    ],
)
def test_invalid_rules_name_the_field(rule: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as caught:
        parse_rule(rule)
    assert caught.value.field == field


def test_hops_as_the_roadmap_writes_them() -> None:
    assert parse_hop("groq/llama-3-70b (timeout: 2s)") == Hop("groq/llama-3-70b", Timeouts(total=2.0))
    assert parse_hop("openai/gpt-4") == Hop("openai/gpt-4")
    assert parse_chain([{"route": "m", "timeout": "250ms"}]) == (Hop("m", Timeouts(total=0.25)),)


def test_runtime_errors_are_non_matches() -> None:
    p = policy(
        {"name": "bad-key", "condition": 'metadata["missing"] == "x"', "route": "a"},
        {"name": "not-bool", "condition": "tokens + 1", "route": "b"},
        {"name": "type-mismatch", "condition": "tokens < 1.5", "route": "c"},
        {"name": "default", "route": "d"},
    )
    decision = evaluate([p], FACTS)
    assert decision.rule == "default"
    assert len(decision.errors) >= 2


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

ROADMAP_AND_MORE = [
    policy(
        {"name": "cheap", "condition": "tokens < 100 && !has_tools", "route": "a"},
        {"name": "tagged", "condition": '"batch" in tags && metadata["team"] == "x"', "route": "b"},
        {"name": "live", "condition": 'health["a/b"] != "open" && p50_ms["a/b"] < 500.0', "route": "c"},
        {"name": "budget", "condition": "budget_used > 0.9 || tenant_path.size() > 3", "reject": "over"},
        {"name": "ab", "condition": "hour in [1, 2] || weekday == 6", "split": [{"route": "x", "weight": 1}]},
        {"name": "default", "route": "d"},
    )
]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(VARIABLES)), json_values, max_size=len(VARIABLES)))
def test_evaluation_never_raises(facts: dict[str, Any]) -> None:
    decision = evaluate(ROADMAP_AND_MORE, facts)
    assert decision.rule in {"cheap", "tagged", "live", "budget", "ab", "default"}


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_compiling_arbitrary_text_raises_only_policy_errors(condition: str) -> None:
    try:
        rule = parse_rule({"name": "r", "condition": condition, "route": "m"})
    except PolicyError:
        return
    evaluate([Policy(name="p", rules=(rule,))], FACTS)


def test_the_cel_core_loads_without_the_packages_command_line_tool() -> None:
    """The policy compiles with the Rust core alone: the package's CLI (typer, rich, prompt_toolkit,
    pygments: ~26 MiB per gateway process) is never imported, and importing the package later
    reuses the same core."""
    code = (
        "import sys\n"
        "from gateway.routing.policy import compile_condition\n"
        "program, names = compile_condition('tokens < 100 && model == \"m\"')\n"
        "assert program is not None and names == frozenset({'tokens', 'model'}), names\n"
        "cli = [m for m in ('typer', 'rich', 'prompt_toolkit', 'pygments') if m in sys.modules]\n"
        "assert not cli, cli\n"
        "from gateway.routing.celcore import core\n"
        "import cel\n"
        "assert cel.compile is core().compile\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_cel_core_is_loaded_by_the_first_compiled_condition() -> None:
    """A gateway without routing policies never maps the CEL extension (about 2 MiB resident)."""
    code = (
        "import sys\n"
        "from gateway.routing.policy import compile_condition\n"
        "assert 'cel.cel' not in sys.modules\n"
        "compile_condition('tokens < 100')\n"
        "assert 'cel.cel' in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
