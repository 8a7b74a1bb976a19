"""Idempotency keys of writes that are not turns (facts, story events): taken first in the write's
transaction, so a second write under the key waits for the first to commit and then finds its ids.
Kept MLCHAT_WRITE_KEY_TTL_S: each new key taken deletes some of those past it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core.settings import settings
from db.models import WriteKey
from db.turns import IdempotencyConflict


class KeyReused(IdempotencyConflict):
    """The idempotency key was already used for a different request (a 409, as for a turn)."""


def fingerprint(body: Any) -> str:
    """A keyed request's hash: its JSON body with sorted keys, so a retry whose objects list their
    fields in another order is still the same request."""
    # surrogatepass: a lone surrogate (half an emoji a client cut) is the validation's to refuse,
    # naming its field, not this hash's to raise on (review: a 500 for POST /v1/batches)
    text = json.dumps(body, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def take_key(*, session: Session, tenant: str, kind: str, key: str, request_hash: str) -> list[int] | None:
    """Take the key for this transaction's write: None when it is new (record the ids with
    `record_ids` before committing), else the ids the first write under it stored. KeyReused when
    that write was another request."""
    for _ in range(2):  # the key found, then pruned before it was read: taken afresh
        taken = session.scalar(
            insert(WriteKey)
            .values(tenant=tenant, kind=kind, key=key, request_hash=request_hash, ids=[])
            .on_conflict_do_nothing()
            .returning(WriteKey.key)
        )
        if taken is not None:
            _prune_expired(session)
            return None
        found = stored_ids(session=session, tenant=tenant, kind=kind, key=key, request_hash=request_hash)
        if found is not None:
            return found
    raise RuntimeError(f"idempotency key {key!r}: neither taken nor found twice")


# Keys past MLCHAT_WRITE_KEY_TTL_S deleted with each new one taken: never more than the writes made.
PRUNED_PER_KEY = 100


_PRUNE_SQL = text(
    """
WITH doomed AS MATERIALIZED (
  SELECT tenant, kind, key FROM write_keys
  WHERE created_at < now() - make_interval(secs => :ttl_s)
  ORDER BY created_at
  LIMIT :n
  FOR UPDATE SKIP LOCKED
)
DELETE FROM write_keys w USING doomed d
WHERE w.tenant = d.tenant AND w.kind = d.kind AND w.key = d.key
"""
)


def _prune_expired(session: Session) -> None:
    """Delete up to PRUNED_PER_KEY keys past their time, the oldest first (their index), skipping
    any another transaction holds (this write never waits on one; a retry whose key is being pruned
    waits for this transaction, then takes the key afresh). Picked once (MATERIALIZED): a locking
    LIMIT subquery inside the DELETE could be run again per row."""
    session.execute(_PRUNE_SQL, {"ttl_s": settings.write_key_ttl_s, "n": PRUNED_PER_KEY})


def stored_ids(
    *, session: Session, tenant: str, kind: str, key: str, request_hash: str | None
) -> list[int] | None:
    """The ids a committed write under the key stored (None: no such write); KeyReused when that
    write was another request (a `request_hash` of None: whatever its request)."""
    found = session.execute(
        select(WriteKey.request_hash, WriteKey.ids).where(
            WriteKey.tenant == tenant, WriteKey.kind == kind, WriteKey.key == key
        )
    ).first()
    if found is None:
        return None
    if request_hash is not None and found[0] != request_hash:
        raise KeyReused(f"idempotency key {key!r} was already used for a different request")
    return list(found[1])


def record_ids(*, session: Session, tenant: str, kind: str, key: str, ids: Sequence[int]) -> None:
    """The ids the write under a key taken in this transaction stored."""
    session.execute(
        update(WriteKey)
        .where(WriteKey.tenant == tenant, WriteKey.kind == kind, WriteKey.key == key)
        .values(ids=list(ids))
    )
