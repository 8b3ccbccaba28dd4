from __future__ import annotations

from django.apps import AppConfig


class ControlConfig(AppConfig):
    name = "control"
    verbose_name = "Management API"
    default_auto_field = "django.db.models.BigAutoField"
