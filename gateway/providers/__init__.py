"""Provider adapters by kind. Dotted paths keep imports lazy and the list greppable."""

from __future__ import annotations

import functools

from django.utils.module_loading import import_string

from gateway.providers.base import Provider, ProviderConfig, UpstreamCall

__all__ = ["REGISTRY", "Provider", "ProviderConfig", "UpstreamCall", "get_provider"]

REGISTRY: dict[str, str] = {
    "openai": "gateway.providers.openai.OpenAIProvider",
    "anthropic": "gateway.providers.anthropic.AnthropicProvider",
    "ollama": "gateway.providers.ollama.OllamaProvider",
    "mock": "gateway.providers.mock.MockProvider",
}


@functools.cache
def get_provider(kind: str) -> Provider:
    try:
        path = REGISTRY[kind]
    except KeyError:
        raise LookupError(f"no provider of kind {kind!r}; known: {', '.join(sorted(REGISTRY))}") from None
    cls = import_string(path)
    return cls()  # type: ignore[no-any-return]
