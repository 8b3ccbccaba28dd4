"""Single sign-on (dashboard/oidc.py) against a fake OpenID Connect provider on loopback
(tests/fakes/oidc_provider.py): the authorization-code flow as mozilla-django-oidc runs it, RS256
id tokens checked against the provider's JWKS, and the identity provider's groups mapped to
tenant roles at every sign-in."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import Client
from django.urls import reverse

from control.models import TenantMembership
from dashboard.oidc import group_roles, wanted_roles
from tenants import services
from tenants.models import AuditEvent
from tests.fakes.oidc_provider import FakeOIDC
from tests.fakes.server import ServerThread

CLIENT_ID, CLIENT_SECRET = "chittycan-dashboard", "s3cret-of-the-rp"


@pytest.fixture(scope="module")
def provider() -> Iterator[tuple[FakeOIDC, ServerThread]]:
    app = FakeOIDC(CLIENT_ID, CLIENT_SECRET)
    server = ServerThread(app, name="fake-oidc").start()
    app.issuer = server.url
    yield app, server
    server.stop()


@pytest.fixture
def sso(db: Any, settings: Any, provider: tuple[FakeOIDC, ServerThread]) -> FakeOIDC:
    app, server = provider
    settings.ROOT_URLCONF = "tests.sso_urls"
    settings.CHITTYCAN_OIDC_ENABLED = True
    settings.AUTHENTICATION_BACKENDS = ["django.contrib.auth.backends.ModelBackend", "dashboard.oidc.GroupRoleBackend"]
    settings.OIDC_RP_CLIENT_ID = CLIENT_ID
    settings.OIDC_RP_CLIENT_SECRET = CLIENT_SECRET
    settings.OIDC_RP_SIGN_ALGO = "RS256"
    settings.OIDC_RP_SCOPES = "openid email groups"
    settings.OIDC_OP_AUTHORIZATION_ENDPOINT = f"{server.url}/authorize"
    settings.OIDC_OP_TOKEN_ENDPOINT = f"{server.url}/token"
    settings.OIDC_OP_USER_ENDPOINT = f"{server.url}/userinfo"
    settings.OIDC_OP_JWKS_ENDPOINT = f"{server.url}/jwks"
    settings.LOGIN_REDIRECT_URL = "/dashboard/"
    settings.LOGIN_REDIRECT_URL_FAILURE = "/dashboard/login/"
    settings.CHITTYCAN_OIDC_GROUP_ROLES = "leads=acme:admin, devs=acme-team:member, all-staff=acme:viewer"
    acme = services.tenant_create(slug="acme", name="Acme")
    services.tenant_create(slug="acme-team", parent=acme, kind="team")
    services.tenant_create(slug="rival", name="Rival")
    return app


def _sign_in(client: Client, provider: FakeOIDC, claims: dict[str, Any]) -> Any:
    start = client.get("/oidc/authenticate/")
    assert start.status_code == 302
    query = parse_qs(urlsplit(start["Location"]).query)
    assert query["client_id"] == [CLIENT_ID] and query["response_type"] == ["code"]
    code = provider.issue_code(query["nonce"][0], claims)
    return client.get("/oidc/callback/", {"code": code, "state": query["state"][0]})


def test_login_page_offers_sso_when_configured(sso: FakeOIDC) -> None:
    page = Client().get(reverse("dashboard:login"))
    assert b'id="sso"' in page.content and b"/oidc/authenticate/" in page.content


def test_groups_become_tenant_roles_and_follow_the_identity_provider(sso: FakeOIDC) -> None:
    client = Client()
    done = _sign_in(client, sso, {"email": "pat@example.com", "groups": ["leads", "all-staff"]})
    assert done.status_code == 302 and done["Location"] == "/dashboard/"
    roles = dict(TenantMembership.objects.filter(user__email="pat@example.com").values_list("tenant__slug", "role"))
    assert roles == {"acme": "admin"}  # the strongest of admin and viewer; nothing on rival
    assert client.get(reverse("dashboard:team", args=["acme"])).status_code == 200
    assert client.get(reverse("dashboard:overview", args=["rival"])).status_code == 404
    pat = TenantMembership.objects.get(user__email="pat@example.com").user
    assert AuditEvent.objects.filter(action="member.set", actor_label="sso", target=pat.get_username()).exists()

    # Moved to the developers' group at the IdP: the next sign-in follows.
    again = Client()
    assert _sign_in(again, sso, {"email": "pat@example.com", "groups": ["devs"]}).status_code == 302
    roles = dict(TenantMembership.objects.filter(user__email="pat@example.com").values_list("tenant__slug", "role"))
    assert roles == {"acme-team": "member"}
    assert again.get(reverse("dashboard:overview", args=["acme"])).status_code == 404
    assert again.get(reverse("dashboard:overview", args=["acme-team"])).status_code == 200


def test_a_forged_or_replayed_code_signs_nobody_in(sso: FakeOIDC) -> None:
    client = Client()
    start = client.get("/oidc/authenticate/")
    state = parse_qs(urlsplit(start["Location"]).query)["state"][0]
    refused = client.get("/oidc/callback/", {"code": "not-a-code", "state": state})
    assert refused.status_code == 302 and refused["Location"].startswith("/dashboard/login/")
    assert "_auth_user_id" not in client.session
    # A right code with another session's state is refused too.
    other = Client()
    query = parse_qs(urlsplit(other.get("/oidc/authenticate/")["Location"]).query)
    code = sso.issue_code(query["nonce"][0], {"email": "eve@example.com", "groups": ["leads"]})
    mixed = client.get("/oidc/callback/", {"code": code, "state": query["state"][0]})
    assert mixed.status_code == 400  # mozilla-django-oidc: SuspiciousOperation (state mismatch)
    assert not TenantMembership.objects.filter(user__email="eve@example.com").exists()


def test_group_mapping_is_validated() -> None:
    assert group_roles("a=acme:admin,b=acme:viewer") == {"a": [("acme", "admin")], "b": [("acme", "viewer")]}
    assert wanted_roles(["a", "b"], group_roles("a=acme:admin,b=acme:viewer")) == {"acme": "admin"}
    for bad in ("a=acme", "a=acme:boss", "=acme:admin", "a:acme=admin"):
        with pytest.raises(ImproperlyConfigured):
            group_roles(bad)
