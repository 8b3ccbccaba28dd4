"""Offline token counting: the BPE files ship with the install, nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gateway import tokens

ROOT = Path(__file__).resolve().parents[2]


def offline_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter whose every HTTP(S) request goes to a dead proxy."""
    clean = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR" and not k.lower().endswith("_proxy")}
    clean.update(
        HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", **env
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60)


def test_encodings_load_with_no_network():
    code = (
        "from gateway import tokens\n"
        "import tiktoken\n"
        "print(tiktoken.get_encoding('o200k_base').encode('tiktoken is great!'))\n"
        "print(tiktoken.get_encoding('cl100k_base').encode('tiktoken is great!'))\n"
    )
    result = offline_python(code)
    assert result.returncode == 0, result.stderr
    # The published token ids for this string (OpenAI cookbook), per encoding.
    assert result.stdout.splitlines() == ["[83, 8251, 2488, 382, 2212, 0]", "[83, 1609, 5963, 374, 2294, 0]"]


def test_without_the_bundled_files_tiktoken_would_need_the_network(tmp_path):
    """The control: the same call with an empty cache directory fails (it tries to download)."""
    code = "import tiktoken\ntiktoken.get_encoding('o200k_base')\n"
    result = offline_python(code, TIKTOKEN_CACHE_DIR=str(tmp_path))
    assert result.returncode != 0


def test_known_counts():
    assert tokens.count_text("") == 0
    assert tokens.count_text("hello world", "gpt-4o") == 2
    assert tokens.count_text("Say hello in 3 words.", "gpt-4o") == 7
    assert tokens.count_text("tiktoken is great!", "gpt-4o") == 6
    # Special-token text is counted as text, never refused.
    assert tokens.count_text("<|endoftext|>", "gpt-4o") > 1


def test_encoding_per_model():
    assert tokens.encoding_name_for("gpt-4o") == "o200k_base"
    assert tokens.encoding_name_for("o3-mini") == "o200k_base"
    assert tokens.encoding_name_for("gpt-4") == "cl100k_base"
    assert tokens.encoding_name_for("gpt-3.5-turbo") == "cl100k_base"
    assert tokens.encoding_name_for("text-embedding-3-small") == "cl100k_base"
    # Non-OpenAI models get an estimate from o200k_base rather than an error.
    assert tokens.encoding_name_for("claude-sonnet-4") == "o200k_base"
    assert tokens.count_text("hello world", "llama-3-70b") == 2


def test_message_counts_include_formatting_overhead():
    messages = [{"role": "system", "content": "hello world"}, {"role": "user", "content": "Say hello in 3 words."}]
    # 3 to prime the reply + 3 per message + the text
    assert tokens.count_messages(messages, "gpt-4o") == 3 + (3 + 2) + (3 + 7)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]
    assert tokens.count_messages(parts, "gpt-4o") == 3 + 3 + 2
    with_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    assert tokens.count_messages(with_image, "gpt-4o") == 3 + 3 + tokens.MEDIA_PART_TOKENS  # an image is not free
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert tokens.count_messages(parts, "gpt-4o", tools) > tokens.count_messages(parts, "gpt-4o")
