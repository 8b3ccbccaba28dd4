"""Offline token counting with tiktoken.

The BPE files are installed by ``scripts/fetch_tokenizers.py`` (``make install``) into
``gateway/tokenizers/``; ``TIKTOKEN_CACHE_DIR`` points there before tiktoken is imported, so
nothing is downloaded at run time. Counts are exact for OpenAI models and estimates for others
(Claude, Llama, ...): use them for reservations and for usage an upstream did not report.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizers"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TOKENIZER_DIR))

import orjson  # noqa: E402
import tiktoken  # noqa: E402  (must follow TIKTOKEN_CACHE_DIR)

log = logging.getLogger(__name__)

# Chat formatting overhead per the OpenAI cookbook: about 3 tokens a message, 3 to prime the reply.
TOKENS_PER_MESSAGE = 3
TOKENS_REPLY_PRIMING = 3
_CL100K_PREFIXES = ("gpt-3.5", "gpt-4-", "text-embedding-3", "text-embedding-ada")
_FILES = {
    "o200k_base": "fb374d419588a4632f3f557e76b4b70aebbca790",
    "cl100k_base": "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
}


def encoding_name_for(model: str) -> str:
    name = model.lower()
    if name == "gpt-4" or name.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return "o200k_base"


@functools.cache
def _encoding(name: str) -> tiktoken.Encoding | None:
    if not (TOKENIZER_DIR / _FILES[name]).exists():
        log.error("tokenizer %s is not installed (run make install); estimating from characters", name)
        return None
    encoding = tiktoken.get_encoding(name)
    # tiktoken keeps a Python copy of the rank table (200k entries, ~21 MiB) only to pickle the
    # encoding; the Rust core holds its own. Counting never needs it.
    encoding._mergeable_ranks = {}
    return encoding


def preload() -> None:
    """Load the default encoding now (the ASGI module calls this first thing).

    Loading briefly needs twice the table's memory; done before Django is imported, the freed half
    is reused by everything imported after it, so a gateway's peak memory is ~30 MiB lower than
    when the first request loads it (which also costs that request ~0.3 s).
    """
    _encoding("o200k_base")


def count_text(text: str, model: str = "") -> int:
    if not text:
        return 0
    enc = _encoding(encoding_name_for(model))
    if enc is None:
        return max(1, len(text) // 4)
    return len(enc.encode(text, disallowed_special=()))


#: Tokens counted for each non-text part (image, audio, file): a low-detail image tile costs 85.
MEDIA_PART_TOKENS = 85
_MEDIA_TYPES = frozenset({"image_url", "image", "input_audio", "file", "document"})


def _content_text(content: Any) -> tuple[str, int]:
    """The text of a message's content, and how many media parts it has."""
    if isinstance(content, str):
        return content, 0
    if isinstance(content, list):
        parts = []
        media = 0
        for part in content:
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif part.get("type") in _MEDIA_TYPES:
                    media += 1
        return "\n".join(parts), media
    return "", 0


def count_messages(messages: list[Any], model: str = "", tools: list[Any] | None = None) -> int:
    """Prompt tokens for a chat request (an estimate for non-OpenAI models)."""
    total = TOKENS_REPLY_PRIMING
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE
        text, media = _content_text(message.get("content"))
        total += count_text(text, model) + media * MEDIA_PART_TOKENS
        for call in message.get("tool_calls") or []:
            fn = (call.get("function") or {}) if isinstance(call, dict) else {}
            total += count_text(str(fn.get("name", "")) + str(fn.get("arguments", "")), model)
    if tools:
        total += count_text(orjson.dumps(tools).decode(), model)
    return total
