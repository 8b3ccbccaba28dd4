"""What a server checks before it serves: a real SECRET_KEY outside dev mode, and Django's
``check --deploy`` findings printed at ``can serve`` start.

Management commands (``migrate``, ``collectstatic``, ``check``, ``can keys ...``) run without a
secret, so an image can be built and a database migrated before one is set; the ASGI and WSGI
applications and ``can serve`` refuse to start without one.
"""

from __future__ import annotations

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured


class InsecureSecretKey(ImproperlyConfigured):
    """SECRET_KEY is unset (the public development default) or too weak, outside dev mode."""


def secret_key_problem() -> str:
    """Why this process must not serve with its SECRET_KEY ("" when it may)."""
    return str(settings.CHITTYCAN_SECRET_KEY_PROBLEM)


def require_secret_key() -> None:
    """Raise ``InsecureSecretKey`` (with what to do) unless the SECRET_KEY may be served with."""
    problem = secret_key_problem()
    if problem:
        raise InsecureSecretKey(f"ChittyCan refuses to start: {problem}")


def deploy_findings() -> list[checks.CheckMessage]:
    """Django's system checks including the deployment ones (``manage.py check --deploy``),
    warnings and worse, silenced ones left out; database checks are not run."""
    found = checks.run_checks(include_deployment_checks=True)
    return [m for m in found if m.level >= checks.WARNING and not m.is_silenced()]


def is_serious(message: checks.CheckMessage) -> bool:
    return message.is_serious(checks.ERROR)
