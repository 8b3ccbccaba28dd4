"""The egress policy (core.egress, docs/security.md): stored outbound URLs are checked when saved
(REST API, admin, ``can apply``, the catalogue) and when used (budget webhooks, upstream
connections), after DNS resolution, pinned to the vetted address, without following redirects,
and a failed delivery stores only a generic class of failure.

DNS answers are simulated with ``egress.use_resolver`` (names under ``.test`` never resolve for
real); address literals go to the system resolver, as in production. The suite allows loopback
(tests/conftest.py); these tests narrow the allowlist themselves.
"""

from __future__ import annotations

import asyncio
import io
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import reverse
from django_otp.plugins.otp_totp.models import TOTPDevice
from rest_framework.test import APIClient

from budgets import alerts
from budgets import services as budget_services
from budgets.models import AlertSent, Budget
from control import tokens
from control.models import TenantMembership
from core import egress
from gateway import catalog, http
from gateway.models import Provider
from ledger import writer
from tests.conftest import add_model
from tests.test_admin import PASSWORD, otp_login

PUBLIC = "93.184.216.34"  # a public address: nothing connects to it here, the checks run first
DNS = {
    "hooks.public.test": [PUBLIC],
    "internal.test": ["10.0.0.5"],
    "mixed.test": [PUBLIC, "127.0.0.1"],
    "metadata-alias.test": ["169.254.169.254"],
}


def fake_dns(extra: dict[str, list[str]] | None = None) -> egress.Resolver:
    live = extra if extra is not None else {}

    def resolve(host: str, port: int) -> list[str]:
        if host in live:
            return list(live[host])
        if host in DNS:
            return list(DNS[host])
        if host.endswith(".test"):
            return []
        return egress.system_resolver(host, port)  # address literals, localhost

    return resolve


@pytest.fixture
def dns() -> Iterator[dict[str, list[str]]]:
    """The simulated DNS; a test changes an answer by assigning to the returned dict."""
    table: dict[str, list[str]] = {}
    with egress.use_resolver(fake_dns(table)):
        yield table


@pytest.fixture
def prod(settings: Any, dns: dict[str, list[str]]) -> Any:
    """Production mode with an empty allowlist."""
    settings.CHITTYCAN_MODE = "prod"
    settings.CHITTYCAN_EGRESS_ALLOW = ""
    settings.OLLAMA_BASE_URL = ""
    return settings


REFUSED = [
    "https://127.0.0.1/hook",
    "https://localhost/hook",
    "https://127.0.0.2:8443/hook",
    "https://[::1]/hook",
    "https://0.0.0.0/hook",
    "https://10.1.2.3/hook",
    "https://172.16.0.1/hook",
    "https://192.168.1.10/hook",
    "https://100.64.0.1/hook",  # CGNAT
    "https://169.254.169.254/latest/meta-data/",  # AWS, Azure, GCP metadata
    "https://[fd00:ec2::254]/latest/meta-data/",  # AWS metadata over IPv6 (ULA)
    "https://[fe80::1]/hook",
    "https://224.0.0.1/hook",  # multicast
    "https://metadata.google.internal/computeMetadata/v1/",
    "https://2130706433/hook",  # 127.0.0.1 as a decimal number
    "https://0x7f000001/hook",  # and in hexadecimal
    "https://[::ffff:127.0.0.1]/hook",  # IPv4-mapped IPv6
    "https://[::ffff:a00:1]/hook",  # 10.0.0.1, mapped
    "https://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 of 169.254.169.254
    "https://[2002:7f00:1::]/hook",  # 6to4 of 127.0.0.1
    "https://internal.test/hook",  # a name that resolves to a private address
    "https://mixed.test/hook",  # one public and one loopback answer
    "https://metadata-alias.test/hook",
    f"http://{PUBLIC}/hook",  # http in production
    "http://hooks.public.test/hook",
]


@pytest.mark.parametrize("url", REFUSED)
def test_policy_refuses(prod: Any, url: str) -> None:
    with pytest.raises(egress.EgressBlocked):
        egress.check_url(url)
    with pytest.raises(ValidationError) as info:
        egress.validate_url(url)
    assert "not allowed" in " ".join(info.value.messages)


def test_policy_accepts_public_https_and_http_in_dev_mode(prod: Any) -> None:
    assert egress.check_url("https://hooks.public.test/x").addresses == [PUBLIC]
    assert egress.check_url(f"https://{PUBLIC}:8443/x").addresses == [PUBLIC]
    egress.validate_url("https://not-registered.test/x")  # does not resolve now: checked again at send
    with pytest.raises(egress.EgressBlocked, match="does not resolve"):
        egress.check_url("https://not-registered.test/x")
    prod.CHITTYCAN_MODE = "dev"
    assert egress.check_url("http://hooks.public.test/x").addresses == [PUBLIC]
    with pytest.raises(egress.EgressBlocked):  # dev mode allows http, not internal addresses
        egress.check_url("http://127.0.0.1:11434/")


def test_allowlist_names_hosts_addresses_and_networks(prod: Any) -> None:
    prod.CHITTYCAN_EGRESS_ALLOW = "internal.test, 127.0.0.1, 172.16.0.0/12, fd00:ec2::/64"
    assert egress.check_url("https://internal.test/x").addresses == ["10.0.0.5"]
    egress.check_url("http://internal.test/x")  # an allowlisted destination may be plain http
    egress.check_url("http://127.0.0.1:11434/")
    egress.check_url("https://172.20.1.1/")
    egress.check_url("https://[fd00:ec2::254]/")
    for url in ("https://127.0.0.2/", "https://10.0.0.6/", "https://169.254.169.254/", "http://hooks.public.test/"):
        with pytest.raises(egress.EgressBlocked):
            egress.check_url(url)


def test_the_dev_ollama_host_is_allowed(prod: Any) -> None:
    prod.CHITTYCAN_MODE = "dev"
    with pytest.raises(egress.EgressBlocked):
        egress.check_url("http://localhost:11434/api/chat")
    prod.OLLAMA_BASE_URL = "http://localhost:11434"
    egress.check_url("http://localhost:11434/api/chat")


def test_send_pins_the_vetted_address_and_keeps_host_and_sni(prod: Any, dns: dict[str, list[str]]) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    dns["hooks.pinned.test"] = [PUBLIC]
    response = egress.send("POST", "https://hooks.pinned.test:8443/x?a=1", transport=httpx.MockTransport(handler))
    assert response.status_code == 204
    [request] = seen
    assert str(request.url) == f"https://{PUBLIC}:8443/x?a=1"
    assert request.headers["host"] == "hooks.pinned.test:8443"
    assert request.extensions["sni_hostname"] == "hooks.pinned.test"


# --- the REST API, as a tenant admin who is not staff ---------------------------------------------


@pytest.fixture
def alice(make_tenant: Callable[..., Any]) -> APIClient:
    org = make_tenant("egress-org")
    make_tenant("egress-team", parent=org, kind="team")
    user = get_user_model().objects.create_user("alice-egress", password="pw-alice-123")
    TenantMembership.objects.create(user=user, tenant=org, role="admin")
    _, plaintext = tokens.token_create(user=user, name="test")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    return client


API_REFUSED = [
    "http://127.0.0.1:6379/internal-admin",
    "https://localhost/internal-admin",
    "https://10.0.0.7/",
    "https://169.254.169.254/latest/meta-data/",
    "https://metadata.google.internal/computeMetadata/v1/",
    "https://[fd00:ec2::254]/",
    "https://[::ffff:127.0.0.1]/",
    "https://internal.test/hook",
    "http://hooks.public.test/hook",
]


@pytest.mark.parametrize("url", API_REFUSED)
def test_rest_api_refuses_internal_webhooks(prod: Any, alice: APIClient, url: str) -> None:
    body = {"tenant": "egress-team", "period": "day", "limit_micro": 1_000_000, "webhook_url": url}
    res = alice.post("/api/budgets/", body, format="json")
    assert res.status_code == 400, res.content
    assert list(res.json()) == ["webhook_url"], res.json()
    assert not Budget.objects.filter(tenant__slug="egress-team").exists()


def test_rest_api_refuses_decimal_ip_webhooks(prod: Any, alice: APIClient) -> None:
    for url in ("https://2130706433/", "https://0x7f000001/", "https://0177.0.0.1/"):
        body = {"tenant": "egress-team", "period": "day", "limit_micro": 1, "webhook_url": url}
        res = alice.post("/api/budgets/", body, format="json")
        assert res.status_code == 400 and "webhook_url" in res.json(), (url, res.content)
    assert not Budget.objects.filter(tenant__slug="egress-team").exists()


def test_rest_api_update_is_checked_and_allowlisted_hosts_pass(prod: Any, alice: APIClient) -> None:
    body = {"tenant": "egress-team", "period": "day", "limit_micro": 1, "webhook_url": "https://hooks.public.test/a"}
    res = alice.post("/api/budgets/", body, format="json")
    assert res.status_code == 201, res.content
    budget_id = res.json()["id"]
    patch = alice.patch(f"/api/budgets/{budget_id}/", {"webhook_url": "https://internal.test/b"}, format="json")
    assert patch.status_code == 400 and "webhook_url" in patch.json()
    assert Budget.objects.get(pk=budget_id).webhook_url == "https://hooks.public.test/a"
    prod.CHITTYCAN_EGRESS_ALLOW = "internal.test"
    patch = alice.patch(f"/api/budgets/{budget_id}/", {"webhook_url": "https://internal.test/b"}, format="json")
    assert patch.status_code == 200, patch.content
    assert Budget.objects.get(pk=budget_id).webhook_url == "https://internal.test/b"


def test_budget_service_refuses_with_a_field_error(prod: Any, make_tenant: Callable[..., Any]) -> None:
    tenant = make_tenant("egress-svc")
    with pytest.raises(ValidationError) as info:
        budget_services.budget_set(tenant=tenant, limit_micro=1, webhook_url="https://10.0.0.1/x")
    assert list(info.value.message_dict) == ["webhook_url"]
    assert not Budget.objects.filter(tenant=tenant).exists()


# --- provider base URLs: the catalogue, the admin, can apply ---------------------------------------


def test_catalog_refuses_internal_base_urls(prod: Any, transactional_db: Any) -> None:
    with pytest.raises(ValidationError) as info:
        catalog.provider_create(slug="evil", kind="openai", base_url="http://169.254.169.254/v1")
    assert list(info.value.message_dict) == ["base_url"]
    assert not Provider.objects.filter(slug="evil").exists()
    provider = catalog.provider_create(slug="ok", kind="openai", base_url="https://hooks.public.test/v1")
    with pytest.raises(ValidationError):
        catalog.provider_update(provider, base_url="https://internal.test/v1")
    provider.refresh_from_db()
    assert provider.base_url == "https://hooks.public.test/v1"
    catalog.provider_update(provider, max_retries=3)  # an unchanged URL is not looked up again


@pytest.fixture
def admin_client(transactional_db: Any) -> Client:
    user = get_user_model().objects.create_superuser("root-egress", "root@example.com", PASSWORD)
    device = TOTPDevice.objects.create(user=user, name="phone", confirmed=True)
    client = Client()
    assert otp_login(client, user, device).status_code == 302
    return client


def test_admin_forms_show_the_error(prod: Any, admin_client: Client, make_tenant: Callable[..., Any]) -> None:
    form = {
        "slug": "evil",
        "kind": "openai",
        "base_url": "https://[::ffff:169.254.169.254]/v1",
        "is_active": "on",
        "api_key": "",
        "extra_headers": "{}",
        "connect_timeout": "5",
        "read_timeout": "600",
        "max_retries": "2",
    }
    res = admin_client.post(reverse("admin:gateway_provider_add"), form)
    assert res.status_code == 200 and "This URL is not allowed" in res.content.decode()
    assert not Provider.objects.filter(slug="evil").exists()
    tenant = make_tenant("egress-admin")
    budget = {
        "tenant": tenant.pk,
        "period": "day",
        "limit_usd": "5",
        "alert_thresholds": "[50]",
        "alert_emails": "[]",
        "webhook_url": "https://192.168.0.1/hook",
    }
    res = admin_client.post(reverse("admin:budgets_budget_add"), budget)
    assert res.status_code == 200 and "This URL is not allowed" in res.content.decode()
    assert not Budget.objects.filter(tenant=tenant).exists()
    res = admin_client.post(
        reverse("admin:budgets_budget_add"), {**budget, "webhook_url": "https://hooks.public.test/"}
    )
    assert res.status_code == 302
    assert Budget.objects.get(tenant=tenant).webhook_url == "https://hooks.public.test/"


APPLY = """
providers:
  - slug: local
    kind: openai
    base_url: {base_url}
tenants:
  - slug: egress-apply
    budgets:
      - period: month
        limit_usd: "10"
        webhook: {webhook}
"""


def _apply(tmp_path: Path, base_url: str, webhook: str) -> str:
    """``can apply -f chittycan.yaml``; what it wrote to stderr."""
    path = tmp_path / "chittycan.yaml"
    path.write_text(textwrap.dedent(APPLY.format(base_url=base_url, webhook=webhook)))
    err = io.StringIO()
    call_command("apply", "-f", str(path), stdout=io.StringIO(), stderr=err)
    return err.getvalue()


def _apply_error(tmp_path: Path, base_url: str, webhook: str) -> str:
    err = io.StringIO()
    path = tmp_path / "chittycan.yaml"
    path.write_text(textwrap.dedent(APPLY.format(base_url=base_url, webhook=webhook)))
    with pytest.raises(CommandError, match="1 error; nothing was written"):
        call_command("apply", "-f", str(path), stdout=io.StringIO(), stderr=err)
    return err.getvalue()


def test_apply_names_the_file_and_field(prod: Any, transactional_db: Any, tmp_path: Path) -> None:
    ok = "https://hooks.public.test/v1"
    err = _apply_error(tmp_path, "http://127.0.0.1:11434", ok)
    assert "chittycan.yaml: providers[0].base_url: This URL is not allowed" in err, err
    err = _apply_error(tmp_path, ok, "https://169.254.169.254/")
    assert "chittycan.yaml: tenants[0].budgets[0].webhook: This URL is not allowed" in err, err
    assert not Provider.objects.filter(slug="local").exists()
    prod.CHITTYCAN_EGRESS_ALLOW = "127.0.0.1"  # a local vLLM or Ollama, named by the operator
    _apply(tmp_path, "http://127.0.0.1:11434", ok)
    assert Provider.objects.get(slug="local").base_url == "http://127.0.0.1:11434"


# --- webhooks at send time --------------------------------------------------------------------------


class Server:
    """An HTTP server on 127.0.0.1 that records requests and answers ``status`` (with ``location``
    for redirects, ``body`` as the body, after ``delay`` seconds)."""

    def __init__(self, status: int = 200, *, location: str = "", body: bytes = b"", delay: float = 0.0) -> None:
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                server.requests.append(dict(self.headers.items()))
                if delay:
                    threading.Event().wait(delay)
                try:
                    self.send_response(status)
                    if location:
                        self.send_header("location", location)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(*args: Any, **kwargs: Any) -> Server:
        started.append(Server(*args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.close()


def _alert_for(tenant: Any, url: str, *, saved: bool = False) -> AlertSent:
    """A budget with ``url`` as webhook and an alert due. ``saved``: through the budget service
    (which checks it); otherwise stored as it is (the save-time check is not the subject)."""
    budget = budget_services.budget_set(
        tenant=tenant, period="total", limit_micro=10, alert_thresholds=[50], webhook_url=url if saved else ""
    )
    Budget.objects.filter(pk=budget.pk).update(webhook_url=url)
    writer.write_rows(
        [
            {
                "request_id": f"req_{uuid.uuid4().hex}",
                "created_at": time.time(),
                "tenant_id": tenant.pk,
                "api_key_id": None,
                "endpoint": "chat",
                "requested_model": "gpt-4o",
                "cost_micro": 5,
            }
        ]
    )
    [alert] = alerts.check_budgets()
    return alert


def _deliver(alert: AlertSent) -> str:
    with pytest.raises(alerts.DeliveryError):
        alerts.deliver(alert.pk)
    alert.refresh_from_db()
    assert alert.webhook_sent_at is None
    return alert.last_error


@pytest.fixture
def quiet_mail(settings: Any) -> None:
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"


def test_webhook_whose_dns_now_points_inside_is_blocked(
    prod: Any,
    dns: dict[str, list[str]],
    make_tenant: Callable[..., Any],
    servers: Callable[..., Server],
    quiet_mail: None,
) -> None:
    receiver = servers()
    prod.CHITTYCAN_MODE = "dev"  # the receiver speaks http
    dns["hooks.rebind.test"] = [PUBLIC]
    url = f"http://hooks.rebind.test:{receiver.port}/hook"
    tenant = make_tenant("egress-rebind")
    alert = _alert_for(tenant, url, saved=True)  # accepted when saved: the name is public then
    dns["hooks.rebind.test"] = ["127.0.0.1"]  # the name is rebound to loopback before the alert goes
    assert _deliver(alert) == "webhook: blocked by egress policy"
    assert receiver.requests == []
    # Allowlisted, the same name is delivered, to the vetted address with the name as Host.
    prod.CHITTYCAN_EGRESS_ALLOW = "hooks.rebind.test"
    alerts.deliver(alert.pk)
    assert len(receiver.requests) == 1, receiver.requests
    [headers] = receiver.requests
    assert headers["Host"] == f"hooks.rebind.test:{receiver.port}"


def test_webhook_to_a_literal_internal_address_is_blocked_at_send(
    prod: Any, make_tenant: Callable[..., Any], servers: Callable[..., Server], quiet_mail: None
) -> None:
    receiver = servers()
    alert = _alert_for(make_tenant("egress-literal"), receiver.url)
    assert _deliver(alert) == "webhook: blocked by egress policy"  # http in production, and loopback
    prod.CHITTYCAN_MODE = "dev"
    assert _deliver(alert) == "webhook: blocked by egress policy"  # still loopback
    assert receiver.requests == []


def test_redirects_are_not_followed(
    settings: Any, make_tenant: Callable[..., Any], servers: Callable[..., Server], quiet_mail: None
) -> None:
    inner = servers()
    outer = servers(302, location=inner.url)
    alert = _alert_for(make_tenant("egress-redirect"), outer.url)
    assert _deliver(alert) == "webhook: HTTP 302"
    assert len(outer.requests) == 1 and inner.requests == []


def test_last_error_is_generic(
    settings: Any, make_tenant: Callable[..., Any], servers: Callable[..., Server], quiet_mail: None
) -> None:
    secret = b"root:x:0:0 internal-admin says hello"
    failing = servers(500, body=secret)
    alert = _alert_for(make_tenant("egress-500"), failing.url)
    assert _deliver(alert) == "webhook: HTTP 500"

    closed = servers()
    closed.close()  # a port nothing listens on
    Budget.objects.filter(pk=alert.budget_id).update(webhook_url=closed.url)
    assert _deliver(alert) == "webhook: connection failed"

    settings.CHITTYCAN_ALERT_WEBHOOK_TIMEOUT = 0.3
    slow = servers(200, delay=1.0)
    Budget.objects.filter(pk=alert.budget_id).update(webhook_url=slow.url)
    assert _deliver(alert) == "webhook: timed out"
    assert "internal-admin" not in alert.last_error


# --- provider base URLs at connect time --------------------------------------------------------------


def _blocked(exc: BaseException | None) -> bool:
    """The egress policy is somewhere in the chain (aiohttp keeps it as ``os_error``)."""
    while exc is not None:
        if isinstance(exc, egress.EgressBlocked) or egress.BLOCKED in str(exc):
            return True
        exc = getattr(exc, "os_error", None) or exc.__cause__
    return False


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_upstream_connections_are_vetted_when_they_resolve(
    prod: Any, dns: dict[str, list[str]], fake_openai: Any, transport: str
) -> None:
    prod.CHITTYCAN_HTTP_TRANSPORT = transport
    _, server = fake_openai
    port = httpx.URL(server.url).port
    dns["upstream.rebind.test"] = ["127.0.0.1"]

    async def get(url: str) -> int:
        client = http._build()
        try:
            return (await client.get(url)).status_code
        finally:
            await client.aclose()

    for url in (f"http://upstream.rebind.test:{port}/v1/models", f"http://127.0.0.1:{port}/v1/models"):
        with pytest.raises(httpx.TransportError) as info:
            asyncio.run(get(url))
        assert _blocked(info.value), info.value
    prod.CHITTYCAN_EGRESS_ALLOW = "upstream.rebind.test,127.0.0.1"
    assert asyncio.run(get(f"http://upstream.rebind.test:{port}/v1/models")) == 200
    assert asyncio.run(get(f"http://127.0.0.1:{port}/v1/models")) == 200


def test_v1_request_to_a_rebound_provider_fails_cleanly(
    prod: Any,
    dns: dict[str, list[str]],
    fake_openai: Any,
    gateway_server: Any,
    make_tenant: Callable[..., Any],
    make_key: Callable[..., str],
) -> None:
    app, server = fake_openai
    dns["upstream.rebind.test"] = ["127.0.0.1"]
    base = f"http://upstream.rebind.test:{httpx.URL(server.url).port}/v1"
    provider = Provider(slug="rebound", kind="openai", base_url=base, max_retries=0)  # saved before the change
    provider.save()
    add_model("rebound-model", provider)
    tenant = make_tenant("egress-v1")
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=make_key(tenant), max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="rebound-model", messages=messages)
    assert info.value.status_code == 502  # a connection failure, not a 500
    assert "127.0.0.1" not in str(info.value.body)
    assert app.requests == []
    prod.CHITTYCAN_EGRESS_ALLOW = "upstream.rebind.test"
    reply = client.chat.completions.create(model="rebound-model", messages=messages)
    assert reply.choices[0].message.content
    assert app.requests[-1].headers["host"] == f"upstream.rebind.test:{httpx.URL(server.url).port}"


def test_v1_falls_back_past_a_refused_provider(
    prod: Any,
    dns: dict[str, list[str]],
    fake_openai: Any,
    gateway_server: Any,
    make_tenant: Callable[..., Any],
    make_key: Callable[..., str],
) -> None:
    app, server = fake_openai
    port = httpx.URL(server.url).port
    prod.CHITTYCAN_EGRESS_ALLOW = "good.test"  # by name: the same fake upstream under another name is not
    dns["good.test"] = dns["inside.rebind.test"] = ["127.0.0.1"]
    refused = Provider(slug="refused", kind="openai", base_url=f"http://inside.rebind.test:{port}/v1", max_retries=0)
    refused.save()
    good = Provider(slug="good", kind="openai", base_url=f"http://good.test:{port}/v1", max_retries=0)
    good.save()
    add_model("fallback-model", refused, priority=0)
    add_model("fallback-model", good, priority=1)
    tenant = make_tenant("egress-fallback")
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=make_key(tenant), max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    raw = client.chat.completions.with_raw_response.create(model="fallback-model", messages=messages)
    assert raw.headers["x-chittycan-provider"] == "good"
    assert [r.headers["host"] for r in app.requests] == [f"good.test:{port}"]
