"""``multipart/form-data`` request bodies (the transcription's audio, an image edit's pictures).

Parsed exactly (files are bytes as sent, never re-encoded): text fields become strings, files
``Upload`` values; a field sent more than once (``image[]``) becomes a list.
"""

from __future__ import annotations

from email.message import Message
from typing import Any

from gateway.errors import InvalidRequest
from gateway.providers.base import Upload

MAX_PARTS = 64


def _params(header: str) -> Message:
    message = Message()
    message["content-disposition"] = header
    return message


def boundary_of(content_type: str) -> str:
    """The boundary of a ``multipart/form-data`` content type; a 400 for anything else."""
    message = Message()
    message["content-type"] = content_type
    if message.get_content_type() != "multipart/form-data":
        raise InvalidRequest(
            "This endpoint takes a multipart/form-data body (as the OpenAI SDKs send it).", code="invalid_content_type"
        )
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise InvalidRequest("The multipart/form-data body has no boundary.", code="invalid_multipart")
    return boundary


def parse(body: bytes, content_type: str) -> dict[str, Any]:
    """The form's fields (str, or ``Upload`` for files; a list when a name repeats or ends in ``[]``,
    kept under the name without the brackets)."""
    delimiter = b"\r\n--" + boundary_of(content_type).encode("latin-1")
    sections = (b"\r\n" + body).split(delimiter)
    if len(sections) < 3 or not sections[-1].startswith(b"--"):
        raise InvalidRequest(
            "The multipart/form-data body is malformed (no closing boundary).", code="invalid_multipart"
        )
    if len(sections) - 2 > MAX_PARTS:
        raise InvalidRequest(f"The form has more than {MAX_PARTS} parts.", code="invalid_multipart")
    form: dict[str, Any] = {}
    for section in sections[1:-1]:
        head, sep, data = section.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            raise InvalidRequest("A part of the multipart body has no header end.", code="invalid_multipart")
        headers: dict[str, str] = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, colon, text = line.partition(":")
            if colon:
                headers[name.strip().lower()] = text.strip()
        disposition = _params(headers.get("content-disposition", ""))
        field = disposition.get_param("name", header="content-disposition")
        if not isinstance(field, str) or not field:
            raise InvalidRequest("A part of the multipart body has no field name.", code="invalid_multipart")
        filename = disposition.get_param("filename", header="content-disposition")
        value: Any
        if isinstance(filename, str):
            value = Upload(
                filename=filename, content_type=headers.get("content-type", "application/octet-stream"), data=data
            )
        else:
            try:
                value = data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"{field}: must be UTF-8 text", param=field) from None
        if field.endswith("[]"):  # an array field (image[], timestamp_granularities[])
            field = field[:-2]
            previous = form.get(field)
            form[field] = [*(previous if isinstance(previous, list) else [] if previous is None else [previous]), value]
        elif field in form:
            previous = form[field]
            form[field] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            form[field] = value
    return form
