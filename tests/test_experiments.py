"""Routing experiments (docs/routing.md, Experiments): the openai SDK against the real gateway,
fake upstreams on loopback, PostgreSQL and Redis. The split holds its weights, the arm is in
``X-ChittyCan-Experiment`` and on the ledger row (and served by its target), a user is sticky,
``POST /v1/feedback`` stores a tenant's own request's outcome and 404s another tenant's, ``can
experiments show`` reports what scipy computes here on known data, and auto-promotion promotes a
significant winner (audited) and then routes every request to it."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import yaml
from django.core.management import CommandError, call_command
from django.test import Client
from scipy import stats

from tests.conftest import add_model, wait_usage
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.server import ServerThread
from tests.test_admin import admin_client, superuser  # noqa: F401 - fixtures

SHORT: Any = [{"role": "user", "content": "Say hello"}]
ARMS = [
    {"name": "control", "route": "cheap", "weight": 70},
    {"name": "treatment", "route": "strong", "weight": 30},
]


@pytest.fixture
def catalogue(transactional_db: Any, fake_openai: tuple[FakeOpenAI, ServerThread]) -> FakeOpenAI:
    from gateway.models import Provider

    app, server = fake_openai
    app.set_fault(None)
    one = Provider(slug="one", kind="openai", base_url=f"{server.url}/v1", max_retries=0)
    one.api_key = "sk-one"
    one.save()
    add_model("cheap", one, upstream="cheap-up", prices=("0.10", "0.10", "0.20"))
    add_model("strong", one, upstream="strong-up", prices=("3.00", "3.00", "15.00"))
    add_model("default-m", one, upstream="default-up", prices=("1.00", "1.00", "2.00"))
    return app


def put_experiment(slug: str = "exp1", **extra: Any) -> Any:
    from gateway import experiments

    fields: dict[str, Any] = {"model": "default-m", "arms": ARMS}
    fields.update(extra)
    experiment, _ = experiments.experiment_put(slug=slug, **fields)
    return experiment


def client_for(server: ServerThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


# --- assignment ----------------------------------------------------------------------------------


def test_assignment_split_within_tolerance_and_deterministic() -> None:
    from gateway.routing.experiments import ExperimentSpec, assign, parse_arms

    spec = ExperimentSpec(slug="split", arms=parse_arms(ARMS), model="m")
    units = [f"req_{random.Random(7).getrandbits(64):x}_{i}" for i in range(20_000)]
    counts = Counter(assign(spec, unit).name for unit in units)
    assert abs(counts["control"] / 20_000 - 0.70) < 0.015, counts
    assert abs(counts["treatment"] / 20_000 - 0.30) < 0.015, counts
    # The same unit always gets the same arm; a three-way split also holds its weights.
    assert all(assign(spec, u).name == assign(spec, u).name for u in units[:500])
    three = ExperimentSpec(
        slug="three",
        arms=parse_arms([{"name": n, "route": "x", "weight": w} for n, w in (("a", 1), ("b", 1), ("c", 2))]),
    )
    thirds = Counter(assign(three, u).name for u in units)
    for name, share in (("a", 0.25), ("b", 0.25), ("c", 0.5)):
        assert abs(thirds[name] / 20_000 - share) < 0.015, thirds
    # Promoted: everyone gets the winner.
    promoted = ExperimentSpec(slug="split", arms=spec.arms, model="m", status="promoted", winner="treatment")
    assert {assign(promoted, u).name for u in units[:1000]} == {"treatment"}


def test_header_and_ledger_carry_the_arm_and_its_target_serves(
    gateway_server: ServerThread, catalogue: FakeOpenAI, tenant_key: tuple[Any, str]
) -> None:
    tenant, key = tenant_key
    put_experiment()
    client = client_for(gateway_server, key)
    seen: dict[str, str] = {}
    for _ in range(40):
        response = client.chat.completions.with_raw_response.create(model="default-m", messages=SHORT)
        slug, arm = response.headers["x-chittycan-experiment"].split("=")
        assert slug == "exp1" and arm in ("control", "treatment")
        assert response.headers["x-chittycan-model"] == ("cheap-up" if arm == "control" else "strong-up")
        seen[response.headers["x-request-id"]] = arm
    assert set(seen.values()) == {"control", "treatment"}  # 40 draws at 70/30: both arms (p of one arm < 1e-6)
    rows = wait_usage(40, tenant=tenant)
    assert len(rows) == 40
    for row in rows:
        assert row.experiment == "exp1" and row.arm == seen[row.request_id]
        assert row.served_model == ("cheap-up" if row.arm == "control" else "strong-up")
        assert row.route["experiment"]["arm"] == row.arm
    # Another model is not in the experiment: no header, no arm.
    other = client.chat.completions.with_raw_response.create(model="cheap", messages=SHORT)
    assert "x-chittycan-experiment" not in other.headers
    row = wait_usage(1, request_id=other.headers["x-request-id"])[0]
    assert row.experiment == "" and row.arm == ""


def test_sticky_per_end_user(gateway_server: ServerThread, catalogue: FakeOpenAI, tenant_key: tuple[Any, str]) -> None:
    from gateway.routing.experiments import ExperimentSpec, assign, parse_arms

    put_experiment()
    client = client_for(gateway_server, tenant_key[1])
    spec = ExperimentSpec(slug="exp1", arms=parse_arms(ARMS), model="default-m")
    for user in ("alice", "bob", "carol"):
        arms = {
            client.chat.completions.with_raw_response.create(model="default-m", messages=SHORT, user=user).headers[
                "x-chittycan-experiment"
            ]
            for _ in range(4)
        }
        assert arms == {f"exp1={assign(spec, f'user:{user}').name}"}


def test_experiment_on_a_policy_rule_and_tenant_scope(
    gateway_server: ServerThread,
    catalogue: FakeOpenAI,
    tenant_key: tuple[Any, str],
    make_tenant: Callable[..., Any],
    make_key: Callable[..., str],
) -> None:
    from gateway import policies

    tenant, key = tenant_key
    policies.policy_put(
        name="acme-policy",
        rules=[{"name": "short", "condition": "tokens < 100", "route": "default-m"}],
        tenant=tenant,
    )
    put_experiment("on-rule", model="", rule="short", tenant=tenant, arms=[{**a, "weight": 1} for a in ARMS])
    response = client_for(gateway_server, key).chat.completions.with_raw_response.create(model="strong", messages=SHORT)
    arm = response.headers["x-chittycan-experiment"].split("=")[1]
    model = "cheap" if arm == "control" else "strong"
    assert response.headers["x-chittycan-route"] == f"rule=short; model={model}; outcome=primary"
    # Another tenant (no policy, not below acme) is not in it.
    other_key = make_key(make_tenant("globex"), name="other")
    plain = client_for(gateway_server, other_key).chat.completions.with_raw_response.create(
        model="default-m", messages=SHORT
    )
    assert "x-chittycan-experiment" not in plain.headers


# --- feedback ------------------------------------------------------------------------------------


def test_feedback_own_request_stored_other_tenant_404(
    gateway_server: ServerThread,
    catalogue: FakeOpenAI,
    tenant_key: tuple[Any, str],
    make_tenant: Callable[..., Any],
    make_key: Callable[..., str],
) -> None:
    from ledger.models import Feedback

    tenant, key = tenant_key
    put_experiment()
    response = client_for(gateway_server, key).chat.completions.with_raw_response.create(
        model="default-m", messages=SHORT
    )
    request_id = response.headers["x-request-id"]
    arm = response.headers["x-chittycan-experiment"].split("=")[1]
    wait_usage(1, request_id=request_id)
    url = f"{gateway_server.url}/v1/feedback"
    # Positive control: the tenant's own request.
    ok = httpx.post(url, json={"request_id": request_id, "score": 4.5}, headers={"authorization": f"Bearer {key}"})
    assert ok.status_code == 200, ok.text
    assert ok.json() == {
        "object": "feedback",
        "request_id": request_id,
        "score": 4.5,
        "label": None,
        "experiment": "exp1",
        "arm": arm,
    }
    auth = {"authorization": f"Bearer {key}"}
    again = httpx.post(url, json={"request_id": request_id, "label": "good"}, headers=auth)
    assert again.status_code == 200 and again.json()["label"] == "good"
    stored = Feedback.objects.get(request_id=request_id)
    assert stored.tenant_id == tenant.pk and stored.label == "good" and stored.score is None
    # Another tenant's key: 404 in the envelope, nothing written.
    other_key = make_key(make_tenant("globex"), name="other")
    denied = httpx.post(
        url, json={"request_id": request_id, "score": 1}, headers={"authorization": f"Bearer {other_key}"}
    )
    assert denied.status_code == 404
    assert denied.json()["error"]["code"] == "request_not_found"
    assert Feedback.objects.get(request_id=request_id).label == "good"
    unknown = httpx.post(url, json={"request_id": "req_nope", "score": 1}, headers={"authorization": f"Bearer {key}"})
    assert unknown.status_code == 404
    # Bad input: 400 in the envelope; no key: 401.
    for body, param in (
        ({"request_id": request_id}, "score"),
        ({"request_id": request_id, "score": "high"}, "score"),
        ({"request_id": request_id, "score": True}, "score"),
        ({"request_id": request_id, "label": ""}, "label"),
        ({"score": 1}, "request_id"),
        ({"request_id": request_id, "score": 1, "extra": 1}, "extra"),
    ):
        bad = httpx.post(url, json=body, headers={"authorization": f"Bearer {key}"})
        assert bad.status_code == 400, body
        assert bad.json()["error"]["param"] == param
    assert httpx.post(url, content=b"{not json", headers={"authorization": f"Bearer {key}"}).status_code == 400
    assert httpx.post(url, json={"request_id": request_id, "score": 1}).status_code == 401


# --- statistics ----------------------------------------------------------------------------------


def _rows(tenant: Any, slug: str, arm: str, latencies: list[int], costs: list[int], statuses: list[str]) -> list[str]:
    from ledger.models import UsageRecord

    ids = [f"req_{slug}_{arm}_{i}" for i in range(len(latencies))]
    UsageRecord.objects.bulk_create(
        UsageRecord(
            request_id=rid,
            tenant_id=tenant.pk,
            endpoint="chat",
            requested_model="default-m",
            latency_ms=lat,
            cost_micro=cost,
            status=status,
            experiment=slug,
            arm=arm,
        )
        for rid, lat, cost, status in zip(ids, latencies, costs, statuses, strict=True)
    )
    return ids


def _scores(tenant: Any, ids: list[str], scores: list[float]) -> None:
    from ledger.models import Feedback

    Feedback.objects.bulk_create(
        Feedback(request_id=rid, tenant_id=tenant.pk, score=s) for rid, s in zip(ids, scores, strict=False)
    )


def test_show_matches_scipy_on_known_data(transactional_db: Any, make_tenant: Callable[..., Any]) -> None:
    tenant = make_tenant("acme")
    put_experiment(significance=0.01)
    rng = np.random.default_rng(42)
    a_lat = [int(x) for x in rng.normal(300, 40, 60)]
    b_lat = [int(x) for x in rng.normal(340, 60, 50)]
    a_cost = [int(x) for x in rng.integers(90, 110, 60)]
    b_cost = [int(x) for x in rng.integers(95, 130, 50)]
    a_status = ["ok"] * 57 + ["upstream_error"] * 3
    b_status = ["ok"] * 40 + ["upstream_timeout"] * 10
    a_ids = _rows(tenant, "exp1", "control", a_lat, a_cost, a_status)
    b_ids = _rows(tenant, "exp1", "treatment", b_lat, b_cost, b_status)
    a_scores = [float(x) for x in rng.normal(3.5, 1.0, 30)]
    b_scores = [float(x) for x in rng.normal(4.0, 1.0, 25)]
    _scores(tenant, a_ids, a_scores)
    _scores(tenant, b_ids, b_scores)

    out = io.StringIO()
    call_command("experiments", "show", "exp1", "--json", stdout=out)
    report = json.loads(out.getvalue())
    control, treatment = report["arms"]
    assert (control["arm"], control["requests"], control["errors"]) == ("control", 60, 3)
    assert (treatment["arm"], treatment["requests"], treatment["errors"]) == ("treatment", 50, 10)
    ok_a = [lat for lat, s in zip(a_lat, a_status, strict=True) if s == "ok"]
    ok_b = [lat for lat, s in zip(b_lat, b_status, strict=True) if s == "ok"]
    assert control["latency_p50_ms"] == pytest.approx(np.percentile(ok_a, 50))
    assert treatment["latency_p95_ms"] == pytest.approx(np.percentile(ok_b, 95))
    assert control["cost_per_request_usd"] == pytest.approx(np.mean(a_cost) / 1e6)
    assert treatment["feedback_mean"] == pytest.approx(np.mean(b_scores)) and treatment["feedback_n"] == 25
    assert report["confidence"] == pytest.approx(0.99)
    by_metric = {c["metric"]: c for c in report["comparisons"]}
    expected = {
        "latency": stats.ttest_ind(ok_b, ok_a, equal_var=False).pvalue,
        "cost": stats.ttest_ind(np.array(b_cost) / 1e6, np.array(a_cost) / 1e6, equal_var=False).pvalue,
        "score": stats.ttest_ind(b_scores, a_scores, equal_var=False).pvalue,
        "error_rate": stats.chi2_contingency([[10, 40], [3, 57]], correction=True).pvalue,
    }
    for metric, p_value in expected.items():
        assert by_metric[metric]["p_value"] == pytest.approx(p_value, rel=1e-9), metric
        assert by_metric[metric]["significant"] == (p_value < 0.01)
    assert by_metric["latency"]["method"].startswith("Welch")
    assert by_metric["error_rate"]["method"].startswith("Pearson's chi-square")
    # Small counts: Fisher's exact test.
    put_experiment("small", significance=0.05)
    _rows(tenant, "small", "control", [100] * 8, [1] * 8, ["ok"] * 7 + ["error"])
    _rows(tenant, "small", "treatment", [100] * 9, [1] * 9, ["ok"] * 3 + ["error"] * 6)
    out = io.StringIO()
    call_command("experiments", "show", "small", "--json", stdout=out)
    errors = next(c for c in json.loads(out.getvalue())["comparisons"] if c["metric"] == "error_rate")
    assert errors["method"].startswith("Fisher")
    assert errors["p_value"] == pytest.approx(stats.fisher_exact(np.array([[6, 3], [1, 7]])).pvalue, rel=1e-9)
    # The text report states the method and the confidence.
    text = io.StringIO()
    call_command("experiments", "show", "exp1", stdout=text)
    assert "99% confidence" in text.getvalue() and "Welch's t-test" in text.getvalue()


# --- auto-promotion ------------------------------------------------------------------------------


def test_auto_promotion_is_audited_and_routes_to_the_winner(
    gateway_server: ServerThread, catalogue: FakeOpenAI, tenant_key: tuple[Any, str]
) -> None:
    from gateway.models import Experiment
    from gateway.tasks import auto_promote_experiments
    from tenants.models import AuditEvent

    tenant, key = tenant_key
    put_experiment(auto_promote=True, metric="score", min_samples=20, significance=0.05)
    rng = np.random.default_rng(1)
    a_ids = _rows(tenant, "exp1", "control", [100] * 30, [10] * 30, ["ok"] * 30)
    b_ids = _rows(tenant, "exp1", "treatment", [100] * 30, [10] * 30, ["ok"] * 30)
    # Not enough scores yet: nothing happens.
    _scores(tenant, a_ids[:10], [float(x) for x in rng.normal(2.0, 0.5, 10)])
    _scores(tenant, b_ids[:10], [float(x) for x in rng.normal(4.0, 0.5, 10)])
    assert auto_promote_experiments() == []
    assert Experiment.objects.get(slug="exp1").status == "running"
    # Enough scores, clearly different: the treatment wins.
    _scores(tenant, a_ids[10:], [float(x) for x in rng.normal(2.0, 0.5, 20)])
    _scores(tenant, b_ids[10:], [float(x) for x in rng.normal(4.0, 0.5, 20)])
    assert auto_promote_experiments() == [["exp1", "treatment"]]
    experiment = Experiment.objects.get(slug="exp1")
    assert experiment.status == "promoted" and experiment.winner == "treatment" and experiment.promoted_at
    event = AuditEvent.objects.get(action="experiment.promote", target="exp1")
    assert event.actor_label == "auto-promotion" and event.data["winner"] == "treatment"
    assert "Bonferroni" in event.data["reason"]
    assert auto_promote_experiments() == []  # once
    # Celery beat runs it, and so does the embedded scheduler (the same schedule, by task name).
    from chittycan.celery import app
    from gateway import scheduler

    assert "gateway.tasks.auto_promote_experiments" in {e.task for e in scheduler.schedule()}
    assert "gateway.tasks.auto_promote_experiments" in app.tasks
    client = client_for(gateway_server, key)
    for _ in range(6):
        response = client.chat.completions.with_raw_response.create(model="default-m", messages=SHORT)
        assert response.headers["x-chittycan-experiment"] == "exp1=treatment"
        assert response.headers["x-chittycan-model"] == "strong-up"


def test_no_promotion_without_significance(transactional_db: Any, make_tenant: Callable[..., Any]) -> None:
    from gateway.experiments import experiments_auto_promote
    from gateway.models import Experiment

    tenant = make_tenant("acme")
    put_experiment(auto_promote=True, metric="latency", min_samples=20)
    rng = np.random.default_rng(3)
    same = [int(x) for x in rng.normal(200, 30, 80)]
    _rows(tenant, "exp1", "control", same[:40], [1] * 40, ["ok"] * 40)
    _rows(tenant, "exp1", "treatment", same[40:], [1] * 40, ["ok"] * 40)
    assert stats.ttest_ind(same[:40], same[40:], equal_var=False).pvalue > 0.05  # the premise
    assert experiments_auto_promote() == []
    assert Experiment.objects.get(slug="exp1").status == "running"


# --- configuration and admin ---------------------------------------------------------------------


def test_apply_export_round_trip(transactional_db: Any, make_tenant: Callable[..., Any], tmp_path: Path) -> None:
    from gateway.models import Experiment
    from tenants.models import AuditEvent

    make_tenant("acme")
    spec: dict[str, Any] = {
        "id": "prompt-ab",
        "tenant": "acme",
        "model": "default-m",
        "arms": ARMS,
        "auto_promote": {"metric": "cost", "min_samples": 50, "significance": 0.01},
    }
    doc: dict[str, Any] = {"version": 1, "experiments": [spec]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    call_command("apply", "-f", str(path), stdout=io.StringIO(), stderr=io.StringIO())
    row = Experiment.objects.get(slug="prompt-ab")
    assert row.tenant is not None and row.tenant.slug == "acme" and row.metric == "cost" and row.min_samples == 50
    assert AuditEvent.objects.filter(action="experiment.create", target="prompt-ab").exists()
    exported = io.StringIO()
    call_command("export", stdout=exported)
    assert yaml.safe_load(exported.getvalue())["experiments"] == [{**spec, "status": "running"}]
    bad = {**doc, "experiments": [{**spec, "arms": ARMS[:1]}]}
    path.write_text(yaml.safe_dump(bad))
    err = io.StringIO()
    with pytest.raises(CommandError, match="nothing was written"):
        call_command("apply", "-f", str(path), stdout=io.StringIO(), stderr=err)
    assert "experiments[0]" in err.getvalue() and "at least two arms" in err.getvalue()


def test_admin_shows_an_arms_error_at_the_field(admin_client: Client) -> None:  # noqa: F811
    from gateway.models import Experiment

    form = {
        "slug": "from-admin",
        "model": "default-m",
        "rule": "",
        "arms": json.dumps(ARMS[:1]),
        "status": "running",
        "description": "",
        "metric": "score",
        "min_samples": "100",
        "significance": "0.05",
        "winner": "",
    }
    response = admin_client.post("/admin/gateway/experiment/add/", form)
    assert response.status_code == 200
    assert "at least two arms" in " ".join(response.context["adminform"].form.errors["arms"])
    form["arms"] = json.dumps(ARMS)
    response = admin_client.post("/admin/gateway/experiment/add/", form)
    assert response.status_code == 302, response.content[:2000]
    assert Experiment.objects.get(slug="from-admin").arms == ARMS


def test_quickstart_shows_the_experiment_on_medium_prompts(
    gateway_server: ServerThread, transactional_db: Any, settings: Any, tmp_path: Path
) -> None:
    from gateway.models import LLMModel

    settings.CHITTYCAN_MODE = "dev"
    LLMModel.objects.get_or_create(name="gpt-4o-mini")
    key_file = tmp_path / "key.txt"
    out = io.StringIO()
    call_command("quickstart", "--key-file", str(key_file), stdout=out)
    assert "default-model-ab" in out.getvalue()
    client = client_for(gateway_server, key_file.read_text().strip())
    medium: Any = [{"role": "user", "content": "word " * 200}]
    arms = set()
    for _ in range(12):
        response = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=medium)
        assert response.headers["x-chittycan-route"].startswith("rule=default; model=")
        arms.add(response.headers["x-chittycan-experiment"])
    assert arms <= {"default-model-ab=gpt-4", "default-model-ab=llama-70b"} and arms
    short = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=SHORT)
    assert "x-chittycan-experiment" not in short.headers  # rule cheap_for_simple: not in the experiment


def test_stream_header_and_route_explain_show_the_arm(
    gateway_server: ServerThread, catalogue: FakeOpenAI, tenant_key: tuple[Any, str], tmp_path: Path
) -> None:
    from gateway.routing.experiments import ExperimentSpec, assign, parse_arms

    tenant, key = tenant_key
    put_experiment()
    client = client_for(gateway_server, key)
    with client.chat.completions.with_streaming_response.create(
        model="default-m", messages=SHORT, stream=True, user="dana"
    ) as response:
        header = response.headers["x-chittycan-experiment"]
        request_id = response.headers["x-request-id"]
        for _ in response.iter_lines():
            pass
    arm = assign(ExperimentSpec(slug="exp1", arms=parse_arms(ARMS), model="default-m"), "user:dana")
    assert header == f"exp1={arm.name}"
    row = wait_usage(1, request_id=request_id)[0]
    assert row.arm == arm.name and row.stream
    body = tmp_path / "request.json"
    body.write_text(json.dumps({"model": "default-m", "messages": SHORT, "user": "dana"}))
    out = io.StringIO()
    call_command("route", "explain", "--key", key, "-f", str(body), stdout=out)
    assert f"experiment exp1  arm {arm.name} -> {arm.target}" in out.getvalue()
