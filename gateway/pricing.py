"""The price table as ``PriceInfo`` for readers off the request path (the hot path reads prices
from the route table). The ledger prices cache hits with it: see ``GatewayConfig.ready``."""

from __future__ import annotations

from core.money import PriceInfo
from gateway.models import LLMModel, Price


def price_info(price: Price) -> PriceInfo:
    """A price row with the cache prices filled in (empty means the input price)."""
    return PriceInfo(
        effective_from=price.effective_from,
        input_per_mtok=price.input_per_mtok,
        cached_input_per_mtok=price.cached_input_per_mtok
        if price.cached_input_per_mtok is not None
        else price.input_per_mtok,
        cache_write_per_mtok=price.cache_write_per_mtok
        if price.cache_write_per_mtok is not None
        else price.input_per_mtok,
        output_per_mtok=price.output_per_mtok,
    )


def price_history(name: str) -> tuple[PriceInfo, ...]:
    """The prices of a public model name or alias (active or not), newest first."""
    model = LLMModel.objects.filter(name=name).first() or next(
        (m for m in LLMModel.objects.all() if name in (m.aliases or [])), None
    )
    if model is None:
        return ()
    return tuple(price_info(p) for p in Price.objects.filter(model=model).order_by("-effective_from"))
