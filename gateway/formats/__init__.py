"""Wire formats: what differs between the ``/v1`` routes, so the pipeline is written once.

A ``WireFormat`` knows how its route's body is checked, how many tokens it may bill, which
provider operation serves it, how its answer and its stream are read for usage and framed for the
client, and which error envelope it uses. ``gateway.pipeline.run`` takes one as a parameter.
"""

from __future__ import annotations

from gateway.formats.anthropic import MESSAGES
from gateway.formats.base import StreamTracker, WireFormat
from gateway.formats.media import IMAGE_EDITS, IMAGES, MODERATIONS, SPEECH, TRANSCRIPTIONS
from gateway.formats.openai import CHAT, COMPLETIONS, EMBEDDINGS
from gateway.formats.responses import RESPONSES

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "EMBEDDINGS",
    "IMAGES",
    "IMAGE_EDITS",
    "MESSAGES",
    "MODERATIONS",
    "RESPONSES",
    "SPEECH",
    "TRANSCRIPTIONS",
    "StreamTracker",
    "WireFormat",
]
