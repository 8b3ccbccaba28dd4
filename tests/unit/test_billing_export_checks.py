"""The retention setting can never prune rows the Stripe export has yet to bill."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError


def test_default_retention_passes_the_check():
    call_command("check", "--fail-level", "ERROR")


def test_retention_inside_stripes_window_is_a_system_check_error(settings):
    settings.CHITTYCAN_USAGE_RETENTION_DAYS = 30
    with pytest.raises(SystemCheckError, match="billing_export.E001"):
        call_command("check", "--fail-level", "ERROR")
