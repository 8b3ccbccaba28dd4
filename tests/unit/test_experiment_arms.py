"""Routing experiments' pure part (gateway/routing/experiments.py): arms parsing and assignment."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from gateway.routing.experiments import BUCKETS, ExperimentError, ExperimentSpec, assign, bucket, parse_arms, pick

ARMS: list[dict[str, Any]] = [{"name": "a", "route": "m1", "weight": 1}, {"name": "b", "route": "m2", "weight": 3}]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "at least two arms"),
        (ARMS[:1], "at least two arms"),
        ("a,b", "at least two arms"),
        ([ARMS[0], "b"], "an arm is"),
        ([ARMS[0], {**ARMS[1], "extra": 1}], "unknown key(s) in an arm: extra"),
        ([ARMS[0], {**ARMS[1], "name": "with space"}], "an arm's name"),
        ([ARMS[0], {**ARMS[1], "route": " "}], "route names a model"),
        ([ARMS[0], {**ARMS[1], "weight": -1}], "weight is an int >= 0"),
        ([ARMS[0], {**ARMS[1], "weight": True}], "weight is an int >= 0"),
        ([ARMS[0], {**ARMS[1], "name": "a"}], "two arms are named 'a'"),
        ([{**ARMS[0], "weight": 0}, {**ARMS[1], "weight": 0}], "positive total weight"),
    ],
)
def test_bad_arms_are_refused_with_the_reason(value: Any, message: str) -> None:
    with pytest.raises(ExperimentError) as caught:
        parse_arms(value)
    assert message in caught.value.message


def test_pick_covers_the_buckets_by_weight() -> None:
    arms = parse_arms(ARMS)
    counts = Counter(pick(arms, point).name for point in range(BUCKETS))
    assert counts == {"a": BUCKETS // 4, "b": BUCKETS * 3 // 4}
    zero = parse_arms([{**ARMS[0], "weight": 0}, ARMS[1]])
    assert {pick(zero, p).name for p in range(BUCKETS)} == {"b"}


def test_assignment_is_stable_and_differs_between_experiments() -> None:
    arms = parse_arms(ARMS)
    one, two = ExperimentSpec(slug="one", arms=arms), ExperimentSpec(slug="two", arms=arms)
    assert bucket("one", "user:x") == bucket("one", "user:x")
    units = [f"u{i}" for i in range(2000)]
    assert [assign(one, u).name for u in units] == [assign(one, u).name for u in units]
    # Independent hashes per experiment: the same units do not land on the same arms in both.
    assert sum(assign(one, u).name != assign(two, u).name for u in units) > 300


def test_applies_by_model_rule_tenant_and_status() -> None:
    arms = parse_arms(ARMS)
    on_model = ExperimentSpec(slug="e", arms=arms, model="gpt", tenant_id=7)
    assert on_model.applies("gpt", "", "", [9, 7])
    assert not on_model.applies("gpt", "", "", [9])
    assert not on_model.applies("other", "", "", [7])
    on_rule = ExperimentSpec(slug="e", arms=arms, rule="roadmap:default")
    assert on_rule.applies("any", "default", "roadmap", [])
    assert not on_rule.applies("any", "default", "other", [])
    assert ExperimentSpec(slug="e", arms=arms, rule="default").applies("any", "default", "p", [])
    assert not ExperimentSpec(slug="e", arms=arms, model="gpt", status="paused").applies("gpt", "", "", [])
