"""`can apply` / `can export`: idempotent sync, validation messages, dry run, prune, round trip, budgets."""

from __future__ import annotations

import io
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError

from budgets.models import Budget
from control.config import load, schema
from gateway.models import Deployment, LLMModel, Price, Provider
from tenants.models import AuditEvent, Plan, Tenant

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "chittycan.yaml"
SECRETS = {
    "OPENAI_API_KEY": "sk-openai-test",
    "ANTHROPIC_API_KEY": "sk-ant-test",
    "GROQ_API_KEY": "gsk-test",
    "ACME_BUDGET_WEBHOOK_SECRET": "whsec-test",
}

BASE = """
providers:
  - slug: up
    kind: openai
    base_url: https://up.example/v1
    api_key: ${UP_KEY}
models:
  - name: m1
    aliases: [m1-latest]
    deployments:
      - provider: up
        upstream_model: m1-2025
    prices:
      - effective_from: "2025-01-01"
        input: "1.00"
        output: "2.00"
plans:
  - slug: pro
    rpm: 100
tenants:
  - slug: org
    plan: pro
    time_zone: Europe/Berlin
    stripe_customer: cus_123
    budgets:
      - period: month
        limit_usd: "12.345678"
        hard: false
        thresholds: [50, 90]
        emails: [a@example.com]
        webhook: https://hooks.example/x
        webhook_secret: ${HOOK_SECRET}
  - slug: team
    parent: org
    rpm: 10
    tpm: 1000
"""


def run(tmp_path: Path, text: str, *args: str, env: dict[str, str] | None = None, monkeypatch=None) -> str:
    path = tmp_path / "chittycan.yaml"
    path.write_text(textwrap.dedent(text))
    out, err = io.StringIO(), io.StringIO()
    call_command("apply", "-f", str(path), *args, stdout=out, stderr=err)
    return out.getvalue() + err.getvalue()


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("UP_KEY", "sk-up-1")
    monkeypatch.setenv("HOOK_SECRET", "hook-1")
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_apply_creates_everything_and_second_apply_changes_nothing(db, tmp_path, env):
    out = run(tmp_path, BASE)
    assert "applied" in out
    provider = Provider.objects.get(slug="up")
    assert provider.api_key == "sk-up-1" and "sk-up-1" not in provider.api_key_encrypted
    model = LLMModel.objects.get(name="m1")
    assert model.aliases == ["m1-latest"]
    [dep] = model.deployments.all()
    assert (dep.provider_id, dep.upstream_model) == (provider.pk, "m1-2025")
    [price] = model.prices.all()
    assert (price.input_per_mtok, price.output_per_mtok) == (Decimal("1.00"), Decimal("2.00"))
    org, team = Tenant.objects.get(slug="org"), Tenant.objects.get(slug="team")
    assert team.parent_id == org.pk and team.kind == "team" and org.kind == "organisation"
    assert org.plan is not None
    assert (org.plan.slug, org.time_zone, org.stripe_customer_id) == ("pro", "Europe/Berlin", "cus_123")
    assert (team.rpm_limit, team.tpm_limit) == (10, 1000)
    budget = Budget.objects.get(tenant=org)
    assert budget.limit_micro == 12_345_678 and not budget.hard
    assert (budget.alert_thresholds, budget.alert_emails) == ([50, 90], ["a@example.com"])
    assert (budget.webhook_url, budget.webhook_secret) == ("https://hooks.example/x", "hook-1")
    audits = AuditEvent.objects.filter(actor_label="apply")
    assert audits.filter(action="tenant.create", target="team").exists()
    assert audits.filter(action="budget.create").count() == 1
    assert not any("sk-up-1" in str(a.data) for a in audits)

    before = AuditEvent.objects.count()
    out = run(tmp_path, BASE)
    assert "no changes: the database already matches" in out
    assert AuditEvent.objects.count() == before


def test_apply_updates_only_what_changed(db, tmp_path, env):
    run(tmp_path, BASE)
    changed = BASE.replace('input: "1.00"', 'input: "1.50"').replace("rpm: 10\n", "rpm: 20\n")
    out = run(tmp_path, changed)
    assert "~ update price m1 from 2025-01-01: input_per_mtok 1.000000 -> 1.50" in out
    assert "~ update tenant team: rpm_limit 10 -> 20" in out
    assert "applied" in out and "2 changes" in out
    assert Price.objects.get(model__name="m1").input_per_mtok == Decimal("1.5")


def test_secret_from_env_changes_and_unset_keeps_stored(db, tmp_path, env):
    run(tmp_path, BASE)
    env.setenv("UP_KEY", "sk-up-2")
    out = run(tmp_path, BASE)
    assert "update provider up: api_key (secret) -> (secret)" in out and "sk-up" not in out
    assert Provider.objects.get(slug="up").api_key == "sk-up-2"
    env.delenv("UP_KEY")
    out = run(tmp_path, BASE)
    assert "UP_KEY is not set; the stored secret is kept" in out and "no changes" in out
    assert Provider.objects.get(slug="up").api_key == "sk-up-2"


def test_unset_secret_without_a_stored_one_is_an_error_and_writes_nothing(db, tmp_path, env):
    env.delenv("UP_KEY")
    with pytest.raises(CommandError, match="nothing was written"):
        run(tmp_path, BASE)
    assert not Provider.objects.filter(slug="up").exists()
    assert not Tenant.objects.filter(slug="org").exists()


def test_literal_secret_is_refused(db, tmp_path):
    with pytest.raises(schema.ConfigError) as exc:
        load.load_text(BASE.replace("${UP_KEY}", "sk-literal"), env={"HOOK_SECRET": "x"})
    [message] = exc.value.errors
    assert message.startswith("chittycan.yaml: providers[0].api_key: must be an environment reference")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (('input: "1.00"', "input: 1.00"), 'models[0].prices[0].input: must be a decimal string such as "2.50"'),
        (('input: "1.00"', 'input: "abc"'), "models[0].prices[0].input: must be a decimal string"),
        (('input: "1.00"', 'input: "0.0000001"'), "models[0].prices[0].input: has more than 6 decimal places"),
        (("kind: openai", "kind: vllm"), "providers[0].kind: must be one of: openai, anthropic, ollama or mock"),
        (("base_url:", "base_ur:"), "providers[0].base_ur: unknown field (did you mean base_url?)"),
        (("provider: up", "provider: nope"), "models[0].deployments[0].provider: no provider nope in providers"),
        (("parent: org", "parent: ghost"), "tenants[1].parent: no tenant ghost in tenants"),
        (("time_zone: Europe/Berlin", "time_zone: Mars/Base"), "tenants[0].time_zone: must be an IANA time zone"),
        (('limit_usd: "12.345678"', "limit_usd: 12"), None),
        (('limit_usd: "12.345678"', 'limit_usd: "-1"'), "tenants[0].budgets[0].limit_usd: must be a non-negative"),
        (("rpm: 10\n", "rpm: ten\n"), "tenants[1].rpm: must be an integer"),
        (("plan: pro", "plan: gold"), "tenants[0].plan: no plan gold in plans"),
        (("hard: false", "hard: maybe"), "tenants[0].budgets[0].hard: must be true or false"),
    ],
)
def test_validation_errors_name_file_path_and_problem(db, tmp_path, env, edit, expected):
    text = BASE.replace(*edit)
    path = tmp_path / "chittycan.yaml"
    path.write_text(text)
    if expected is None:  # an integer is an exact amount too
        load.load_file(str(path))
        return
    with pytest.raises(schema.ConfigError) as exc:
        load.load_file(str(path))
    [message] = exc.value.errors
    assert message.startswith(f"{path}: {expected}"), message
    assert "(line " in message


def test_every_error_is_reported_and_nothing_is_written(db, tmp_path, env):
    bad = BASE.replace('output: "2.00"', "output: 2.5").replace("rpm: 100", "rpm: -3").replace("kind: openai", "")
    err = io.StringIO()
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    with pytest.raises(CommandError, match=r"3 errors; nothing was written"):
        call_command("apply", "-f", str(path), stdout=io.StringIO(), stderr=err)
    lines = err.getvalue().splitlines()
    assert any("providers[0].kind: is required" in line for line in lines)
    assert any("models[0].prices[0].output: must be a decimal string" in line for line in lines)
    assert any("plans[0].rpm: must be greater than 0" in line for line in lines)
    assert Provider.objects.filter(slug="up").count() == 0


def test_duplicates_cycles_and_bad_yaml(db, tmp_path):
    with pytest.raises(schema.ConfigError) as exc:
        load.load_text("tenants:\n  - slug: a\n    parent: b\n  - slug: b\n    parent: a\n  - slug: a\n", env={})
    text = "\n".join(exc.value.errors)
    assert "tenants[2].slug: duplicate tenant a" in text
    assert "tenants[0].parent: a would be its own ancestor" in text
    with pytest.raises(schema.ConfigError, match=r"x.yaml: not valid YAML: .*\(line \d+, column \d+\)"):
        load.load_text("models:\n  - name: [unclosed\n", filename="x.yaml", env={})
    with pytest.raises(schema.ConfigError, match=r"environment variable NOPE is not set"):
        load.load_text("providers:\n  - slug: p\n    kind: mock\n    base_url: ${NOPE}\n", env={})


def test_dry_run_reports_changes_and_writes_nothing(db, tmp_path, env):
    before = AuditEvent.objects.count()
    out = run(tmp_path, BASE, "--dry-run")
    assert "+ create provider up" in out and "+ create tenant team" in out
    assert "dry run:" in out and "nothing was written" in out
    assert not Provider.objects.filter(slug="up").exists() and not Tenant.objects.filter(slug="org").exists()
    assert AuditEvent.objects.count() == before


def test_prune_removes_what_the_file_no_longer_lists(db, tmp_path, env):
    run(tmp_path, BASE)
    extra = Tenant.objects.create(slug="stray", name="Stray", plan=Plan.objects.create(slug="legacy", name="Legacy"))
    Price.objects.create(model=LLMModel.objects.get(name="m1"), effective_from="2024-01-01T00:00:00Z")
    out = run(tmp_path, BASE)  # without --prune nothing is removed
    assert "no changes" in out
    assert LLMModel.objects.filter(name="gpt-4o").exists()  # from the default price table

    start, end = BASE.index("    budgets:\n"), BASE.index("  - slug: team")
    smaller = BASE[:start] + BASE[end:]  # org without its budget
    out = run(tmp_path, smaller, "--prune")
    assert "- delete model gpt-4o" in out
    assert "- delete price m1 from 2024-01-01" in out
    assert "- delete budget org per month" in out
    assert "- deactivate tenant stray" in out
    assert "- delete provider openai" in out
    assert not LLMModel.objects.filter(name="gpt-4o").exists()
    assert set(LLMModel.objects.values_list("name", flat=True)) == {"m1"}
    assert not Budget.objects.filter(tenant__slug="org").exists()
    extra.refresh_from_db()
    assert not extra.is_active  # deactivated, not deleted: its keys and ledger rows stay
    assert Plan.objects.filter(slug="pro").exists() and not Plan.objects.filter(slug="legacy").exists()
    assert "- delete plan legacy" in out
    assert "no changes" in run(tmp_path, smaller, "--prune")


def test_export_round_trip_is_a_no_op(db, tmp_path, env):
    run(tmp_path, BASE)
    exported = tmp_path / "exported.yaml"
    call_command("export", "-o", str(exported), stdout=io.StringIO(), stderr=io.StringIO())
    text = exported.read_text()
    assert "sk-up-1" not in text and "hook-1" not in text
    data = yaml.safe_load(text)
    [up] = [p for p in data["providers"] if p["slug"] == "up"]
    assert up["api_key"] == "${UP_KEY}"  # the placeholder names the file used
    [org] = [t for t in data["tenants"] if t["slug"] == "org"]
    assert org["budgets"][0]["limit_usd"] == "12.345678"
    assert org["budgets"][0]["webhook_secret"] == "${HOOK_SECRET}"
    before = AuditEvent.objects.count()
    out = io.StringIO()
    call_command("apply", "-f", str(exported), stdout=out, stderr=io.StringIO())
    assert "no changes" in out.getvalue()
    assert AuditEvent.objects.count() == before
    # ... and with the placeholders' variables unset, still nothing to do (the stored secrets stay).
    env.delenv("UP_KEY")
    env.delenv("HOOK_SECRET")
    out = io.StringIO()
    call_command("apply", "-f", str(exported), "--prune", stdout=out, stderr=io.StringIO())
    assert "no changes" in out.getvalue()


def test_require_otp_applies_audits_and_round_trips(db, tmp_path, env):
    on = BASE.replace("    rpm: 10\n", "    rpm: 10\n    require_otp: true\n")
    assert on != BASE
    run(tmp_path, on)
    org, team = Tenant.objects.get(slug="org"), Tenant.objects.get(slug="team")
    assert team.require_otp and not org.require_otp
    # export writes it where set (and only there), and the exported file applies as a no-op
    exported = tmp_path / "exported.yaml"
    call_command("export", "-o", str(exported), stdout=io.StringIO(), stderr=io.StringIO())
    data = yaml.safe_load(exported.read_text())
    by_slug = {t["slug"]: t for t in data["tenants"]}
    assert by_slug["team"]["require_otp"] is True and "require_otp" not in by_slug["org"]
    before = AuditEvent.objects.count()
    out = io.StringIO()
    call_command("apply", "-f", str(exported), stdout=out, stderr=io.StringIO())
    assert "no changes" in out.getvalue() and AuditEvent.objects.count() == before
    # the file is explicit: without the line, apply turns it off again, through the audited service
    text = run(tmp_path, BASE)
    assert "~ update tenant team: require_otp True -> False" in text
    assert not Tenant.objects.get(slug="team").require_otp
    event = AuditEvent.objects.filter(action="tenant.update", target="team", actor_label="apply").latest("seq")
    assert "require_otp" in str(event.data)
    # a bad value names the file, the path and the problem
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("    rpm: 10\n", "    rpm: 10\n    require_otp: sometimes\n"))
    with pytest.raises(schema.ConfigError) as exc:
        load.load_file(str(bad))
    [message] = exc.value.errors
    assert message.startswith(f"{bad}: tenants[1].require_otp: must be true or false"), message


def test_example_file_applies_and_round_trips(db, tmp_path, env):
    out = io.StringIO()
    call_command("apply", "-f", str(EXAMPLE), stdout=out, stderr=io.StringIO())
    assert "applied" in out.getvalue()
    assert Provider.objects.get(slug="openai").api_key == "sk-openai-test"
    assert Deployment.objects.filter(model__name="gpt-4o", provider__slug="mock", priority=10).exists()
    assert Budget.objects.get(tenant__slug="acme", period="month", hard=True).limit_micro == 5_000_000_000
    assert Budget.objects.get(tenant__slug="acme", period="month", hard=False).limit_micro == 4_000_000_000
    assert Tenant.objects.get(slug="acme-research-search").ancestors()[1].slug == "acme"
    out = io.StringIO()
    call_command("apply", "-f", str(EXAMPLE), stdout=out, stderr=io.StringIO())
    assert "no changes" in out.getvalue()
    exported = tmp_path / "exported.yaml"
    call_command("export", "-o", str(exported), stdout=io.StringIO(), stderr=io.StringIO())
    out = io.StringIO()
    call_command("apply", "-f", str(exported), "--prune", stdout=out, stderr=io.StringIO())
    assert "no changes" in out.getvalue()


GATEWAY_FILE = """
providers:
  - slug: fake
    kind: openai
    base_url: ${FAKE_URL}/v1
    api_key: ${FAKE_KEY}
    max_retries: 0
models:
  - name: house-model
    aliases: [house]
    deployments:
      - provider: fake
        upstream_model: gpt-4o-2024-08-06
    prices:
      - effective_from: "2020-01-01"
        input: "%s"
        output: "20.00"
tenants:
  - slug: house
    budgets:
      - period: month
        limit_usd: "100.00"
"""


def test_applied_configuration_is_served_by_the_running_gateway(
    fake_openai, gateway_server, transactional_db, tmp_path, monkeypatch
):
    import openai

    from tests.conftest import wait_usage

    app, server = fake_openai
    monkeypatch.setenv("FAKE_URL", server.url)
    monkeypatch.setenv("FAKE_KEY", "sk-from-env")
    run(tmp_path, GATEWAY_FILE % "5.00")
    out = io.StringIO()
    call_command("keys", "create", "--tenant", "house", stdout=out, stderr=io.StringIO())
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=out.getvalue().strip(), max_retries=0)
    res = client.chat.completions.with_raw_response.create(model="house", messages=[{"role": "user", "content": "hi"}])
    assert res.headers["x-chittycan-provider"] == "fake"
    assert app.requests[-1].headers["authorization"] == "Bearer sk-from-env"
    assert app.requests[-1].body["model"] == "gpt-4o-2024-08-06"
    # 10 prompt tokens at $5/M + 7 completion at $20/M = 50 + 140 micro-USD
    assert res.headers["x-chittycan-cost"] == "0.000190"
    # A price change applied while the gateway runs is used for the next request.
    assert "~ update price house-model" in run(tmp_path, GATEWAY_FILE % "1.00")
    res = client.chat.completions.with_raw_response.create(model="house", messages=[{"role": "user", "content": "hi"}])
    assert res.headers["x-chittycan-cost"] == "0.000150"
    rows = wait_usage(2, tenant__slug="house")
    assert [r.cost_micro for r in rows] == [190, 150]


def test_alias_may_not_shadow_a_model_kept_in_the_database(db, tmp_path, env):
    text = BASE.replace("aliases: [m1-latest]", "aliases: [m1-latest, gpt-4o]")
    with pytest.raises(CommandError, match="nothing was written"):
        run(tmp_path, text)
    err = io.StringIO()
    path = tmp_path / "chittycan.yaml"
    with pytest.raises(CommandError):
        call_command("apply", "-f", str(path), stdout=io.StringIO(), stderr=err)
    assert f"{path}: models[0].aliases: gpt-4o is already the name or an alias of model gpt-4o" in err.getvalue()
    assert not LLMModel.objects.filter(name="m1").exists()
    # With --prune the default gpt-4o goes away, so the alias is free.
    assert "applied" in run(tmp_path, text, "--prune")
    assert LLMModel.objects.get(name="m1").aliases == ["m1-latest", "gpt-4o"]


# The exports README.md lists for the example file (section "Configure providers, ..."); the
# docs test runs that README block as pasted too.
README_EXPORTS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "ACME_BUDGET_WEBHOOK_SECRET")


def test_example_needs_only_the_readme_exports(db, tmp_path, monkeypatch):
    """The groq provider is inactive: it needs no GROQ_API_KEY, and its absence is no error."""
    for name in SECRETS:
        monkeypatch.delenv(name, raising=False)
    for name in README_EXPORTS:
        monkeypatch.setenv(name, SECRETS[name])
    # Each of the README's exports is needed: without one, the apply fails and names it.
    for name in README_EXPORTS:
        monkeypatch.delenv(name)
        err = io.StringIO()
        with pytest.raises(CommandError, match="nothing was written"):
            call_command("apply", "-f", str(EXAMPLE), "--dry-run", stdout=io.StringIO(), stderr=err)
        assert f"environment variable {name} is not set" in err.getvalue()
        monkeypatch.setenv(name, SECRETS[name])
    out = io.StringIO()
    call_command("apply", "-f", str(EXAMPLE), "--dry-run", stdout=out, stderr=out)
    assert "dry run" in out.getvalue().lower()
    assert "GROQ_API_KEY is not set; none is needed while provider groq is inactive" in out.getvalue()
    call_command("apply", "-f", str(EXAMPLE), stdout=io.StringIO(), stderr=io.StringIO())
    groq = Provider.objects.get(slug="groq")
    assert (groq.is_active, groq.api_key_encrypted) == (False, "")
    assert Provider.objects.get(slug="anthropic").api_key == "sk-ant-test"


def test_inactive_provider_secret_is_used_when_set_and_required_once_active(db, tmp_path, env):
    text = BASE.replace("    api_key: ${UP_KEY}", "    api_key: ${UP_KEY}\n    active: false")
    env.delenv("UP_KEY")
    assert "none is needed while provider up is inactive" in run(tmp_path, text)
    assert Provider.objects.get(slug="up").api_key_encrypted == ""
    env.setenv("UP_KEY", "sk-up-9")
    run(tmp_path, text)
    assert Provider.objects.get(slug="up").api_key == "sk-up-9"
    # Activating it with the key stored works; a new active provider without its variable does not.
    env.delenv("UP_KEY")
    assert "UP_KEY is not set; the stored secret is kept" in run(tmp_path, BASE)
    other = BASE.replace("slug: up", "slug: up2").replace("provider: up", "provider: up2")
    err = io.StringIO()
    path = tmp_path / "other.yaml"
    path.write_text(textwrap.dedent(other))
    with pytest.raises(CommandError, match="nothing was written"):
        call_command("apply", "-f", str(path), stdout=io.StringIO(), stderr=err)
    assert "providers[0].api_key: environment variable UP_KEY is not set" in err.getvalue()


def test_example_round_trip_keeps_the_placeholder_names(db, tmp_path, env):
    call_command("apply", "-f", str(EXAMPLE), stdout=io.StringIO(), stderr=io.StringIO())
    exported = tmp_path / "exported.yaml"
    call_command("export", "-o", str(exported), stdout=io.StringIO(), stderr=io.StringIO())
    text = exported.read_text()
    for name in SECRETS:  # every placeholder of the example comes back under its own name
        assert "${" + name + "}" in text
    assert "ACME_MONTH_WEBHOOK_SECRET" not in text and "whsec-test" not in text and "sk-openai-test" not in text
    data = yaml.safe_load(text)
    [acme] = [t for t in data["tenants"] if t["slug"] == "acme"]
    assert acme["budgets"][0]["webhook_secret"] == "${ACME_BUDGET_WEBHOOK_SECRET}"
    [groq] = [p for p in data["providers"] if p["slug"] == "groq"]
    assert (groq["api_key"], groq["active"]) == ("${GROQ_API_KEY}", False)  # kept though no key is stored
    # Applying the export changes nothing, with or without the variables.
    out = io.StringIO()
    call_command("apply", "-f", str(exported), stdout=out, stderr=io.StringIO())
    assert "no changes" in out.getvalue()
    for name in SECRETS:
        env.delenv(name)
    out = io.StringIO()
    call_command("apply", "-f", str(exported), stdout=out, stderr=io.StringIO())
    assert "no changes" in out.getvalue()


def test_renamed_placeholder_is_exported_under_its_new_name(db, tmp_path, env):
    run(tmp_path, BASE)
    env.setenv("NEW_HOOK", "hook-1")
    env.setenv("UP_KEY_V2", "sk-up-1")
    run(tmp_path, BASE.replace("${HOOK_SECRET}", "${NEW_HOOK}").replace("${UP_KEY}", "${UP_KEY_V2}"))
    exported = tmp_path / "exported.yaml"
    call_command("export", "-o", str(exported), stdout=io.StringIO(), stderr=io.StringIO())
    data = yaml.safe_load(exported.read_text())
    [up] = [p for p in data["providers"] if p["slug"] == "up"]
    [org] = [t for t in data["tenants"] if t["slug"] == "org"]
    assert (up["api_key"], org["budgets"][0]["webhook_secret"]) == ("${UP_KEY_V2}", "${NEW_HOOK}")


def test_secret_set_outside_a_file_is_exported_under_a_derived_name(db, tmp_path):
    provider = Provider(slug="by-hand", kind="openai", base_url="https://x.example/v1")
    provider.api_key = "sk-by-hand"
    provider.save()
    exported = tmp_path / "exported.yaml"
    call_command("export", "-o", str(exported), stdout=io.StringIO(), stderr=io.StringIO())
    [item] = [p for p in yaml.safe_load(exported.read_text())["providers"] if p["slug"] == "by-hand"]
    assert item["api_key"] == "${BY_HAND_API_KEY}"
