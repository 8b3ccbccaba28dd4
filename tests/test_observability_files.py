"""The Grafana dashboard, the Prometheus rules and the compose ``observability`` profile parse, and
every metric they query is one the gateway exposes (promtool is not available: this is the check).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics

DOCKER = Path(__file__).resolve().parent.parent / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "chittycan.json"
RULES = DOCKER / "prometheus" / "alerts.yml"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
COMPOSE = DOCKER / "compose.yaml"

METRIC = re.compile(r"\b(chittycan_[a-z0-9_]+)")
RECORDED = re.compile(r"\b(chittycan:[a-z0-9_:]+)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


@pytest.fixture
def exposed(db: Any) -> set[str]:
    """Every sample name ``GET /metrics`` can carry, from the gateway's own exposition."""
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics.render().decode()):
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_every_metric_queried_exists(exposed):
    assert {"chittycan_requests_total", "chittycan_breaker_state", "chittycan_cache_saved_usd_total"} <= exposed
    exprs = dashboard_exprs() + [r["expr"] for r in rules()]
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert used, "no metric found in the dashboard or the rules"
    assert used - exposed == set(), f"queried but not exposed: {sorted(used - exposed)}"
    # Recording rules used by the dashboard and the alerts are defined.
    recorded = {r["record"] for r in rules() if "record" in r}
    used_recorded = {name for expr in exprs for name in RECORDED.findall(expr)}
    assert used_recorded and used_recorded <= recorded


def test_dashboard_covers_what_the_issue_asks():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "chittycan-overview"
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests per second", "latency percentiles", "first token", "errors by provider"):
        assert topic in titles
    for topic in ("spend by tenant", "spend by model", "cache hit rate", "cache savings", "breaker"):
        assert topic in titles
    assert "99.9 % slo" in titles and "burn rate" in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "prometheus" and panel["targets"]
    quantiles = [e for e in dashboard_exprs() if "histogram_quantile" in e]
    assert quantiles and all("_bucket" in e and "le" in e for e in quantiles)


def test_alert_rules():
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert {"ChittyCanProviderErrorBudgetBurnFast", "ChittyCanProviderErrorBudgetBurnSlow"} <= set(alerts)
    assert "chittycan_usage_queue_lag_seconds" in alerts["ChittyCanUsageWriterLag"]["expr"]
    assert "14.4 * 0.001" in alerts["ChittyCanProviderErrorBudgetBurnFast"]["expr"]
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("page", "ticket") and rule["annotations"]["summary"]
        assert rule["expr"].count("(") == rule["expr"].count(")")


def test_compose_observability_profile():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert services["prometheus"]["profiles"] == ["observability"]
    assert services["grafana"]["profiles"] == ["observability"]
    assert "profiles" not in services["gateway"]  # the default stack is unchanged
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), f"{name} mounts a missing {source}"
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    [job] = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["gateway:8080"]
    assert job["authorization"]["credentials_file"] == "/prometheus/metrics-token"
    provisioning = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert provisioning["datasources"][0]["uid"] == "prometheus"
    dashboards = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/chittycan.yml").read_text())
    assert dashboards["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
