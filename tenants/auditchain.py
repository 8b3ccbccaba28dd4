"""The audit log's hash chain: a row's canonical serialisation and its hash.

Pure functions over a row's attributes (so the data migration that hashed the rows written before
the chain existed uses exactly the code the writer and ``can audit verify`` use).

``hash = sha256(prev_hash + "\\n" + canonical(row))``, where ``canonical`` is compact JSON with sorted
keys over the fields below. The tenant is hashed by id (tenants are never deleted); the actor by the
name it had when it acted (``actor_name``), since deleting a user sets ``actor`` to NULL.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from typing import Any, Final

__all__ = ["GENESIS", "HASHED_FIELDS", "canonical", "normalise", "row_hash"]

#: The ``prev_hash`` of the first row ever written.
GENESIS: Final = "0" * 64
VERSION: Final = 1

HASHED_FIELDS: Final = (
    "seq",
    "at",
    "action",
    "target",
    "tenant_id",
    "actor_name",
    "actor_label",
    "origin",
    "address",
    "user_agent",
    "os_user",
    "data",
    "prev_hash",
)


def normalise(value: Any) -> Any:
    """``value`` as it reads back from a JSON column (PostgreSQL ``jsonb`` or SQLite text): floats
    that JSON numerics would rewrite (``1e+20`` comes back as an integer) become strings."""
    if isinstance(value, dict):
        return {str(k): normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normalise(v) for v in value]
    if isinstance(value, float) and (not math.isfinite(value) or "e" in repr(value)):
        return repr(value)
    return value


def _at(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(row: Any) -> bytes:
    """The bytes a row's hash covers (``row`` is an ``AuditEvent``, historical or current)."""
    fields = {name: getattr(row, name) for name in HASHED_FIELDS}
    fields["at"] = _at(fields["at"])
    fields["v"] = VERSION
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def row_hash(row: Any) -> str:
    return hashlib.sha256(str(row.prev_hash).encode() + b"\n" + canonical(row)).hexdigest()
