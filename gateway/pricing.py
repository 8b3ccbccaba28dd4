"""Money: prices are Decimal USD per million tokens, amounts are integer micro-USD.

One rounding rule, here and nowhere else: a request's cost is computed exactly in Decimal and
rounded half-up to a whole micro-dollar once.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from gateway.context import Usage
from gateway.routing import PriceInfo

_MICRO_PER_USD_PER_MTOK = Decimal(1)  # (USD / 1e6 tokens) * tokens * 1e6 micro/USD = price * tokens


def to_micro(amount: Decimal) -> int:
    """Round an exact micro-USD amount half-up to an integer."""
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def cost_micro(price: PriceInfo | None, usage: Usage) -> int:
    """Cost of one request. ``prompt_tokens`` includes cache reads and writes (OpenAI convention)."""
    if price is None:
        return 0
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    written = min(usage.cache_write_tokens, usage.prompt_tokens - cached)
    fresh = usage.prompt_tokens - cached - written
    exact = (
        price.input_per_mtok * fresh
        + price.cached_input_per_mtok * cached
        + price.cache_write_per_mtok * written
        + price.output_per_mtok * usage.completion_tokens
    ) * _MICRO_PER_USD_PER_MTOK
    return to_micro(exact)


def worst_case_micro(price: PriceInfo | None, prompt_tokens: int, max_output_tokens: int) -> int:
    """The most a request can cost: every input token at the highest input rate, every output token."""
    if price is None:
        return 0
    input_rate = max(price.input_per_mtok, price.cache_write_per_mtok, price.cached_input_per_mtok)
    return to_micro(input_rate * prompt_tokens + price.output_per_mtok * max_output_tokens)


def format_usd(micro: int) -> str:
    return f"{Decimal(micro) / Decimal(1_000_000):.6f}"
