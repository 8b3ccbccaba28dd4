"""Money: token counts, prices and the one rounding rule.

Prices are Decimal USD per million tokens, amounts are integer micro-USD. A request's cost is
computed exactly in Decimal and rounded half-up to a whole micro-dollar once, here and nowhere
else.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any


@dataclass(slots=True)
class Usage:
    """Token counts the OpenAI way: ``prompt_tokens`` includes cached and cache-write tokens."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    source: str = "upstream"  # upstream | estimated | cache
    # Units priced per item rather than per token (images, audio, moderations: docs/media.md).
    images: int = 0
    image_variant: str = ""  # "size/quality", "size", "" (the default price) or "*" (the dearest)
    audio_ms: int = 0  # milliseconds of audio transcribed
    characters: int = 0  # characters of text spoken (text to speech)

    @classmethod
    def from_openai(cls, usage: dict[str, Any] | None) -> Usage | None:
        if not usage:
            return None
        prompt_details = usage.get("prompt_tokens_details") or {}
        completion_details = usage.get("completion_tokens_details") or {}
        return cls(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            cached_tokens=int(prompt_details.get("cached_tokens") or 0),
            cache_write_tokens=int(prompt_details.get("cache_write_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
        )

    def to_openai(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }


@dataclass(frozen=True, slots=True)
class PriceInfo:
    effective_from: datetime
    input_per_mtok: Decimal
    cached_input_per_mtok: Decimal
    cache_write_per_mtok: Decimal
    output_per_mtok: Decimal
    # Prices per unit (docs/media.md); zero where the model has none. Keyword-only.
    _: KW_ONLY
    per_image: Decimal = Decimal(0)  # USD per image, when no size/quality entry matches
    image_prices: tuple[tuple[str, Decimal], ...] = ()  # ("1024x1024/hd", USD) or ("1024x1024", USD)
    audio_per_minute: Decimal = Decimal(0)  # USD per minute of audio transcribed
    per_mchars: Decimal = Decimal(0)  # USD per million characters spoken

    def image_price(self, variant: str) -> Decimal:
        """USD per image of a ``size/quality`` variant: that entry, else the size's, else the default.
        The worst cases, when the model picks: ``size/*`` is the size's dearest quality, ``*`` the
        dearest of them all."""
        table = dict(self.image_prices)
        if variant == "*":
            return max([self.per_image, *table.values()])
        size, _, quality = variant.partition("/")
        if quality == "*":  # the size's dearest quality
            found = [v for k, v in table.items() if k == size or k.startswith(f"{size}/")]
            return max(found) if found else self.per_image
        for key in (variant, size):
            if key and key in table:
                return table[key]
        return self.per_image


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
    return to_micro(exact + _units_micro(price, usage))


_MICRO = Decimal(1_000_000)


def _units_micro(price: PriceInfo, usage: Usage) -> Decimal:
    """The exact micro-USD of what is priced per unit: images, audio minutes, characters."""
    amount = Decimal(0)
    if usage.images:
        amount += price.image_price(usage.image_variant) * usage.images * _MICRO
    if usage.audio_ms:
        amount += price.audio_per_minute * usage.audio_ms * _MICRO / 60_000
    if usage.characters:
        amount += price.per_mchars * usage.characters  # USD per million characters = micro-USD each
    return amount


def worst_case_micro(price: PriceInfo | None, prompt_tokens: int, max_output_tokens: int) -> int:
    """The most a request can cost: every input token at the highest input rate, every output token."""
    if price is None:
        return 0
    input_rate = max(price.input_per_mtok, price.cache_write_per_mtok, price.cached_input_per_mtok)
    return to_micro(input_rate * prompt_tokens + price.output_per_mtok * max_output_tokens)


def format_usd(micro: int) -> str:
    return f"{Decimal(micro) / Decimal(1_000_000):.6f}"


def format_usd_short(micro: int) -> str:
    """USD for people: exact to the micro-dollar, at least two decimals, no trailing zeros beyond
    them (``500.00``, ``0.001``, ``12.345678``)."""
    text = format_usd(micro).rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"
