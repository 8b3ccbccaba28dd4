"""Audit rows for the admin's writes that no service of ours makes: users, groups, OTP devices,
anything a third-party ``ModelAdmin`` saves.

The models with a service (``tenants.admin.AuditedAdmin``, or an admin that says
``audited_by_service = True``) are audited by it; read-only admins write nothing. Every other
registered model gets an audit row for each save and delete made from its own admin pages (add,
change, delete, the changelist's bulk delete, a user's password form): the fields changed, with
their values before and after; secrets (passwords, device keys, tokens, hashes) are marked
changed, never stored. Saves made elsewhere under ``/admin/`` (the login updating ``last_login``,
the second-factor pages, which audit themselves) are not these. Users written by a command
(``createsuperuser``, ``changepassword``, the quickstart's admin user) are audited the same way.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.db.models import Model
from django.db.models.signals import post_delete, post_save, pre_delete, pre_save

from core import origin
from tenants import audit
from tenants.admin import AuditedAdmin, ReadOnlyAdmin

__all__ = ["connect"]

SECRET_WORDS = ("password", "secret", "key", "token", "hash")

# (model label, pk) -> the row's field values before the admin saved or deleted it.
_before: ContextVar[dict[tuple[str, str], dict[str, Any]] | None] = ContextVar("chittycan_admin_before", default=None)


def _is_secret(name: str) -> bool:
    return any(word in name.lower() for word in SECRET_WORDS)


def _audited_here(model: type[Model]) -> bool:
    """True inside a request to ``model``'s own admin pages, when no service of ours audits it; and
    for users written by a command (``createsuperuser``, ``changepassword``, the quickstart)."""
    where = origin.current()
    if where.surface == "cli" and model is get_user_model():
        return True
    request = where.request
    match = getattr(request, "resolver_match", None) if request is not None else None
    if match is None or match.namespace != "admin":
        return False
    if not (match.url_name or "").startswith(f"{model._meta.app_label}_{model._meta.model_name}_"):
        return False
    return True  # connected only for the models generic_models() lists


def _values(obj: Model) -> dict[str, Any]:
    return {f.attname: getattr(obj, f.attname) for f in obj._meta.concrete_fields}


def _key(obj: Model) -> tuple[str, str]:
    return (obj._meta.label_lower, str(obj.pk))


def _remember(sender: type[Model], instance: Model, **kwargs: Any) -> None:
    if instance.pk is None or not _audited_here(sender):
        return
    stored = sender._default_manager.filter(pk=instance.pk).first()
    if stored is None:
        return
    before = _before.get()
    if before is None:
        before = {}
        _before.set(before)
    before[_key(instance)] = _values(stored)


def _changes(before: dict[str, Any], after: dict[str, Any]) -> audit.Changes:
    changes: audit.Changes = {}
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old != new:
            changes[name] = (audit.HIDDEN, audit.HIDDEN) if _is_secret(name) else (old, new)
    return changes


def _record(verb: str, instance: Model, changes: audit.Changes) -> None:
    audit.record(
        f"{instance._meta.label_lower}.{verb}",
        target=str(instance),
        changes=changes,
        data={"object_id": str(instance.pk)},
        actor_label=origin.current().surface,
    )


def _saved(sender: type[Model], instance: Model, created: bool, **kwargs: Any) -> None:
    if not _audited_here(sender):
        return
    before = (_before.get() or {}).pop(_key(instance), {})
    changes = _changes(before, _values(instance))
    if created or changes:
        _record("create" if created else "update", instance, changes)


def _deleted(sender: type[Model], instance: Model, **kwargs: Any) -> None:
    if not _audited_here(sender):
        return
    before = (_before.get() or {}).pop(_key(instance), None) or _values(instance)
    _record("delete", instance, _changes(before, {}))


def generic_models() -> list[type[Model]]:
    """The registered models the admin writes without a service of ours."""
    return [
        model
        for model, model_admin in admin.site._registry.items()
        if not isinstance(model_admin, AuditedAdmin | ReadOnlyAdmin)
        and not getattr(model_admin, "audited_by_service", False)
    ]


def connect() -> None:
    """Called by ``chittycan.apps.discover_admin`` (after the admin's autodiscovery). Receivers are
    connected per model, never for every sender: a delete receiver on a model turns off Django's
    fast delete for it, which the ledger's retention relies on."""
    for model in {*generic_models(), get_user_model()}:
        uid = f"chittycan_admin_audit_{model._meta.label_lower}"
        pre_save.connect(_remember, sender=model, dispatch_uid=f"{uid}_pre_save")
        post_save.connect(_saved, sender=model, dispatch_uid=f"{uid}_post_save")
        pre_delete.connect(_remember, sender=model, dispatch_uid=f"{uid}_pre_delete")
        post_delete.connect(_deleted, sender=model, dispatch_uid=f"{uid}_post_delete")
