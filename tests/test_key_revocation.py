"""A revoked or rotated key is refused at once by the gateway in the same process (service, CLI,
admin) and within one second by gateways in other processes: over Redis pub/sub, and in embedded
mode (no Redis) through the stamp file in VAR_DIR. The CLI says when the revocation takes effect."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command

from control import tokens
from core import invalidation
from gateway import auth
from tenants import keys, services
from tenants.keyinfo import load_key
from tenants.models import ApiKey
from tests.test_static_and_deploy import CAN, ROOT, Served, base_env, staff_session

#: The suite's Redis; tests that act as the embedded mode blank it for one call and put it back.
django_redis_url = settings.REDIS_URL
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def ask(base_url: str, key: str) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})


def api_key_of(plaintext: str) -> ApiKey:
    return ApiKey.objects.get(prefix=keys.key_prefix(plaintext))


def refused_within(base_url: str, key: str, seconds: float) -> float:
    """Ask until the key is refused; return how long that took (fails past ``seconds``)."""
    start = time.monotonic()
    while True:
        response = ask(base_url, key)
        elapsed = time.monotonic() - start
        if response.status_code == 401:
            assert response.json()["error"]["message"] == "Incorrect API key provided."
            return elapsed
        assert response.status_code == 200, response.text
        assert elapsed < seconds, f"the revoked key was still served {elapsed:.2f} s after revocation"
        time.sleep(0.05)


# --- the same process -----------------------------------------------------------------------------


def test_service_revocation_is_immediate_in_the_same_process_without_redis(
    gateway_server, upstream, tenant_key, settings
) -> None:
    """The embedded default: no Redis, the gateway and the writer in one process."""
    _, key = tenant_key
    assert ask(gateway_server.url, key).status_code == 200  # cached now
    settings.REDIS_URL = ""  # announce as embedded mode does: in process, plus the stamp file
    services.key_revoke(api_key=api_key_of(key))
    settings.REDIS_URL = django_redis_url
    response = ask(gateway_server.url, key)
    assert response.status_code == 401 and "x-request-id" in response.headers


def test_cli_revoke_in_the_same_process_is_immediate_and_says_so(gateway_server, upstream, tenant_key, capsys) -> None:
    _, key = tenant_key
    assert ask(gateway_server.url, key).status_code == 200
    call_command("keys", "revoke", keys.key_prefix(key))
    out = capsys.readouterr().out
    assert f"revoked {keys.key_prefix(key)} (acme): refused at once in this process" in out
    assert "within 1 s in every gateway process sharing this Redis" in out
    assert ask(gateway_server.url, key).status_code == 401


def test_admin_revocation_is_immediate_for_the_gateway_in_the_same_process(gateway_server, upstream, tenant_key):
    _, key = tenant_key
    assert ask(gateway_server.url, key).status_code == 200
    client = staff_session(gateway_server.url)
    changelist = client.get("/admin/tenants/apikey/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', changelist.text)
    assert token is not None
    response = client.post(
        "/admin/tenants/apikey/",
        data={
            "csrfmiddlewaretoken": token.group(1),
            "action": "revoke_keys",
            "_selected_action": str(api_key_of(key).pk),
        },
        headers={"Referer": f"{gateway_server.url}/admin/tenants/apikey/"},
    )
    assert response.status_code == 302, response.text[:1000]
    assert api_key_of(key).revoked_at is not None
    assert ask(gateway_server.url, key).status_code == 401
    client.close()


def test_rest_api_revocation_is_immediate_and_only_for_who_may_revoke(gateway_server, upstream, tenant_key):
    _, key = tenant_key
    api_key = api_key_of(key)
    assert ask(gateway_server.url, key).status_code == 200
    users = get_user_model().objects
    _, outsider = tokens.token_create(user=users.create_user("mallory", password="pw-mallory-123"))
    _, operator = tokens.token_create(user=users.create_superuser("root", "root@example.com", "pw-root-123"))
    url = f"{gateway_server.url}/api/keys/{api_key.pk}/revoke/"

    refused = httpx.post(url, headers={"Authorization": f"Bearer {outsider}"})
    assert refused.status_code in (403, 404)  # not a member of the key's tenant
    assert ask(gateway_server.url, key).status_code == 200  # and still served

    done = httpx.post(url, headers={"Authorization": f"Bearer {operator}"})
    assert done.status_code == 200, done.text
    assert ask(gateway_server.url, key).status_code == 401


def test_a_key_loaded_while_it_is_revoked_is_not_cached(gateway_server, upstream, tenant_key, monkeypatch) -> None:
    """A request reads the key from the database, the key is revoked before that read is cached:
    the stale read must not be cached for the TTL (the request in flight may still pass)."""
    _, key = tenant_key
    api_key = api_key_of(key)

    def load_then_revoke(prefix: str) -> Any:
        info = load_key(prefix)  # read while the key is still valid
        services.key_revoke(api_key=api_key)  # commits and announces before the read is cached
        return info

    monkeypatch.setattr(auth, "load_key", load_then_revoke)
    first = ask(gateway_server.url, key)
    assert first.status_code == 200  # in flight when revoked
    monkeypatch.undo()
    assert ask(gateway_server.url, key).status_code == 401


# --- other processes -------------------------------------------------------------------------------


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([CAN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def cli_env(transactional_db: Any, tmp_path: Path) -> dict[str, str]:
    """The environment of a `can` command in another process: same database, Redis and secret."""
    return base_env(tmp_path, SECRET_KEY=settings.SECRET_KEY)


def test_cli_revoke_in_another_process_reaches_the_running_gateway_within_a_second(
    gateway_server, upstream, tenant_key, cli_env
) -> None:
    _, key = tenant_key
    assert ask(gateway_server.url, key).status_code == 200  # cached, and the listener is running
    result = cli(cli_env, "keys", "revoke", keys.key_prefix(key))
    assert "refused at once in this process and within 1 s in every gateway process sharing this Redis" in (
        result.stdout
    )
    refused_within(gateway_server.url, key, 1.0)


def test_cli_rotate_in_another_process_refuses_the_old_key_within_a_second(
    gateway_server, upstream, tenant_key, cli_env
) -> None:
    _, key = tenant_key
    assert ask(gateway_server.url, key).status_code == 200
    result = cli(cli_env, "keys", "rotate", keys.key_prefix(key))
    new_key = re.search(r"chitty_[0-9A-Za-z]+", result.stdout)
    assert new_key is not None, result.stdout
    assert "within 1 s" in result.stderr
    refused_within(gateway_server.url, key, 1.0)
    assert ask(gateway_server.url, new_key.group(0)).status_code == 200


@pytest.fixture
def embedded_gateway(transactional_db: Any, tmp_path: Path) -> Any:
    """`can serve` with no Redis (the embedded default, dev mode: the mock model answers) on the
    test database; `can` commands run with ``env`` share its VAR_DIR, as under `make run`."""
    env = base_env(tmp_path, CHITTYCAN_MODE="dev", REDIS_URL="", SECRET_KEY=settings.SECRET_KEY)
    server = Served(env)
    server.env = env  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_embedded_mode_cli_revoke_reaches_the_running_gateway_within_a_second(
    embedded_gateway, upstream, make_tenant: Callable[..., Any], make_key: Callable[..., str], settings
) -> None:
    settings.REDIS_URL = ""  # this process issues the key as the embedded mode would (no Redis)
    tenant = make_tenant("solo")
    key = make_key(tenant, name="local")
    settings.REDIS_URL = django_redis_url
    for _ in range(3):
        assert ask(embedded_gateway.url, key).status_code == 200  # cached in the gateway process
    result = cli(embedded_gateway.env, "keys", "revoke", keys.key_prefix(key))
    assert "within 1 s in the embedded gateway using" in result.stdout
    elapsed = refused_within(embedded_gateway.url, key, 1.0)
    assert elapsed < 1.0
    assert invalidation.stamp_path().name == "config-changed.stamp"
    assert (Path(embedded_gateway.env["CHITTYCAN_VAR_DIR"]) / "config-changed.stamp").is_file()
