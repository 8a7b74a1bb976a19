"""Stored files (batch input, output and error files): their rows; the bytes live on disk."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import String, delete, false, func, literal, literal_column, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.models import RUN_FINISHED, FileTombstone, Run, StoredFile
from db.params import any_of


def add_file(
    *,
    session: Session,
    file_id: str,
    purpose: str,
    filename: str,
    size: int,
    path: str,
    api_key: str | None,
    tenant: str,
    expires_after_s: int | None = None,
) -> StoredFile:
    # The database's clock at this insert, not the transaction's start: a batch's output is written
    # within a transaction that may have opened minutes before, and a file dated then would sort
    # behind files uploaded meanwhile, where a client paging from the newest it saw never finds it.
    row = StoredFile(
        id=file_id,
        purpose=purpose,
        filename=filename,
        bytes=size,
        path=path,
        api_key=api_key,
        tenant=tenant,
        created_at=func.clock_timestamp(),
    )
    if expires_after_s is not None:
        # Exact seconds, never calendar days (an hour off across a DST change: services/batches.py).
        row.expires_at = func.clock_timestamp() + func.make_interval(0, 0, 0, 0, 0, 0, expires_after_s)
    session.add(row)
    session.flush()
    return row


# Advisory locks are per database: the two-key form with a namespace keeps these apart from others.
_QUOTA_LOCK_NAMESPACE = 0x6D6C6671  # "mlfq"
_REWRITE_LOCK_NAMESPACE = 0x6D6C6677  # "mlfw"


def set_file_size(*, session: Session, file_id: str, size: int) -> str | None:
    """A rewritten file's new size; returns the row version this write made (its xmin), which names
    the rewrite once committed (`latest_rewrite`). None: no such file."""
    return session.scalar(
        update(StoredFile)
        .where(StoredFile.id == file_id)
        .values(bytes=size)
        .returning(literal_column("xmin::text"))
    )


def latest_rewrite(*, session: Session, file_id: str) -> str | None:
    """The row version of the file's last committed rewrite (set_file_size's answer), with the file's
    rewrites locked until the caller's transaction ends: whoever holds it may put its rewrite in place
    knowing no later one is being put there at once. None: the file is gone."""
    session.execute(select(func.pg_advisory_xact_lock(_REWRITE_LOCK_NAMESPACE, func.hashtext(file_id))))
    return session.scalar(
        select(literal_column("xmin::text")).select_from(StoredFile).where(StoredFile.id == file_id)
    )


def stored_bytes(*, session: Session, api_key: str | None, tenant: str) -> int:
    """The bytes of every file this key holds in its tenant (its uploads and its batches' output and
    error files): a name passed to another tenant's key is not charged for the first tenant's."""
    total = session.scalar(
        select(func.coalesce(func.sum(StoredFile.bytes), 0)).where(keyed_by(api_key), owned_in(tenant))
    )
    return int(total or 0)


def _lock_quota(session: Session, api_key: str | None, tenant: str) -> None:
    """The key's quota lock, until the transaction ends: its uploads and batch creations take turns."""
    owner = f"{tenant}/{api_key or ''}"  # a tenant holds no '/' (its settings pattern): unambiguous
    session.execute(select(func.pg_advisory_xact_lock(_QUOTA_LOCK_NAMESPACE, func.hashtext(owner))))


def quota_used(*, session: Session, api_key: str | None, tenant: str) -> int:
    """The bytes of the key's files quota in use: every file it holds in its tenant, and what its
    batches not ended reserve for the output and error files they write when they end (each its
    `reserved_bytes`, recorded at its creation; one created before migration 0048, its input's size)."""
    reserved = session.scalar(
        select(func.coalesce(func.sum(func.coalesce(Run.reserved_bytes, StoredFile.bytes, 0)), 0))
        .select_from(Run)
        .outerjoin(StoredFile, StoredFile.id == Run.input_file_id)
        .where(
            Run.api_key.is_not_distinct_from(api_key),
            Run.tenant == tenant,
            Run.input_file_id.is_not(None),  # a batch's (a CLI run writes no file of the key's)
            Run.status.not_in(RUN_FINISHED),
        )
    )
    return stored_bytes(session=session, api_key=api_key, tenant=tenant) + int(reserved or 0)


def locked_quota_used(*, session: Session, api_key: str | None, tenant: str) -> int:
    """quota_used under the key's quota lock, held until the caller's transaction ends: the key's
    uploads and batch creations take turns, so two cannot both fit into the last of the quota."""
    _lock_quota(session, api_key, tenant)
    return quota_used(session=session, api_key=api_key, tenant=tenant)


def reserve_within_quota(*, session: Session, run_id: uuid.UUID, reserve: int, quota: int) -> int | None:
    """Set a batch's reservation (`runs.reserved_bytes`) to `reserve` unless its key would then use
    more than `quota` bytes, under the key's quota lock (until the caller's transaction ends): None
    when set, else the bytes the key uses besides this batch."""
    api_key, tenant, own = session.execute(
        select(Run.api_key, Run.tenant, func.coalesce(Run.reserved_bytes, StoredFile.bytes, 0))
        .outerjoin(StoredFile, StoredFile.id == Run.input_file_id)
        .where(Run.id == run_id)
    ).one()
    others = locked_quota_used(session=session, api_key=api_key, tenant=tenant) - int(own)
    if others + reserve > quota:
        return others
    session.execute(update(Run).where(Run.id == run_id).values(reserved_bytes=reserve))
    return None


def add_file_within_quota(
    *,
    session: Session,
    file_id: str,
    purpose: str,
    filename: str,
    size: int,
    path: str,
    api_key: str | None,
    tenant: str,
    quota: int,
    expires_after_s: int | None = None,
) -> tuple[StoredFile | None, int]:
    """Record an upload unless the key would then use more than `quota` bytes (quota_used): (the
    row or None, the bytes in use before), under the key's quota lock."""
    held = locked_quota_used(session=session, api_key=api_key, tenant=tenant)
    if held + size > quota:
        return None, held
    row = add_file(
        session=session,
        file_id=file_id,
        purpose=purpose,
        filename=filename,
        size=size,
        path=path,
        api_key=api_key,
        tenant=tenant,
        expires_after_s=expires_after_s,
    )
    return row, held


def keyed_by(api_key: str | None) -> Any:
    """The files of this key's name: `=` (or IS NULL), which its index serves, not IS NOT DISTINCT
    FROM, which no btree does (migration 0053)."""
    return StoredFile.api_key.is_(None) if api_key is None else StoredFile.api_key == api_key


def owned_in(tenant: str) -> Any:
    """The files of `tenant`, and those recorded before files had one (their key's name decides)."""
    return StoredFile.tenant.is_(None) | (StoredFile.tenant == tenant)


def get_file(*, session: Session, file_id: str) -> StoredFile | None:
    return session.scalars(select(StoredFile).where(StoredFile.id == file_id)).one_or_none()


def recorded_ids(*, session: Session, file_ids: Sequence[str]) -> set[str]:
    """Those of these file ids that have a row."""
    # A folder may hold more than 65,535 files (they need not expire): with a bind per id the orphan
    # sweep failed at every pass.
    return set(session.scalars(select(StoredFile.id).where(any_of(StoredFile.id, file_ids, String))).all())


def _expired() -> Any:
    """A file's expiry has passed, by the database's clock (the one that set it); false without one."""
    return func.coalesce(StoredFile.expires_at <= func.now(), false())


def get_file_and_expiry(*, session: Session, file_id: str) -> tuple[StoredFile, bool] | None:
    """The file's row and whether its expiry has passed (not yet swept), in one statement."""
    found = session.execute(select(StoredFile, _expired()).where(StoredFile.id == file_id)).one_or_none()
    return None if found is None else (found[0], bool(found[1]))


def list_files(
    *,
    session: Session,
    owner: tuple[str | None, str] | None,
    purpose: str | None,
    after: StoredFile | FileTombstone | None,
    limit: int,
    newest_first: bool,
) -> list[StoredFile]:
    """Up to `limit` files of this owner, (key name, tenant) (None: everyone's), after the cursor file
    in the given order; none past its expiry (the sweep deletes them later)."""
    query = select(StoredFile).where(~_expired())
    if owner is not None:
        query = query.where(keyed_by(owner[0]), owned_in(owner[1]))
    if purpose is not None:
        query = query.where(StoredFile.purpose == purpose)
    key = tuple_(StoredFile.created_at, StoredFile.id)
    if after is not None:
        cursor = tuple_(literal(after.created_at), literal(after.id))
        query = query.where(key < cursor if newest_first else key > cursor)
    order = (
        (StoredFile.created_at.desc(), StoredFile.id.desc())
        if newest_first
        else (StoredFile.created_at, StoredFile.id)
    )
    return list(session.scalars(query.order_by(*order).limit(limit)))


def _read_by_a_running_batch() -> Any:
    return select(Run.id).where(Run.input_file_id == StoredFile.id, Run.status.not_in(RUN_FINISHED)).exists()


def hold_input_file(*, session: Session, file_id: str) -> bool:
    """Lock the file's row (FOR KEY SHARE) while a batch is created over it, for the transaction: a
    delete waits for the creation to commit, then finds the batch reading it (delete_file). False
    when the file is gone or expired (deleted after the request read it)."""
    unexpired = or_(StoredFile.expires_at.is_(None), StoredFile.expires_at > func.now())
    held = session.scalar(
        select(StoredFile.id).where(StoredFile.id == file_id, unexpired).with_for_update(key_share=True)
    )
    return held is not None


def delete_file(*, session: Session, file_id: str) -> StoredFile | None:
    """Delete the file's row unless a batch that has not ended reads it (its input); the deleted row,
    or None when there was nothing to delete or a batch still needs it (file_in_use says which)."""
    # Locked first, in a statement of its own: a batch being created over the file holds it
    # (hold_input_file), and the delete's own snapshot, taken before that batch committed, would
    # not see it (review: both answered 200, and the batch failed for want of its bytes).
    if session.scalar(select(StoredFile.id).where(StoredFile.id == file_id).with_for_update()) is None:
        return None
    row = session.scalars(
        delete(StoredFile).where(StoredFile.id == file_id, ~_read_by_a_running_batch()).returning(StoredFile)
    ).one_or_none()
    _leave_tombstones(session, [row] if row is not None else [])
    return row


# A deleted file's place in the list is kept this long: a client pages through its files in far less.
TOMBSTONE_DAYS = 7


def _leave_tombstones(session: Session, rows: Sequence[StoredFile]) -> None:
    """Keep the deleted files' places in the list (and drop a few places kept past their week)."""
    if not rows:
        return
    session.execute(
        insert(FileTombstone)
        .values(
            [{"id": r.id, "api_key": r.api_key, "tenant": r.tenant, "created_at": r.created_at} for r in rows]
        )
        .on_conflict_do_nothing()
    )
    old = (
        select(FileTombstone.id)
        .where(FileTombstone.deleted_at < func.now() - timedelta(days=TOMBSTONE_DAYS))
        .limit(len(rows) + 100)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    session.execute(delete(FileTombstone).where(FileTombstone.id.in_(old)))


def tombstone(*, session: Session, file_id: str) -> FileTombstone | None:
    """A deleted file's place in the list, if kept."""
    return session.get(FileTombstone, file_id)


def delete_expired(*, session: Session, limit: int = 1000) -> list[StoredFile]:
    """Delete up to `limit` rows of files past their expiry (none a running batch still reads); the
    deleted rows, whose bytes the caller removes after the commit."""
    due = (
        select(StoredFile.id)
        # Not _expired(): the planner cannot see through its coalesce to ix_files_expires_at.
        .where(StoredFile.expires_at <= func.now(), ~_read_by_a_running_batch())
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    rows = list(session.scalars(delete(StoredFile).where(StoredFile.id.in_(due)).returning(StoredFile)))
    _leave_tombstones(session, rows)
    return rows


def file_in_use(*, session: Session, file_id: str) -> str | None:
    """The name of a batch that has not ended and reads this file, if any."""
    return session.scalars(
        select(Run.name).where(Run.input_file_id == file_id, Run.status.not_in(RUN_FINISHED)).limit(1)
    ).first()
