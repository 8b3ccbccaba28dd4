"""Input validation and output shapes of the management API. Amounts are integer micro-USD."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from budgets.models import Budget
from core import egress
from tenants.models import KNOWN_ENDPOINTS, ApiKey, Tenant


class TenantSerializer(serializers.ModelSerializer[Tenant]):
    parent = serializers.SlugRelatedField[Tenant](slug_field="slug", read_only=True)  # type: ignore[assignment]

    class Meta:
        model = Tenant
        fields = ["id", "slug", "name", "kind", "parent", "time_zone", "is_active", "created_at"]
        read_only_fields = fields


class TenantCreateSerializer(serializers.Serializer[Any]):
    slug = serializers.SlugField(max_length=100)
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    parent = serializers.SlugField(max_length=100, required=False, allow_null=True, default=None)  # type: ignore[assignment]
    kind = serializers.ChoiceField(choices=Tenant.Kind.choices, default=Tenant.Kind.TEAM)
    time_zone = serializers.CharField(max_length=64, required=False, default="")


def validate_scopes(value: Any) -> dict[str, list[str]]:
    if value in (None, {}):
        return {}
    if not isinstance(value, dict):
        raise serializers.ValidationError('Expected an object like {"models": [...], "endpoints": [...]}.')
    unknown = set(value) - {"models", "endpoints"}
    if unknown:
        raise serializers.ValidationError(f"Unknown scope kind(s): {', '.join(sorted(unknown))}.")
    out: dict[str, list[str]] = {}
    for kind, items in value.items():
        if not isinstance(items, list) or not all(isinstance(i, str) and i.strip() for i in items):
            raise serializers.ValidationError(f"{kind} must be a list of non-empty strings.")
        if kind == "endpoints":
            bad = [i for i in items if i not in KNOWN_ENDPOINTS]
            if bad:
                raise serializers.ValidationError(f"Unknown endpoint(s): {', '.join(bad)}.")
        out[kind] = list(dict.fromkeys(i.strip() for i in items))
    return out


class ApiKeySerializer(serializers.ModelSerializer[ApiKey]):
    tenant = serializers.SlugRelatedField[Tenant](slug_field="slug", read_only=True)
    is_usable = serializers.BooleanField(read_only=True)
    rotated_from = serializers.PrimaryKeyRelatedField[ApiKey](read_only=True)

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "tenant",
            "name",
            "prefix",
            "scopes",
            "rpm_limit",
            "tpm_limit",
            "expires_at",
            "revoked_at",
            "rotated_from",
            "is_usable",
            "created_at",
        ]
        read_only_fields = fields


class ApiKeyCreateSerializer(serializers.Serializer[Any]):
    tenant = serializers.SlugField(max_length=100)
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    scopes = serializers.JSONField(required=False, default=dict)
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)
    rpm_limit = serializers.IntegerField(required=False, allow_null=True, min_value=1, default=None)
    tpm_limit = serializers.IntegerField(required=False, allow_null=True, min_value=1, default=None)

    def validate_scopes(self, value: Any) -> dict[str, list[str]]:
        return validate_scopes(value)


class StrictIntegerField(serializers.IntegerField):
    """An integer, never a bool, a float or a numeric string: money is exact."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise serializers.ValidationError("Must be an integer (micro-USD).")
        return int(super().to_internal_value(data))


class BudgetSerializer(serializers.ModelSerializer[Budget]):
    tenant = serializers.SlugRelatedField(slug_field="slug", queryset=Tenant.objects.all(), required=False)
    api_key = serializers.PrimaryKeyRelatedField(queryset=ApiKey.objects.all(), required=False)
    limit_micro = StrictIntegerField(min_value=0, max_value=2**62)
    alert_thresholds = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=1000), required=False, max_length=20
    )
    alert_emails = serializers.ListField(child=serializers.EmailField(), required=False, max_length=50)
    webhook_secret = serializers.CharField(max_length=200, required=False, allow_blank=True, write_only=True)
    has_webhook_secret = serializers.SerializerMethodField()
    allow_weaken = serializers.BooleanField(
        write_only=True,
        required=False,
        help_text="Allow raising a hard budget's limit or turning it soft (refused otherwise).",
    )

    class Meta:
        model = Budget
        fields = [
            "id",
            "tenant",
            "api_key",
            "period",
            "limit_micro",
            "hard",
            "alert_thresholds",
            "alert_emails",
            "webhook_url",
            "webhook_secret",
            "has_webhook_secret",
            "allow_weaken",
            "created_at",
        ]
        read_only_fields = ["id", "created_at", "has_webhook_secret"]
        validators: list[Any] = []  # uniqueness is the service's job (it updates in place)

    def get_has_webhook_secret(self, obj: Budget) -> bool:
        return bool(obj.webhook_secret)

    def validate_webhook_url(self, value: str) -> str:
        egress.validate_url(value)  # a Django ValidationError becomes this field's 400 error
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if self.instance is None:
            if ("tenant" in attrs) == ("api_key" in attrs):
                raise serializers.ValidationError("Give exactly one of tenant (slug) or api_key (id).")
        elif "tenant" in attrs or "api_key" in attrs or "period" in attrs:
            raise serializers.ValidationError("A budget's scope and period cannot change; delete and recreate it.")
        return attrs
