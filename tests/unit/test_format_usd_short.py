"""Money for people: exact to the micro-dollar, at least cents, no trailing zeros past them."""

from __future__ import annotations

import pytest

from core.money import format_usd_short


@pytest.mark.parametrize(
    ("micro", "text"),
    [
        (0, "0.00"),
        (1_000, "0.001"),
        (1, "0.000001"),
        (250, "0.00025"),
        (500_000_000, "500.00"),
        (12_345_678, "12.345678"),
        (10_000, "0.01"),
        (1_500_000, "1.50"),
    ],
)
def test_format_usd_short(micro: int, text: str) -> None:
    assert format_usd_short(micro) == text
