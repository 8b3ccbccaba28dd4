"""The pinned previous-generation openai SDK (2.x) against the gateway's Responses API.

It lives in .venv/openai-legacy (``scripts/install_openai_legacy.sh``, run by ``make install-dev``)
and runs in a subprocess so it never meets the 3.x SDK in one interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEGACY = ROOT / ".venv" / "openai-legacy"
LEGACY_VERSION = "2.54.0"


def drive(base_url: str, key: str, other_key: str, model: str) -> dict[str, Any]:
    if not (LEGACY / ".version").exists() or (LEGACY / ".version").read_text().strip() != LEGACY_VERSION:
        pytest.fail(f"openai {LEGACY_VERSION} is not installed: run `bash scripts/install_openai_legacy.sh`")
    env = {**os.environ, "PYTHONPATH": str(LEGACY)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sdk_legacy" / "drive_responses.py"), base_url, key, other_key, model],
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


@pytest.mark.parametrize("native", [False, True], ids=["translated", "native"])
def test_legacy_sdk_responses(upstream, gateway_server, tenant_key, make_tenant, make_key, native):
    from gateway import catalog
    from gateway.models import Provider

    if native:
        catalog.provider_update(Provider.objects.get(slug="fake-openai"), responses_api=True)
    other = make_key(make_tenant("globex"))
    result = drive(f"{gateway_server.url}/v1", tenant_key[1], other, "gpt-4o")
    text = "Hello from the fake upstream!"
    assert result["create"]["id"].startswith("resp_") and result["create"]["text"] == text
    assert result["create"]["usage"]["input_tokens"] == 20 and result["create"]["usage"]["output_tokens"] == 7
    assert result["events"][:2] == ["response.created", "response.in_progress"]
    assert result["events"][-1] == "response.completed" and result["sequence"] == list(range(len(result["events"])))
    assert result["stream"] == {"text": text, "final_text": text}
    assert result["tools"]["call"]["name"] == "get_weather" and result["tools"]["answer"] == text
    assert result["retrieved"]["previous"] == result["tools"]["previous"]
    assert result["input_items"] == ["message", "function_call", "function_call_output"]
    assert result["refused"] == {"retrieve": 404, "previous": 404} and result["after_delete"] == 404
    path = "/responses" if native else "/chat/completions"
    assert any(r.path.endswith(path) for r in upstream.requests)
