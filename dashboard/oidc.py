"""Single sign-on through OpenID Connect (mozilla-django-oidc), off unless ``OIDC_RP_CLIENT_ID``
is set (settings: docs/dashboard.md).

Users are matched by e-mail (created at first sign-in). The identity provider's group claim
(``CHITTYCAN_OIDC_GROUPS_CLAIM``, default ``groups``) is mapped to tenant roles by
``CHITTYCAN_OIDC_GROUP_ROLES``: ``group=tenant-slug:role`` pairs, comma-separated, e.g.
``platform-leads=acme:admin,search-devs=acme-search:member``. At every SSO sign-in the mapping
is authoritative for the tenants it names: the user gets the strongest role its groups map to on
each, and loses its membership of a named tenant when none of its groups maps there any more.
Memberships on tenants the mapping does not name are left alone. Changes go through
``control.members`` (audited, actor label ``sso``).
"""

from __future__ import annotations

import logging
from typing import Any

import requests
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, SuspiciousOperation
from mozilla_django_oidc.auth import OIDCAuthenticationBackend

from control import members
from control.models import TenantMembership
from dashboard.access import RANK
from tenants.models import Tenant

ACTOR_LABEL = "sso"
log = logging.getLogger(__name__)


def group_roles(raw: str) -> dict[str, list[tuple[str, str]]]:
    """``"g1=acme:admin,g2=acme-x:viewer"`` -> ``{"g1": [("acme", "admin")], ...}``."""
    out: dict[str, list[tuple[str, str]]] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        group, sep, target = item.partition("=")
        slug, sep2, role = target.partition(":")
        if not (sep and sep2 and group.strip() and slug.strip()) or role.strip() not in RANK:
            raise ImproperlyConfigured(
                f"CHITTYCAN_OIDC_GROUP_ROLES: {item!r} is not group=tenant-slug:role "
                f"(role one of {', '.join(TenantMembership.Role.values)})"
            )
        out.setdefault(group.strip(), []).append((slug.strip(), role.strip()))
    return out


def wanted_roles(groups: list[str], mapping: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    """{tenant slug: the strongest role the user's groups give there}."""
    roles: dict[str, str] = {}
    for group in groups:
        for slug, role in mapping.get(group, []):
            if RANK[role] > RANK.get(roles.get(slug, ""), 0):
                roles[slug] = role
    return roles


def sync_memberships(user: Any, claims: dict[str, Any]) -> None:
    mapping = group_roles(settings.CHITTYCAN_OIDC_GROUP_ROLES)
    raw = claims.get(settings.CHITTYCAN_OIDC_GROUPS_CLAIM) or []
    groups = [str(g) for g in raw] if isinstance(raw, list) else [str(raw)]
    wanted = wanted_roles(groups, mapping)
    named = {slug for targets in mapping.values() for slug, _ in targets}
    for tenant in Tenant.objects.filter(slug__in=named):
        role = wanted.get(tenant.slug)
        if role is None:
            members.member_remove(user=user, tenant=tenant, actor_label=ACTOR_LABEL)
        else:
            members.member_set(user=user, tenant=tenant, role=role, actor_label=ACTOR_LABEL)


class GroupRoleBackend(OIDCAuthenticationBackend):
    """mozilla-django-oidc's backend, plus the group -> tenant role mapping at each sign-in."""

    def authenticate(self, request: Any, **kwargs: Any) -> Any:
        """A code the provider refuses, a provider that is down or claims that fail verification
        sign nobody in (back to the sign-in page), never a 500."""
        try:
            return super().authenticate(request, **kwargs)
        except (requests.RequestException, SuspiciousOperation) as exc:
            log.warning("single sign-on refused: %s", exc)
            return None

    def create_user(self, claims: dict[str, Any]) -> Any:
        user = super().create_user(claims)
        sync_memberships(user, claims)
        return user

    def update_user(self, user: Any, claims: dict[str, Any]) -> Any:
        sync_memberships(user, claims)
        return user
