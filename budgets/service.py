"""The budget service: what the rest of the system asks of budgets.

- ``spend_status(budget)``: spend against one budget now (alerts, the API, the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from budgets import counters
from budgets.models import Budget
from budgets.periods import budget_counter, period_bounds
from budgets.spend import ledger_value

# --- spend against one budget ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpendStatus:
    budget_id: int
    counter: str
    period_start: datetime | None
    period_end: datetime | None
    limit_micro: int
    hard: bool
    spent_micro: int  # settled spend in the ledger for the current period
    reserved_micro: int  # live counter minus ledger: open reservations and rows not yet written (>= 0)

    @property
    def remaining_micro(self) -> int:
        return max(0, self.limit_micro - self.spent_micro - self.reserved_micro)

    @property
    def percent(self) -> float:
        return 100.0 * self.spent_micro / self.limit_micro if self.limit_micro else 100.0


def spend_status(budget: Budget, when: datetime | None = None) -> SpendStatus:
    """Current spend against a budget (for alerts, the API and the dashboard). Synchronous.

    ``spent_micro`` comes from the ledger (the truth); ``reserved_micro`` is what the live counter
    holds beyond it (in-flight requests), read from whichever counter store is active.
    """
    counter = budget_counter(budget, when)
    spent = ledger_value(counter)
    live = counters.peek_sync(counter)
    start, end = period_bounds(counter.period_key, counter.time_zone)
    return SpendStatus(
        budget_id=budget.pk,
        counter=counter.name,
        period_start=start,
        period_end=end,
        limit_micro=budget.limit_micro,
        hard=budget.hard,
        spent_micro=spent,
        reserved_micro=max(0, (live if live is not None else spent) - spent),
    )
