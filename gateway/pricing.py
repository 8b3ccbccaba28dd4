"""The price table as ``PriceInfo`` for readers off the request path (the hot path reads prices
from the route table). The ledger prices cache hits with it: see ``GatewayConfig.ready``."""

from __future__ import annotations

from core.money import PriceInfo
from gateway.models import LLMModel, Price
from gateway.routing.table import price_info


def price_history(name: str) -> tuple[PriceInfo, ...]:
    """The prices of a public model name or alias (active or not), newest first."""
    model = LLMModel.objects.filter(name=name).first() or next(
        (m for m in LLMModel.objects.all() if name in (m.aliases or [])), None
    )
    if model is None:
        return ()
    return tuple(price_info(p) for p in Price.objects.filter(model=model).order_by("-effective_from"))
