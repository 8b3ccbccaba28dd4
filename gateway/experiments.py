"""Routing experiments: the write path (create/replace, promote) and the report.

The admin, ``can apply`` and ``can experiments`` call these functions. Each write runs in one
transaction, validates the row, writes an audit row (``tenants.audit``) and announces the change
after commit so every gateway process rebuilds its route table (which holds the running
experiments). ``experiments_auto_promote`` is the periodic task's body (Celery beat, or the
embedded scheduler): it promotes the winner of each experiment that asks for it once the ledger
shows the configured sample size and significance (``ledger.experiments.winner``).
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from core import invalidation
from gateway.models import Experiment
from gateway.routing.experiments import ExperimentError, parse_arms
from ledger import experiments as results
from tenants import audit
from tenants.models import Tenant

__all__ = [
    "EXPERIMENT_FIELDS",
    "experiment_config",
    "experiment_delete",
    "experiment_promote",
    "experiment_put",
    "experiment_report",
    "experiments_auto_promote",
]

EXPERIMENT_FIELDS = (
    "model",
    "rule",
    "arms",
    "status",
    "description",
    "auto_promote",
    "metric",
    "min_samples",
    "significance",
    "winner",
)


def experiment_config(experiment: Experiment) -> dict[str, Any]:
    """The experiment as the configuration file writes it."""
    data: dict[str, Any] = {"id": experiment.slug}
    if experiment.tenant_id is not None and experiment.tenant is not None:
        data["tenant"] = experiment.tenant.slug
    if experiment.model:
        data["model"] = experiment.model
    if experiment.rule:
        data["rule"] = experiment.rule
    data["arms"] = experiment.arms
    data["status"] = experiment.status
    if experiment.description:
        data["description"] = experiment.description
    if experiment.auto_promote:
        data["auto_promote"] = {
            "metric": experiment.metric,
            "min_samples": experiment.min_samples,
            "significance": experiment.significance,
        }
    if experiment.winner:
        data["winner"] = experiment.winner
    return data


@transaction.atomic
def experiment_put(
    *,
    slug: str,
    arms: list[dict[str, Any]],
    tenant: Tenant | None = None,
    model: str = "",
    rule: str = "",
    status: str = Experiment.Status.RUNNING,
    description: str = "",
    auto_promote: bool = False,
    metric: str = Experiment.Metric.SCORE,
    min_samples: int = 100,
    significance: float = 0.05,
    winner: str = "",
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
) -> tuple[Experiment, audit.Changes | None]:
    """Create or replace the experiment ``slug``. Returns the row and what changed: None when it
    was created, ``{}`` when nothing did (nothing is written, audited or announced then)."""
    try:
        parse_arms(arms)
    except ExperimentError as err:
        raise ValidationError({"arms": err.message}) from None
    fields: dict[str, Any] = {
        "tenant_id": tenant.pk if tenant is not None else None,
        "model": model,
        "rule": rule,
        "arms": list(arms),
        "status": status,
        "description": description,
        "auto_promote": auto_promote,
        "metric": metric,
        "min_samples": min_samples,
        "significance": significance,
        "winner": winner,
    }
    stored = Experiment.objects.select_for_update().filter(slug=slug).first()
    if stored is None:
        experiment = Experiment(slug=slug, **fields)
        changes: audit.Changes | None = None
    else:
        experiment = stored
        changes = audit.diff(stored, fields)
        if not changes:
            return stored, changes
        for key, value in fields.items():
            setattr(experiment, key, value)
    if experiment.status == Experiment.Status.PROMOTED and experiment.promoted_at is None:
        experiment.promoted_at = timezone.now()
    experiment.full_clean()
    experiment.save()
    action = "experiment.create" if changes is None else "experiment.update"
    audit.record(
        action, tenant=tenant, target=slug, changes=changes, actor=actor, actor_label=actor_label, source=source
    )
    invalidation.announce_on_commit()
    return experiment, changes


@transaction.atomic
def experiment_delete(
    experiment: Experiment, *, actor: AbstractBaseUser | None = None, actor_label: str = "", source: str = ""
) -> None:
    slug, tenant = experiment.slug, experiment.tenant
    experiment.delete()
    audit.record("experiment.delete", tenant=tenant, target=slug, actor=actor, actor_label=actor_label, source=source)
    invalidation.announce_on_commit()


@transaction.atomic
def experiment_promote(
    experiment: Experiment,
    *,
    arm: str,
    reason: str = "",
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
) -> Experiment:
    """Send every request of the experiment to ``arm`` from now on (audited)."""
    locked = Experiment.objects.select_for_update().get(pk=experiment.pk)
    if arm not in {a.name for a in parse_arms(locked.arms)}:
        raise ValidationError({"winner": f"no arm named {arm!r}"})
    changes = audit.diff(locked, {"status": Experiment.Status.PROMOTED, "winner": arm})
    locked.status, locked.winner, locked.promoted_at = Experiment.Status.PROMOTED, arm, timezone.now()
    locked.full_clean()
    locked.save(update_fields=["status", "winner", "promoted_at", "updated_at"])
    audit.record(
        "experiment.promote",
        tenant=locked.tenant,
        target=locked.slug,
        changes=changes,
        data={"winner": arm, "reason": reason},
        actor=actor,
        actor_label=actor_label,
    )
    invalidation.announce_on_commit()
    return locked


def experiment_report(experiment: Experiment) -> dict[str, Any]:
    """Per arm results from the ledger, and each arm against the first (the control)."""
    arms = [a.name for a in parse_arms(experiment.arms)]
    samples = results.load_samples(experiment.slug, arms)
    ordered = [samples[name] for name in arms] + [s for name, s in samples.items() if name not in arms]
    report: dict[str, Any] = {
        "id": experiment.slug,
        "status": experiment.status,
        "applies_to": {"model": experiment.model} if experiment.model else {"rule": experiment.rule},
        "alpha": experiment.significance,
        "confidence": round(1 - experiment.significance, 6),
        "arms": [{**results.summarize(s), "target": _target(experiment, s.name)} for s in ordered],
        "comparisons": [c.as_dict() for c in results.compare(ordered[: len(arms)], experiment.significance)],
    }
    if experiment.winner:
        report["winner"] = experiment.winner
    if experiment.auto_promote:
        candidate, reason = results.winner(
            ordered[: len(arms)], experiment.metric, experiment.min_samples, experiment.significance
        )
        report["auto_promote"] = {
            "metric": experiment.metric,
            "min_samples": experiment.min_samples,
            "candidate": candidate,
            "reason": reason,
        }
    return report


def _target(experiment: Experiment, arm: str) -> str | None:
    return next((a.target for a in parse_arms(experiment.arms) if a.name == arm), None)


def experiments_auto_promote() -> list[tuple[str, str]]:
    """Promote the winner of every running experiment with auto-promotion once the ledger shows it.

    Returns the (experiment, winner) pairs promoted. Idempotent: a promoted experiment is no longer
    running, so two schedulers running this at once promote it once (the row is locked)."""
    promoted: list[tuple[str, str]] = []
    for experiment in Experiment.objects.filter(status=Experiment.Status.RUNNING, auto_promote=True).order_by("slug"):
        try:
            arms = [a.name for a in parse_arms(experiment.arms)]
        except ExperimentError:
            continue
        samples = results.load_samples(experiment.slug, arms)
        arm, reason = results.winner(
            [samples[n] for n in arms], experiment.metric, experiment.min_samples, experiment.significance
        )
        if arm is None:
            continue
        with transaction.atomic():
            still = Experiment.objects.select_for_update().filter(pk=experiment.pk, status="running").first()
            if still is None:
                continue
            experiment_promote(still, arm=arm, reason=reason, actor_label="auto-promotion")
        promoted.append((experiment.slug, arm))
    return promoted
