from __future__ import annotations

from django.apps import AppConfig


class ControlConfig(AppConfig):
    name = "control"
    verbose_name = "Management API"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from control import tokens  # noqa: PLC0415  (app registry not ready at module import)
        from gateway import cache  # noqa: PLC0415

        # The gateway sits below the control plane: the check is handed down, not imported up.
        cache.management_token_check = tokens.is_staff_token
