"""Fixtures for the Anthropic tests: the fake Anthropic upstream, its provider and priced models.

Bind the fixtures you use in a test module (``anthropic_upstream = support.anthropic_upstream``);
pytest finds them there by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from tests.conftest import time_zero
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.server import ServerThread

#: claude-sonnet-4's price in these tests: input, cache read, cache write, output (USD per million).
CLAUDE_PRICES = ("3.00", "0.30", "3.75", "15.00")


def add_priced_model(
    name: str,
    provider: Any,
    *,
    upstream: str,
    prices: tuple[str, str, str, str] = CLAUDE_PRICES,
    aliases: list[str] | None = None,
    max_output_tokens: int = 1024,
) -> Any:
    """A chat model with all four prices set, cache writes included."""
    from gateway.models import Deployment, LLMModel, Price

    LLMModel.objects.filter(name=name).delete()  # the default price table ships a claude-sonnet-4
    model = LLMModel.objects.create(name=name, kind="chat", max_output_tokens=max_output_tokens, aliases=aliases or [])
    Deployment.objects.create(model=model, provider=provider, upstream_model=upstream)
    inp, cached, written, out = (Decimal(p) for p in prices)
    Price.objects.create(
        model=model,
        effective_from=time_zero(),
        input_per_mtok=inp,
        cached_input_per_mtok=cached,
        cache_write_per_mtok=written,
        output_per_mtok=out,
    )
    return model


@pytest.fixture(scope="session")
def fake_anthropic_server() -> Iterator[tuple[FakeAnthropic, ServerThread]]:
    app = FakeAnthropic()
    server = ServerThread(app, name="fake-anthropic").start()
    yield app, server
    server.stop()


@pytest.fixture
def anthropic_upstream(
    transactional_db: Any, fake_anthropic_server: tuple[FakeAnthropic, ServerThread]
) -> FakeAnthropic:
    """An ``anthropic`` provider pointing at the fake, serving ``claude-sonnet-4``."""
    from gateway.models import Provider

    app, server = fake_anthropic_server
    app.reset()
    provider = Provider(slug="fake-anthropic", kind="anthropic", base_url=server.url, max_retries=1)
    provider.api_key = "sk-ant-upstream-secret"
    provider.save()
    add_priced_model("claude-sonnet-4", provider, upstream="claude-sonnet-4-20250514")
    return app


@pytest.fixture
def openai_backed_claude(upstream: Any) -> Any:
    """``claude-sonnet-4`` as an alias of a model served by the OpenAI-compatible fake (Groq-style)."""
    from gateway.models import LLMModel, Provider

    LLMModel.objects.filter(name="claude-sonnet-4").delete()  # a real model name would win over the alias
    provider = Provider.objects.get(slug="fake-openai")
    add_priced_model("llama-3.3-70b", provider, upstream="llama-3.3-70b-versatile", aliases=["claude-sonnet-4"])
    return upstream


@pytest.fixture
def anthropic_client(gateway_server: ServerThread, tenant_key: tuple[Any, str]) -> Any:
    import anthropic

    return anthropic.Anthropic(base_url=gateway_server.url, api_key=tenant_key[1], max_retries=0)
