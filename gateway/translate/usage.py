"""Token usage both ways.

OpenAI's ``prompt_tokens`` includes cached tokens (and ``cache_write_tokens``); Anthropic's
``input_tokens`` excludes both cache reads and cache writes. Total input is always
``input_tokens + cache_read_input_tokens + cache_creation_input_tokens``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.money import Usage


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def anthropic_to_openai(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """An Anthropic ``usage`` object as an OpenAI ``usage`` object (cache writes kept separately)."""
    usage = usage or {}
    fresh = _int(usage.get("input_tokens"))
    read = _int(usage.get("cache_read_input_tokens"))
    written = _int(usage.get("cache_creation_input_tokens"))
    output = _int(usage.get("output_tokens"))
    prompt = fresh + read + written
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": written, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def openai_to_anthropic(usage: Mapping[str, Any] | None) -> dict[str, int]:
    """An OpenAI ``usage`` object as Anthropic's four numbers."""
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    prompt = _int(usage.get("prompt_tokens"))
    read = min(_int(details.get("cached_tokens")), prompt)
    written = min(_int(details.get("cache_write_tokens")), prompt - read)
    return {
        "input_tokens": prompt - read - written,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": read,
        "output_tokens": _int(usage.get("completion_tokens")),
    }


def from_anthropic(usage: Mapping[str, Any] | None) -> Usage:
    """The ledger's ``Usage`` (OpenAI convention) from an Anthropic ``usage`` object."""
    usage = usage or {}
    read = _int(usage.get("cache_read_input_tokens"))
    written = _int(usage.get("cache_creation_input_tokens"))
    return Usage(
        prompt_tokens=_int(usage.get("input_tokens")) + read + written,
        cached_tokens=read,
        cache_write_tokens=written,
        completion_tokens=_int(usage.get("output_tokens")),
    )
