"""Budget periods in the tenant's time zone (pure functions: no services)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from budgets import periods


def test_period_keys_roll_over_in_the_tenants_time_zone():
    # 23:30 UTC on 30 November is already 1 December in Berlin and still 30 November in New York.
    moment = datetime(2026, 11, 30, 23, 30, tzinfo=UTC)
    assert periods.period_key("day", "UTC", moment) == "d2026-11-30"
    assert periods.period_key("day", "Europe/Berlin", moment) == "d2026-12-01"
    assert periods.period_key("month", "Europe/Berlin", moment) == "m2026-12"
    assert periods.period_key("month", "America/New_York", moment) == "m2026-11"
    assert periods.period_key("total", "Asia/Tokyo", moment) == "total"
    # New Year in Tokyo while it is still the old year in UTC.
    assert periods.period_key("month", "Asia/Tokyo", datetime(2026, 12, 31, 15, 0, tzinfo=UTC)) == "m2027-01"
    assert periods.period_key("month", "UTC", datetime(2026, 12, 31, 15, 0, tzinfo=UTC)) == "m2026-12"


def test_period_bounds_are_local_midnights():
    start, end = periods.period_bounds("d2026-12-01", "Europe/Berlin")
    assert start == datetime(2026, 11, 30, 23, 0, tzinfo=UTC) and end == datetime(2026, 12, 1, 23, 0, tzinfo=UTC)
    start, end = periods.period_bounds("m2026-12", "America/New_York")
    assert start == datetime(2026, 12, 1, 5, 0, tzinfo=UTC) and end == datetime(2027, 1, 1, 5, 0, tzinfo=UTC)
    # A DST change inside the month: March in New York starts at UTC-5 and ends at UTC-4.
    start, end = periods.period_bounds("m2026-03", "America/New_York")
    assert start == datetime(2026, 3, 1, 5, 0, tzinfo=UTC) and end == datetime(2026, 4, 1, 4, 0, tzinfo=UTC)
    assert periods.period_bounds("total", "UTC") == (None, None)


def test_period_keys_change_at_the_local_midnight_to_the_second():
    # Keys are computed once per UTC minute: the boundary must still fall exactly at local midnight,
    # also in zones whose offset is not a whole hour (India +5:30, Nepal +5:45).
    for zone, midnight in (
        ("Asia/Kolkata", datetime(2026, 11, 30, 18, 30, tzinfo=UTC)),
        ("Asia/Kathmandu", datetime(2026, 11, 30, 18, 15, tzinfo=UTC)),
    ):
        before = midnight.replace(second=0) - timedelta(seconds=1)
        assert periods.period_key("day", zone, before) == "d2026-11-30"
        assert periods.period_key("day", zone, midnight) == "d2026-12-01"
        assert periods.period_key("month", zone, before) == "m2026-11"
        assert periods.period_key("month", zone, midnight + timedelta(seconds=59)) == "m2026-12"
    try:
        periods.period_key("week", "UTC", datetime(2026, 1, 1, tzinfo=UTC))
    except ValueError as exc:
        assert "week" in str(exc)
    else:
        raise AssertionError("an unknown period must be refused")
