"""The cache settings of a tenant's existing keys in the configuration file (``tenants[].keys``,
docs/config.md and docs/caching.md): applied by name through the keys' one write path (audited),
shown by a dry run, exported when not the defaults (export then apply is a no-op), an unknown
name refused with its path and how to create the key, another tenant's key of the same name left
alone, and the effect on requests through the OpenAI SDK."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.test_cache import cached

__all__ = ["cached"]

CACHE = "x-chittycan-cache"

FILE = """
version: 1
tenants:
  - slug: shop
    cache: {enabled: true}
    keys:
      - name: ci-bot
        cache: {enabled: false}
      - name: tests
        cache: {scope: own}
  - slug: other
"""


def apply_text(tmp_path: Path, text: str, *args: str) -> str:
    path = tmp_path / "chittycan.yaml"
    path.write_text(textwrap.dedent(text))
    out, err = io.StringIO(), io.StringIO()
    call_command("apply", "-f", str(path), *args, stdout=out, stderr=err)
    return out.getvalue() + err.getvalue()


def export_text() -> str:
    out = io.StringIO()
    call_command("export", stdout=out)
    return out.getvalue()


@pytest.fixture
def keys(transactional_db: Any) -> dict[str, Any]:
    """Tenants ``shop`` (keys ci-bot, tests, web) and ``other`` (a key also named ci-bot)."""
    from tenants import services

    shop = services.tenant_create(slug="shop")
    other = services.tenant_create(slug="other")
    out: dict[str, Any] = {}
    for tenant, name in ((shop, "ci-bot"), (shop, "tests"), (shop, "web"), (other, "ci-bot")):
        row, plaintext = services.key_issue(tenant=tenant, name=name)
        out[f"{tenant.slug}/{name}"] = (row, plaintext)
    return out


def settings_of(keys: dict[str, Any]) -> dict[str, tuple[bool | None, bool]]:
    from tenants.models import ApiKey

    rows = {k.pk: k for k in ApiKey.objects.all()}
    return {label: (rows[row.pk].cache_enabled, rows[row.pk].cache_own) for label, (row, _) in keys.items()}


DEFAULTS = {"shop/ci-bot": (None, False), "shop/tests": (None, False), "shop/web": (None, False)}


def test_apply_sets_key_settings_by_name_audited_and_idempotent(keys, tmp_path):
    from tenants.models import AuditEvent

    dry = apply_text(tmp_path, FILE, "--dry-run")
    ci_bot, tests = keys["shop/ci-bot"][0], keys["shop/tests"][0]
    assert f"~ update key shop/ci-bot ({ci_bot.prefix}): cache_enabled none -> False" in dry
    assert f"~ update key shop/tests ({tests.prefix}): cache_own False -> True" in dry
    assert "dry run" in dry
    assert settings_of(keys) == {**DEFAULTS, "other/ci-bot": (None, False)}  # nothing written

    out = apply_text(tmp_path, FILE)
    assert f"~ update key shop/ci-bot ({ci_bot.prefix}): cache_enabled none -> False" in out
    assert settings_of(keys) == {
        "shop/ci-bot": (False, False),
        "shop/tests": (None, True),
        "shop/web": (None, False),  # not in the file: untouched
        "other/ci-bot": (None, False),  # another tenant's key of the same name: untouched
    }
    audit = AuditEvent.objects.get(action="key.update", target=ci_bot.prefix)
    assert audit.actor_label == "apply" and audit.tenant is not None and audit.tenant.slug == "shop"
    assert "chittycan.yaml" in str(audit.data.get("source"))
    assert "cache_enabled" in str(audit.data)

    assert "no changes: the database already matches" in apply_text(tmp_path, FILE)
    # Listed without `cache`: back to the defaults (the file is declarative for what it lists).
    reset = FILE.replace("        cache: {enabled: false}\n", "")
    assert "cache_enabled False -> none" in apply_text(tmp_path, reset)
    assert settings_of(keys)["shop/ci-bot"] == (None, False)


def test_every_active_key_of_a_name_and_a_rotated_key_keep_the_settings(keys, tmp_path):
    from tenants import services
    from tenants.models import ApiKey

    shop = keys["shop/ci-bot"][0].tenant
    second, _ = services.key_issue(tenant=shop, name="ci-bot")  # two keys share the name
    apply_text(tmp_path, FILE)
    assert ApiKey.objects.get(pk=second.pk).cache_enabled is False
    rotated, _ = services.key_rotate(api_key=ApiKey.objects.get(pk=keys["shop/tests"][0].pk))
    assert (rotated.cache_enabled, ApiKey.objects.get(pk=rotated.pk).cache_own) == (None, True)
    assert "no changes" in apply_text(tmp_path, FILE)  # the revoked original is not named any more


def test_export_writes_non_default_key_settings_and_round_trips(keys, tmp_path):
    apply_text(tmp_path, FILE)
    exported = yaml.safe_load(export_text())
    tenants = {t["slug"]: t for t in exported["tenants"]}
    assert tenants["shop"]["keys"] == [
        {"name": "ci-bot", "cache": {"enabled": False}},
        {"name": "tests", "cache": {"scope": "own"}},
    ]
    assert "keys" not in tenants["other"]
    path = tmp_path / "exported.yaml"
    path.write_text(export_text())
    out = io.StringIO()
    call_command("apply", "-f", str(path), stdout=out, stderr=io.StringIO())
    assert "no changes: the database already matches" in out.getvalue()
    # --prune: the tenant's named keys the file does not list go back to the defaults.
    pruned = apply_text(tmp_path, FILE.replace("      - name: tests\n        cache: {scope: own}\n", ""), "--prune")
    assert "cache_own True -> False" in pruned
    assert settings_of(keys)["shop/tests"] == (None, False)
    assert settings_of(keys)["shop/ci-bot"] == (False, False)


def test_an_unknown_key_name_is_an_error_naming_it_and_nothing_is_written(keys, tmp_path):
    bad = FILE + "    keys:\n      - name: ghost\n        cache: {enabled: false}\n"
    with pytest.raises(CommandError, match="nothing was written"):
        apply_text(tmp_path, bad)
    # The error goes to stderr; run again to read it.
    path = tmp_path / "chittycan.yaml"
    err = io.StringIO()
    with pytest.raises(CommandError):
        call_command("apply", "-f", str(path), stdout=io.StringIO(), stderr=err)
    message = err.getvalue()
    assert "tenants[1].keys[0].name: tenant other has no active key named ghost" in message
    assert "can keys create --tenant other --name ghost" in message
    assert settings_of(keys)["shop/ci-bot"] == (None, False)  # the valid part was not written either
    # A revoked key is not a key the file can name.
    from tenants import services

    services.key_revoke(api_key=keys["shop/web"][0])
    err = io.StringIO()
    (tmp_path / "revoked.yaml").write_text("tenants:\n  - slug: shop\n    keys: [{name: web}]\n")
    with pytest.raises(CommandError):
        call_command("apply", "-f", str(tmp_path / "revoked.yaml"), stdout=io.StringIO(), stderr=err)
    assert "tenants[0].keys[0].name: tenant shop has no active key named web" in err.getvalue()


def test_key_entries_are_validated_when_the_file_is_read(db):
    from control.config import load, schema

    text = "tenants:\n  - slug: shop\n    keys:\n      - name: a\n      - name: a\n        cache: {scope: mine}\n"
    with pytest.raises(schema.ConfigError) as caught:
        load.load_text(text)
    assert any("tenants[0].keys[1].cache.scope: must be one of: tenant or own" in e for e in caught.value.errors)
    with pytest.raises(schema.ConfigError) as caught:
        load.load_text("tenants:\n  - slug: shop\n    keys:\n      - name: a\n      - name: a\n")
    assert caught.value.errors == [
        "chittycan.yaml: tenants[0].keys[1].name: duplicate key a (also at tenants[0].keys[0]) (line 5)"
    ]
    with pytest.raises(schema.ConfigError) as caught:
        load.load_text("tenants:\n  - slug: shop\n    keys:\n      - name: a\n        cache: {enabld: false}\n")
    assert "unknown field (did you mean enabled?)" in caught.value.errors[0]


def test_a_key_with_the_cache_off_misses_while_its_tenants_other_key_hits(cached, gateway_server, keys, tmp_path):
    apply_text(tmp_path, FILE)

    def ask(label: str) -> tuple[str | None, str]:
        client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=keys[label][1], max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Explain quantum computing"}]
        )
        return raw.headers.get(CACHE), raw.parse().choices[0].message.content or ""

    calls = len(cached.requests)
    assert ask("shop/web")[0] == "MISS"
    assert ask("shop/web")[0] == "HIT"  # positive control: the tenant's shared entry
    # cache off for ci-bot: never served from the cache (and its answers not stored).
    assert [ask("shop/ci-bot")[0] for _ in range(2)] == [None, None]
    # scope own: the tenant's entry is not tests' own; its own second request hits.
    assert [ask("shop/tests")[0] for _ in range(2)] == ["MISS", "HIT"]
    assert len(cached.requests) - calls == 4  # web's miss, ci-bot's two, tests' miss
