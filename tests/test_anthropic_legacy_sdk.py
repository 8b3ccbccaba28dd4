"""The pinned anthropic 0.x SDK (X-Api-Key auth, anthropic-version 2023-06-01) against the gateway.

It lives in .venv/anthropic-legacy (``scripts/install_anthropic_legacy.sh``, run by
``make install-dev``) and runs in a subprocess so it never meets the 2.x SDK in one interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import anthropic_support as support

fake_anthropic_server = support.fake_anthropic_server
anthropic_upstream = support.anthropic_upstream
openai_backed_claude = support.openai_backed_claude

ROOT = Path(__file__).resolve().parent.parent
LEGACY = ROOT / ".venv" / "anthropic-legacy"
LEGACY_VERSION = "0.69.0"


def drive(base_url: str, key: str, model: str = "claude-sonnet-4") -> dict[str, Any]:
    if not (LEGACY / ".version").exists() or (LEGACY / ".version").read_text().strip() != LEGACY_VERSION:
        pytest.fail(f"anthropic {LEGACY_VERSION} is not installed: run `bash scripts/install_anthropic_legacy.sh`")
    env = {**os.environ, "PYTHONPATH": str(LEGACY)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sdk_legacy" / "drive_messages.py"), base_url, key, model],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    assert result["version"] == LEGACY_VERSION
    return result


def _check_common(result: dict[str, Any], text: str) -> None:
    assert result["create"]["text"] == text and result["create"]["stop"] == "end_turn"
    assert result["stream"]["text"] == text and result["stream"]["final_text"] == text
    assert result["stream"]["stop"] == "end_turn"
    assert result["tools"]["stop"] == "tool_use"
    assert result["not_found"]["status"] == 404
    assert result["not_found"]["body"]["error"]["type"] == "not_found_error"


def test_legacy_sdk_against_an_anthropic_upstream(anthropic_upstream, gateway_server, tenant_key):
    result = drive(gateway_server.url, tenant_key[1])
    _check_common(result, "Hello from the fake Anthropic!")
    assert result["stream"]["usage"]["input_tokens"] == 10 and result["stream"]["usage"]["output_tokens"] == 7
    tool_uses = [b for b in result["tools"]["blocks"] if b["type"] == "tool_use"]
    assert [b["input"] for b in tool_uses] == [{"city": "Paris", "n": 0}]
    sent = [r for r in anthropic_upstream.requests if r.path == "/v1/messages"]
    assert all(r.headers["anthropic-version"] == "2023-06-01" for r in sent)  # the client's, forwarded


def test_legacy_sdk_against_an_openai_upstream(openai_backed_claude, gateway_server, tenant_key):
    result = drive(gateway_server.url, tenant_key[1])
    _check_common(result, "Hello from the fake upstream!")
    assert result["stream"]["usage"]["input_tokens"] == 10 and result["stream"]["usage"]["output_tokens"] == 7
    [tool_use] = result["tools"]["blocks"]
    assert tool_use["type"] == "tool_use" and tool_use["input"] == {"city": "Paris", "n": 0}
