"""The key cache of the authenticate stage (gateway/auth.py): a key verified once is recognised
by a constant-time comparison until its cached entry changes; nothing else gets through that way."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from core import invalidation, runtime
from gateway import auth
from gateway.errors import AuthenticationFailed
from tenants import keys


def _authenticate(token: str) -> Any:
    async def main() -> Any:
        try:
            return await auth.authenticate(token)
        finally:
            await runtime.close_redis()

    return asyncio.run(main())


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    calls = {"verify": 0, "format": 0}
    verify, looks_valid = keys.verify_key, keys.looks_valid

    def counting_verify(token: str, hashed: str) -> bool:
        calls["verify"] += 1
        return verify(token, hashed)

    def counting_format(token: str) -> bool:
        calls["format"] += 1
        return looks_valid(token)

    monkeypatch.setattr(keys, "verify_key", counting_verify)
    monkeypatch.setattr(keys, "looks_valid", counting_format)
    auth.invalidate()
    return calls


def _recognised(token: str, calls: dict[str, int], times: int = 4) -> int:
    """How many of ``times`` authentications of ``token`` did not verify it again. A configuration
    change announced by another test's gateway may land meanwhile (it drops the cache, and the key
    is verified once more), so callers ask for most, not all."""
    recognised = 0
    for _ in range(times):
        before = calls["verify"]
        _authenticate(token)
        recognised += calls["verify"] == before
    return recognised


@pytest.mark.django_db(transaction=True)
def test_a_key_is_verified_once_then_recognised(tenant_key, counted) -> None:
    tenant, token = tenant_key
    first = _authenticate(token)
    assert first.tenant.id == tenant.id
    assert counted == {"verify": 1, "format": 1}
    assert _recognised(token, counted) >= 3  # no checksum, no HMAC (every time, unless a change lands)


@pytest.mark.django_db(transaction=True)
def test_another_token_with_the_same_prefix_is_still_checked_and_refused(tenant_key, counted) -> None:
    _, token = tenant_key
    _authenticate(token)
    body = token[: -keys._CHECK_LEN]
    body = body[:-1] + ("A" if body[-1] != "A" else "B")  # another secret under the same prefix
    forged = body + keys._checksum(body)  # well formed: only the HMAC can tell
    assert keys.key_prefix(forged) == keys.key_prefix(token)
    before = dict(counted)
    with pytest.raises(AuthenticationFailed):
        _authenticate(forged)
    assert counted["format"] == before["format"] + 1  # checked in full, not recognised
    assert counted["verify"] == before["verify"] + 1
    assert _recognised(token, counted) >= 3  # the real key is still recognised


@pytest.mark.django_db(transaction=True)
def test_a_change_makes_the_key_verified_again(tenant_key, counted) -> None:
    _, token = tenant_key
    _authenticate(token)
    invalidation.drop_local()  # what a revocation, a tenant change or a TTL expiry leads to
    _authenticate(token)
    assert counted == {"verify": 2, "format": 2}
