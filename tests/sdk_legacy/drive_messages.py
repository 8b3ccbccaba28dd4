"""Drive the gateway's /v1/messages with the pinned anthropic 0.x SDK and print what it saw as JSON.

Run in a subprocess with ``PYTHONPATH=.venv/anthropic-legacy`` (see tests/test_anthropic_legacy_sdk.py):
that SDK generation sends the key as ``X-Api-Key`` and ``anthropic-version: 2023-06-01``.

    python tests/sdk_legacy/drive_messages.py BASE_URL API_KEY MODEL
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anthropic

WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
HI: Any = [{"role": "user", "content": "Hi"}]


def main(base_url: str, api_key: str, model: str) -> dict[str, Any]:
    client: Any = anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0)  # typed by 2.x stubs
    created = client.messages.create(model=model, max_tokens=100, messages=HI)
    with client.messages.stream(model=model, max_tokens=100, messages=HI) as stream:
        streamed_text = "".join(stream.text_stream)
        final = stream.get_final_message()
    with client.messages.stream(model=model, max_tokens=100, messages=HI, tools=[WEATHER]) as stream:
        tool_final = stream.get_final_message()
    try:
        client.messages.create(model="no-such-model", max_tokens=10, messages=HI)
        not_found = None
    except anthropic.NotFoundError as exc:
        not_found = {"status": exc.status_code, "body": exc.body}
    return {
        "version": anthropic.__version__,
        "create": {"text": created.content[0].text, "stop": created.stop_reason, "usage": created.usage.model_dump()},
        "stream": {
            "text": streamed_text,
            "final_text": final.content[0].text,
            "stop": final.stop_reason,
            "usage": final.usage.model_dump(),
        },
        "tools": {"stop": tool_final.stop_reason, "blocks": [b.model_dump() for b in tool_final.content]},
        "not_found": not_found,
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
