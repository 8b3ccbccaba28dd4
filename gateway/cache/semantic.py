"""The semantic response cache: a cached answer served to a *similar* prompt (opt-in per model).

For a model with the semantic cache on (and the exact cache on: a semantic hit replays an exact
cache entry), a request the exact cache misses has its prompt (the text of its messages, or its
``prompt``, canonicalised: ``role: text`` lines, whitespace collapsed, NFC) embedded through one of
the gateway's own embedding models. The embedding is a request of its own (``Embed``, supplied by
the pipeline): its own ledger row, endpoint ``embeddings``, the same tenant and key, budget
reserved and rate windows counted like any embeddings request.

The nearest stored prompt of the same tenant, public model and ``params_digest`` (the exact
cache key of the request with the prompt's text blanked: temperature, tools, roles, images ...)
is a hit when its cosine similarity reaches the model's threshold and its exact cache entry is
still there. A miss's answer, once the exact cache stored it, has its vector stored
(``SemanticVector``) until the entry expires.

Search, chosen once per process on first use:

- ``numpy`` (the default, and always on SQLite): the tenant+model+params rows (the newest
  ``CHITTYCAN_SEMANTIC_MAX_ROWS``) are read and compared in process;
- ``pgvector``: when PostgreSQL's ``vector`` extension is available (``CREATE EXTENSION vector``
  succeeds, ``CHITTYCAN_SEMANTIC_PGVECTOR`` not ``off``), the rows carry a ``vector`` column too
  and PostgreSQL finds the nearest with an HNSW index per dimension (docs/caching.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.utils import timezone
from pgvector import Vector

from gateway import cache as store
from gateway.models import SemanticVector

if TYPE_CHECKING:
    from gateway.context import RequestContext

log = logging.getLogger(__name__)

Json = dict[str, Any]

__all__ = [
    "ENDPOINTS",
    "Embed",
    "Probe",
    "backend",
    "find",
    "nearest",
    "prompt_and_params",
    "remember",
]

#: What the pipeline supplies: embed ``text`` with the public embedding ``model`` as a request of
#: the caller's key (metered); the vector, or None when the embedding request failed or was refused.
Embed = Callable[["RequestContext", str, str], Awaitable[list[float] | None]]

#: The routes whose prompts are embedded (an embeddings request is never semantically cached).
ENDPOINTS = frozenset({"chat", "completions", "messages"})

#: How many candidates above the threshold are tried (the nearest's entry may have expired).
_CANDIDATES = 3


@dataclass(slots=True)
class Probe:
    """A request's embedded prompt, kept on the context until its answer is stored."""

    vector: np.ndarray[Any, np.dtype[np.float32]]
    params_digest: str


# --- the prompt ---------------------------------------------------------------------------------------


def _canonical_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def _content(value: Any) -> tuple[str, Any]:
    """A message's text and its content with the text blanked (other parts, e.g. images, kept)."""
    if isinstance(value, str):
        return _canonical_text(value), ""
    if isinstance(value, list):
        texts: list[str] = []
        blanked: list[Any] = []
        for part in value:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
                blanked.append({**part, "text": ""})
            else:
                blanked.append(part)
        return _canonical_text(" ".join(texts)), blanked
    return "", value


def prompt_and_params(endpoint: str, body: Json) -> tuple[str, Json] | None:
    """The prompt's canonical text and the body with that text blanked; None if there is no text."""
    if endpoint not in ENDPOINTS:
        return None
    rest = dict(body)
    lines: list[str] = []
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            lines.append(_canonical_text(prompt))
        elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            lines.extend(_canonical_text(p) for p in prompt)
        else:
            return None  # token arrays: no text to compare
        rest["prompt"] = ""
    else:
        if endpoint == "messages" and "system" in body:
            text, rest["system"] = _content(body["system"])
            lines.append(f"system: {text}")
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        blanked = []
        for message in messages:
            if not isinstance(message, dict):
                return None
            text, content = _content(message.get("content"))
            lines.append(f"{message.get('role')}: {text}")
            blanked.append({**message, "content": content})
        rest["messages"] = blanked
    prompt_text = "\n".join(lines)
    return (prompt_text, rest) if prompt_text.strip() else None


def _unit(values: list[float]) -> np.ndarray[Any, np.dtype[np.float32]] | None:
    vector = np.asarray(values, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    if vector.ndim != 1 or not vector.size or not np.isfinite(norm) or norm == 0.0:
        return None
    unit: np.ndarray[Any, np.dtype[np.float32]] = vector / norm
    return unit


# --- the search backend -------------------------------------------------------------------------------

_backend: str | None = None
_backend_lock = threading.Lock()
_indexed_dims: set[int] = set()
_writes: set[asyncio.Task[None]] = set()  # vector writes under way (kept referenced until done)


def _detect() -> str:
    """``pgvector`` when PostgreSQL has (or can create) the ``vector`` extension, else ``numpy``."""
    if connection.vendor != "postgresql" or settings.CHITTYCAN_SEMANTIC_PGVECTOR == "off":
        return "numpy"
    table = SemanticVector._meta.db_table
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("CREATE EXTENSION IF NOT EXISTS vector")
            cursor.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS embedding vector")
    except DatabaseError as exc:
        log.info("semantic cache: pgvector not available (%s); searching in process", exc)
        return "numpy"
    return "pgvector"


def backend() -> str:
    """The search this process uses, decided on first use: ``pgvector`` or ``numpy``."""
    global _backend
    with _backend_lock:
        if _backend is None:
            _backend = _detect()
            log.info("semantic cache search: %s", _backend)
        return _backend


def _ensure_index(dims: int) -> None:
    """pgvector: an HNSW index (cosine) for the rows of one dimension (a vector index needs one)."""
    if dims in _indexed_dims:
        return
    table = SemanticVector._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS semanticvector_hnsw_{dims} ON {table} "
            f"USING hnsw ((embedding::vector({dims})) vector_cosine_ops) WHERE dims = {dims}"
        )
    _indexed_dims.add(dims)


# --- search and store ---------------------------------------------------------------------------------


def _nearest_numpy(
    tenant_id: int, model: str, params_digest: str, query: np.ndarray[Any, np.dtype[np.float32]], threshold: float
) -> list[tuple[str, float]]:
    rows = list(
        SemanticVector.objects.filter(
            tenant_id=tenant_id,
            model=model,
            params_digest=params_digest,
            dims=query.size,
            expires_at__gt=timezone.now(),
        )
        .order_by("-created_at")
        .values_list("cache_digest", "vector")[: settings.CHITTYCAN_SEMANTIC_MAX_ROWS]
    )
    if not rows:
        return []
    matrix = np.frombuffer(b"".join(bytes(v) for _, v in rows), dtype="<f4").reshape(len(rows), query.size)
    scores = matrix @ query
    order = np.argsort(-scores)[:_CANDIDATES]
    return [(rows[i][0], float(scores[i])) for i in order if float(scores[i]) >= threshold]


def _nearest_pgvector(
    tenant_id: int, model: str, params_digest: str, query: np.ndarray[Any, np.dtype[np.float32]], threshold: float
) -> list[tuple[str, float]]:
    dims = int(query.size)
    _ensure_index(dims)
    table = SemanticVector._meta.db_table
    literal = Vector(query.tolist()).to_text()
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT cache_digest, 1 - (embedding::vector({dims}) <=> %s::vector({dims})) AS similarity "
            f"FROM {table} WHERE dims = {dims} AND embedding IS NOT NULL "
            "AND tenant_id = %s AND model = %s AND params_digest = %s AND expires_at > %s "
            f"ORDER BY embedding::vector({dims}) <=> %s::vector({dims}) LIMIT {_CANDIDATES}",
            [literal, tenant_id, model, params_digest, timezone.now(), literal],
        )
        found = cursor.fetchall()
    return [(digest, float(similarity)) for digest, similarity in found if float(similarity) >= threshold]


def _nearest(
    tenant_id: int, model: str, params_digest: str, query: np.ndarray[Any, np.dtype[np.float32]], threshold: float
) -> list[tuple[str, float]]:
    if backend() == "pgvector":
        return _nearest_pgvector(tenant_id, model, params_digest, query, threshold)
    return _nearest_numpy(tenant_id, model, params_digest, query, threshold)


def _forget(tenant_id: int, model: str, cache_digest: str) -> None:
    SemanticVector.objects.filter(tenant_id=tenant_id, model=model, cache_digest=cache_digest).delete()


def _remember(tenant_id: int, model: str, cache_digest: str, probe: Probe, ttl: int) -> None:
    now = timezone.now()
    SemanticVector.objects.filter(tenant_id=tenant_id, model=model, expires_at__lte=now).delete()
    row, _ = SemanticVector.objects.update_or_create(
        tenant_id=tenant_id,
        model=model,
        cache_digest=cache_digest,
        defaults={
            "params_digest": probe.params_digest,
            "dims": probe.vector.size,
            "vector": probe.vector.astype("<f4").tobytes(),
            "created_at": now,
            "expires_at": now + timedelta(seconds=ttl),
        },
    )
    if backend() == "pgvector":
        _ensure_index(int(probe.vector.size))
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {SemanticVector._meta.db_table} SET embedding = %s::vector WHERE id = %s",
                [Vector(probe.vector.tolist()).to_text(), row.pk],
            )


async def nearest(
    tenant_id: int, model: str, params_digest: str, vector: np.ndarray[Any, np.dtype[np.float32]], threshold: float
) -> list[tuple[str, float]]:
    """The stored prompts nearest to ``vector`` at or above ``threshold``: (cache digest, similarity)."""
    return await sync_to_async(_nearest, thread_sensitive=False)(tenant_id, model, params_digest, vector, threshold)


async def find(
    ctx: RequestContext, tenant_id: int, space: str, embed: Embed, *, search: bool
) -> tuple[store.Entry | None, float]:
    """Embed the request's prompt (kept on ``ctx.semantic`` for ``remember``) and, if ``search``,
    the cached answer of the nearest similar prompt with its similarity; (None, 0.0) on a miss.

    Vectors are the tenant's; the answers are read from the caller's cache namespace ``space``
    (the tenant's, or narrower or wider as the operator scoped it, ``gateway.cache.space_for``)."""
    route = ctx.route
    assert route is not None
    split = prompt_and_params(ctx.endpoint, ctx.body)
    if split is None or not route.semantic_model:
        return None, 0.0
    text, params = split
    values = await embed(ctx, route.semantic_model, text)
    vector = _unit(values) if values is not None else None
    if vector is None:
        return None, 0.0
    probe = ctx.semantic = Probe(vector, store.request_digest(ctx.endpoint, route.name, params, ctx.upstream_headers))
    if not search:
        return None, 0.0
    try:
        candidates = await nearest(tenant_id, route.name, probe.params_digest, vector, route.semantic_threshold)
    except DatabaseError as exc:
        log.warning("semantic cache search failed: %s", exc, extra={"request_id": ctx.request_id})
        return None, 0.0
    for cache_digest, similarity in candidates:
        entry = await store.lookup(space, route.name, cache_digest)
        if entry is not None and entry.endpoint == ctx.endpoint:
            return entry, similarity
        if entry is None and space == str(tenant_id):  # expired, evicted or invalidated: its vector goes too
            await sync_to_async(_forget, thread_sensitive=False)(tenant_id, route.name, cache_digest)
    return None, 0.0


def remember(ctx: RequestContext, tenant_id: int) -> None:
    """Store, in the background, the embedded prompt of an answer the exact cache just stored
    (``ctx.cache_digest``). Not awaited by the request: its answer is already sent, and a client
    that then hangs up must neither cancel the write nor turn the request into a disconnect."""
    probe, ctx.semantic = ctx.semantic, None
    if probe is None or ctx.route is None or not ctx.cache_digest:
        return
    task = asyncio.get_running_loop().create_task(
        _store_vector(tenant_id, ctx.route.name, ctx.cache_digest, probe, ctx.cache_ttl, ctx.request_id)
    )
    _writes.add(task)
    task.add_done_callback(_writes.discard)


async def _store_vector(tenant_id: int, model: str, cache_digest: str, probe: Probe, ttl: int, request_id: str) -> None:
    try:
        await sync_to_async(_remember, thread_sensitive=False)(tenant_id, model, cache_digest, probe, ttl)
    except DatabaseError as exc:
        log.warning("semantic cache: vector not stored: %s", exc, extra={"request_id": request_id})
