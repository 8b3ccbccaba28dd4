"""Drive the gateway's /v1/responses with the pinned openai 2.x SDK and print what it saw as JSON.

Run in a subprocess with ``PYTHONPATH=.venv/openai-legacy`` (see tests/test_openai_legacy_sdk.py),
so it never meets the 3.x SDK of the virtualenv in one interpreter.

    python tests/sdk_legacy/drive_responses.py BASE_URL API_KEY OTHER_TENANT_KEY MODEL
"""

from __future__ import annotations

import json
import sys
from typing import Any

import openai

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def main(base_url: str, api_key: str, other_key: str, model: str) -> dict[str, Any]:
    client: Any = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)  # typed by 3.x stubs
    other: Any = openai.OpenAI(base_url=base_url, api_key=other_key, max_retries=0)
    created = client.responses.create(model=model, input="Hi", instructions="Be brief.")
    events = list(client.responses.create(model=model, input="Hi", stream=True))
    with client.responses.stream(model=model, input="Hi") as stream:
        streamed = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    called = client.responses.create(model=model, input="Weather?", tools=[WEATHER])
    call = called.output[0]
    answered = client.responses.create(
        model=model,
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}],
        tools=[WEATHER],
    )
    retrieved = client.responses.retrieve(answered.id)
    items = client.responses.input_items.list(answered.id, order="asc")
    refused: dict[str, int | None] = {}
    for name, attempt in (
        ("retrieve", lambda: other.responses.retrieve(created.id)),
        ("previous", lambda: other.responses.create(model=model, input="x", previous_response_id=created.id)),
    ):
        try:
            attempt()
            refused[name] = None
        except openai.NotFoundError as exc:
            refused[name] = exc.status_code
    client.responses.delete(created.id)
    try:
        client.responses.retrieve(created.id)
        after_delete: int | None = None
    except openai.NotFoundError as exc:
        after_delete = exc.status_code
    return {
        "version": openai.__version__,
        "create": {"id": created.id, "text": created.output_text, "usage": created.usage.model_dump()},
        "events": [e.type for e in events],
        "sequence": [e.sequence_number for e in events],
        "stream": {"text": streamed, "final_text": final.output_text},
        "tools": {"call": call.model_dump(), "answer": answered.output_text, "previous": answered.previous_response_id},
        "retrieved": {"id": retrieved.id, "previous": retrieved.previous_response_id},
        "input_items": [item.type for item in items.data],
        "refused": refused,
        "after_delete": after_delete,
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:5])))
