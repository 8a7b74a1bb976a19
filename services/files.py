"""Batch files: uploads streamed to disk under a size limit, output files registered, both read back.

A file's bytes live under `settings.batch_files_dir` (shared by the API, workers and sweeper) and its row
in the `files` table says who owns it and what it is for.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import regex

from core.settings import DEFAULT_TENANT, settings
from db import files as stored
from db.files import add_file_within_quota
from db.models import StoredFile
from db.runs import oldest_finalizing_since
from db.session import session_scope
from db.write_keys import KeyReused, fingerprint, record_ids, stored_ids, take_key
from services.pages import list_object

logger = logging.getLogger(__name__)

PURPOSES = ("batch",)  # what callers may upload; batch_output and batch_error are written here
# OpenAI's bounds on expires_after / output_expires_after: an hour to 30 days, from creation.
EXPIRY_S = (3600, 30 * 24 * 3600)


class FileTooLarge(ValueError):
    """The upload is over the size limit; nothing was kept."""


class QuotaReached(ValueError):
    """The key's stored files plus this upload would pass MLCHAT_FILES_QUOTA_BYTES; nothing was kept."""


class FileNotFound(LookupError):
    """No such file, or not the caller's."""


class FileInUse(RuntimeError):
    """A batch that has not ended reads this file."""


class BadFileQuery(ValueError):
    """A list request's parameter names no file the caller can see."""


class FilesUnwritable(RuntimeError):
    """The files folder (MLCHAT_FILES_DIR) cannot be written: the deployment's to fix, a 503."""


def check_files_dir() -> None:
    """SystemExit in one line naming MLCHAT_FILES_DIR when its folder cannot be made or written
    (a process serving uploads checks at start, not at its first upload)."""
    problem = files_dir_problem()
    if problem is not None:
        raise SystemExit(f"mlchat: bad setting: {problem}")


def files_dir_problem() -> str | None:
    """One line naming MLCHAT_FILES_DIR when its folder cannot be made or written, else None: a
    worker and the sweep write batches' output files there as they finalize them (review of error
    texts: neither said so, and batches failed a day later, `MLCHAT_FINALIZE_GIVE_UP_HOURS`)."""
    folder = settings.batch_files_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        usable = folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
        why = "is not a folder this process can write"
    except OSError as exc:
        usable, why = False, f"cannot be made ({exc.strerror or exc})"
    return None if usable else f"MLCHAT_FILES_DIR: {folder} {why}"


def _unwritable(exc: OSError) -> FilesUnwritable:
    return FilesUnwritable(
        f"MLCHAT_FILES_DIR: {settings.batch_files_dir} cannot be written ({exc.strerror or exc})"
    )


class BadExpiry(ValueError):
    """An expires_after that is not {"anchor": "created_at", "seconds": 3600..2592000}."""


def check_expiry(anchor: object, seconds: object, field: str) -> int:
    """The seconds of an expires_after (`field` names it in the error)."""
    if anchor != "created_at":
        raise BadExpiry(f"{field}.anchor: must be 'created_at'")
    try:
        value = int(str(seconds))
    except ValueError:
        raise BadExpiry(f"{field}.seconds: must be a whole number of seconds") from None
    if not EXPIRY_S[0] <= value <= EXPIRY_S[1]:
        raise BadExpiry(f"{field}.seconds: must be between {EXPIRY_S[0]} and {EXPIRY_S[1]}")
    return value


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def _file_id(number: int) -> str:
    """An uploaded file's id from the number its idempotency key records."""
    return f"file-{number:024x}"


def _file_number(file_id: str) -> int:
    """The number an idempotency key records of an uploaded file's id (_file_id's inverse)."""
    return int(file_id.removeprefix("file-"), 16)


def file_object(row: StoredFile) -> dict[str, Any]:
    """The file as OpenAI's API describes one."""
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": int(row.created_at.timestamp()),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": int(row.expires_at.timestamp()) if row.expires_at else None,
    }


def _path_of(file_id: str) -> Path:
    return settings.batch_files_dir / f"{file_id}.jsonl"


def _over_quota(held: int, size: int | None) -> QuotaReached:
    upload = "no upload fits" if size is None else f"a {size}-byte upload does not fit"
    return QuotaReached(
        f"file: this API key uses {held} bytes of its files quota (its files, and room its batches not"
        f" ended reserve for their output) and the quota (MLCHAT_FILES_QUOTA_BYTES) is"
        f" {settings.files_quota_bytes}; {upload} (delete files to make room)"
    )


# A multipart body's bytes besides the file: boundaries, part headers, the purpose and expiry fields.
MULTIPART_SLACK = 64 * 1024


# What one line of a batch may write to its output or error file besides its reply's text: the ids,
# the response's envelope, usage, the mlchat block (seed, quality, timings), an error's message.
OUTPUT_LINE_ENVELOPE_BYTES = 4096
# A reply's token as its output line holds it: a few characters of UTF-8 (the lines are written
# with non-ASCII as is). An allowance, not a strict bound: a reply of JSON-escaped control characters
# could pass it.
OUTPUT_BYTES_PER_TOKEN = 8


def batch_reservation(input_bytes: int, lines: int, replies: int | None = None) -> int:
    """The bytes a batch of `lines` lines is taken to store when it ends, its output and error files,
    as reserved of the quota while it has not ended: its input's size, for each line its envelope,
    and for each of its `replies` (one a line when not yet counted) MLCHAT_MAX_NEW_TOKENS_LIMIT
    tokens (about 12 KB a line of one reply by default). Counted at creation, before the lines are
    read, with one reply a line; again at submission, once they are read (submission_reservation)."""
    per_reply = settings.max_new_tokens_limit * OUTPUT_BYTES_PER_TOKEN
    return (
        input_bytes + lines * OUTPUT_LINE_ENVELOPE_BYTES + (lines if replies is None else replies) * per_reply
    )


def submission_reservation(
    session: Any, run_id: uuid.UUID, input_bytes: int, lines: int, replies: int
) -> str | None:
    """Record a batch's reservation counted from its lines as read (a line of `n` choices writes n
    replies: review, stop 74 and 75, the one-reply allowance was no bound), in the caller's
    transaction, under the key's quota lock; why it does not fit the quota, or None."""
    reserve = batch_reservation(input_bytes, lines, replies)
    others = stored.reserve_within_quota(
        session=session, run_id=run_id, reserve=reserve, quota=settings.files_quota_bytes
    )
    return (
        None
        if others is None
        else _no_room(others, reserve, f"its {lines} lines ask for {replies} replies: ")
    )


def batch_room_refusal(session: Any, api_key: str | None, tenant: str, reserve: int) -> QuotaReached | None:
    """Why a new batch reserving `reserve` bytes does not fit the key's quota, or None; in the
    caller's transaction, which then holds the key's quota lock until it commits the batch. Its
    output and error files are written when it ends, past any check then: each batch not ended
    reserves an allowance for them meanwhile (review: batches created back to back from one small file all
    passed, their outputs many times the quota)."""
    if reserve > settings.files_quota_bytes:  # no deletion would make room: said so, not "delete files"
        return QuotaReached(_no_room(0, reserve))
    used = stored.locked_quota_used(session=session, api_key=api_key, tenant=tenant)
    return None if used + reserve <= settings.files_quota_bytes else QuotaReached(_no_room(used, reserve))


def _no_room(used: int, reserve: int, why: str = "") -> str:
    """A batch's refusal for the files quota, at its creation or its submission (`why`: what its
    lines ask for), naming input_file_id: split the file when the batch alone passes the quota, else
    make room."""
    quota = settings.files_quota_bytes
    allowance = "its input, and an allowance for each of its lines' output"
    if reserve > quota:
        return (
            f"input_file_id: {why}this batch alone would reserve {reserve} bytes ({allowance}), past the"
            f" quota (MLCHAT_FILES_QUOTA_BYTES) of {quota}: split the file into smaller batches, or raise"
            " the quota"
        )
    return (
        f"input_file_id: {why}this API key uses {used} bytes of its files quota (its files, and room its"
        f" batches not ended reserve for their output) and this batch would reserve {reserve} more"
        f" ({allowance}); the quota (MLCHAT_FILES_QUOTA_BYTES) is {quota} (delete files, or wait for"
        " batches to end)"
    )


def check_room(api_key: str | None, body_bytes: int | None, tenant: str = DEFAULT_TENANT) -> None:
    """Refuse an upload before its body is read: the key holds its quota already, or the request's
    declared length cannot fit in what is left of it (or under batch_file_max_bytes), with room for
    the multipart framing. `body_bytes`: the Content-Length, None for a chunked body. Raises
    QuotaReached or FileTooLarge."""
    file_bytes = None if body_bytes is None else body_bytes - MULTIPART_SLACK
    if file_bytes is not None and file_bytes > settings.batch_file_max_bytes:
        raise FileTooLarge(f"file: over {settings.batch_file_max_bytes} bytes")
    held = _held(api_key, tenant)
    if held >= settings.files_quota_bytes:
        raise _over_quota(held, None)
    if file_bytes is not None and held + file_bytes > settings.files_quota_bytes:
        raise _over_quota(held, file_bytes)


FILE_KEY = "file"  # write_keys' kind of an upload


def replayed_bytes(api_key: str | None, tenant: str, idempotency_key: str | None) -> int | None:
    """The size of the file an upload under `idempotency_key` stored, which a retry answers with
    (None: no upload holds the key; it is held to the quota as any other). A retry is not held to the
    quota (the first may have filled it) but to that size: a bigger body under the key is another
    upload (review: any body was taken whole before its 409). KeyReused when the key's file is gone
    (deleted or expired) or another API key's."""
    if idempotency_key is None:
        return None
    with session_scope() as session:
        made = stored_ids(
            session=session, tenant=tenant, kind=FILE_KEY, key=idempotency_key, request_hash=None
        )
        if made is None:
            return None
        found = _file_under_key(session, idempotency_key, made)
    if not _owns(found.api_key, found.tenant, api_key, tenant):
        raise KeyReused(f"idempotency key {idempotency_key!r} was already used for a different request")
    return found.bytes


def _past_replay(key: str | None) -> KeyReused:
    return KeyReused(f"idempotency key {key!r} was already used for a different request (a bigger file)")


def check_replay_room(body_bytes: int | None, replayed: int, key: str | None) -> None:
    """Refuse before its body is read a retry whose declared length cannot be the upload it repeats."""
    if body_bytes is not None and body_bytes - MULTIPART_SLACK > replayed:
        raise _past_replay(key)


def _upload_hash(purpose: str, filename: str, api_key: str | None, expires_after_s: int | None) -> Any:
    """The running hash of a keyed upload: what it was sent as, then its bytes. The key's name is in
    it: another key of the tenant reusing the idempotency key could not read the first one's file."""
    return hashlib.sha256(fingerprint([purpose, filename, api_key, expires_after_s]).encode() + b"\n")


async def save_upload(
    chunks: AsyncIterator[bytes],
    *,
    filename: str,
    purpose: str,
    api_key: str | None,
    tenant: str = DEFAULT_TENANT,
    expires_after_s: int | None = None,
    idempotency_key: str | None = None,
    replayed: int | None = None,
) -> dict[str, Any]:
    """Stream an upload to disk (refused past batch_file_max_bytes, or past the key's quota of stored
    bytes), then record it as the key's and its tenant's. Under `idempotency_key` (the tenant's,
    MLCHAT_WRITE_KEY_TTL_S) the same upload again answers with the first one's file and keeps no
    second copy; another upload under it is KeyReused. `replayed`: replayed_bytes of the key, read
    by the caller before the body (None: held to the quota as any upload)."""
    from fastapi.concurrency import run_in_threadpool

    held = await run_in_threadpool(_held, api_key, tenant) if replayed is None else 0
    digest = _upload_hash(purpose, filename, api_key, expires_after_s) if idempotency_key else None
    file_id = new_file_id()
    final = _path_of(file_id)
    partial = final.with_suffix(".partial")
    size = 0
    # Every touch of the disk in a thread: one that waits on a busy disk (a network MLCHAT_FILES_DIR
    # writes a file's pages back at its close) would stall every stream and request this process
    # serves meanwhile. The clean-up is shielded: a client that hangs up still has its part cleared.
    try:
        out = await run_in_threadpool(_open_partial, partial)
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > settings.batch_file_max_bytes:
                    raise FileTooLarge(f"file: over {settings.batch_file_max_bytes} bytes")
                if replayed is not None and size > replayed:
                    raise _past_replay(idempotency_key)
                if replayed is None and held + size > settings.files_quota_bytes:  # early; _record decides
                    raise _over_quota(held, size)
                await run_in_threadpool(_write, out, chunk, digest)
            await run_in_threadpool(out.flush)  # what the buffer holds: a full disk may say so only now
        finally:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(out.close)
        await run_in_threadpool(os.replace, partial, final)
    except OSError as exc:  # the folder gone, read-only or full since the start's check: a 503
        raise _unwritable(exc) from exc
    finally:
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(_clear_partial, partial)
    # A multipart filename is the client's bytes: keep what PostgreSQL text can hold.
    safe_name = filename.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")[:255] or "batch.jsonl"
    keyed = (idempotency_key, digest.hexdigest()) if idempotency_key and digest is not None else None
    try:
        made, stored_now = await run_in_threadpool(
            _record, file_id, purpose, safe_name, size, final, (api_key, tenant), expires_after_s, keyed
        )
    except Exception:
        # Refused, or the row never stored: no orphan bytes. In a thread: it asks the database, and a
        # failover would hold every request and stream of this process's event loop meanwhile.
        await run_in_threadpool(remove_unlisted, [final])
        raise
    if not stored_now:  # a retry under its key: the first upload's file is the answer
        await run_in_threadpool(remove_unlisted, [final])
    return made


def _write(out: BinaryIO, chunk: bytes, digest: Any) -> None:
    """A chunk written, and hashed for its idempotency key: off the event loop, both."""
    if digest is not None:
        digest.update(chunk)
    out.write(chunk)


def remove_unlisted(paths: list[Path]) -> None:
    """Remove these new files that have no row (never listed, served or deleted); one whose row
    committed after all (a COMMIT whose answer was lost) stays with its row. Unsure (the database is
    down too): they all stay, and the orphan sweep removes those that have no row later."""
    try:
        with session_scope() as session:
            recorded = stored.recorded_ids(session=session, file_ids=[p.stem for p in paths])
        unlisted = [p for p in paths if p.stem not in recorded]
    except Exception:
        logger.warning("could not check which of %d new files have rows; kept", len(paths), exc_info=True)
        return
    for path in unlisted:
        path.unlink(missing_ok=True)


def _open_partial(partial: Path) -> BinaryIO:
    settings.batch_files_dir.mkdir(parents=True, exist_ok=True)
    return partial.open("wb")


def _clear_partial(partial: Path) -> None:
    with contextlib.suppress(OSError):  # a folder that is not one has no partial file to clear
        partial.unlink(missing_ok=True)


def _held(api_key: str | None, tenant: str) -> int:
    """The bytes of the key's quota in use (db/files.py::quota_used)."""
    with session_scope() as session:
        return stored.quota_used(session=session, api_key=api_key, tenant=tenant)


def _record(
    file_id: str,
    purpose: str,
    filename: str,
    size: int,
    path: Path,
    owner: tuple[str | None, str],
    expires_after_s: int | None,
    keyed: tuple[str, str] | None = None,
) -> tuple[dict[str, Any], bool]:
    """The upload's file object, and whether this call stored it (False: the first upload under its
    idempotency key did)."""
    with session_scope() as session:
        if keyed is not None:
            made = take_key(
                session=session, tenant=owner[1], kind=FILE_KEY, key=keyed[0], request_hash=keyed[1]
            )
            if made is not None:
                return file_object(_file_under_key(session, keyed[0], made)), False
        row, held = add_file_within_quota(
            session=session,
            file_id=file_id,
            purpose=purpose,
            filename=filename,
            size=size,
            path=path.name,
            api_key=owner[0],
            tenant=owner[1],
            quota=settings.files_quota_bytes,
            expires_after_s=expires_after_s,
        )
        if row is None:
            raise _over_quota(held, size)
        if keyed is not None:
            ids = [_file_number(file_id)]
            record_ids(session=session, tenant=owner[1], kind=FILE_KEY, key=keyed[0], ids=ids)
        return file_object(row), True


def _file_under_key(session: Any, key: str, made: list[int]) -> StoredFile:
    """The file an upload under `key` stored (`made`: the ids its key records); KeyReused once it is
    gone (deleted or expired: the key outlived it)."""
    found = stored.get_file_and_expiry(session=session, file_id=_file_id(made[0]))
    if found is None or found[1]:
        raise KeyReused(f"idempotency key {key!r}: the file it uploaded was deleted since")
    return found[0]


def _owns(file_key: str | None, file_tenant: str | None, api_key: str | None, tenant: str) -> bool:
    """Whether this key (its name, in its tenant) owns a file: a name passed to another tenant's key
    is another owner (a file recorded before files had a tenant is its key's name's)."""
    return file_key == api_key and file_tenant in (None, tenant)


@dataclass(frozen=True)
class FoundFile:
    info: dict[str, Any]
    path: Path
    api_key: str | None
    tenant: str | None  # None: recorded before files had one
    expired: bool = False  # past its expiry, not yet swept: gone to its owner (404), as at OpenAI

    def owned_by(self, api_key: str | None, tenant: str) -> bool:
        return _owns(self.api_key, self.tenant, api_key, tenant)


def find_file(file_id: str) -> FoundFile | None:
    with session_scope() as session:
        found = stored.get_file_and_expiry(session=session, file_id=file_id)
        if found is None:
            return None
        row, expired = found
        path = settings.batch_files_dir / row.path
        return FoundFile(file_object(row), path, row.api_key, row.tenant, expired)


def _visible(
    session: Any, file_id: str, api_key: str | None, admin: bool, tenant: str, *, expired_too: bool = False
) -> StoredFile:
    """The caller's file; past its expiry it is gone to them (not yet swept, or kept for a batch),
    except as a list's cursor (`expired_too`): a page's last file expiring before the next page is
    asked for must not break the paging (the list itself shows no expired file)."""
    found = stored.get_file_and_expiry(session=session, file_id=file_id)
    if found is None:
        raise FileNotFound(f"no file {file_id!r}")
    row, expired = found
    if (expired and not expired_too) or not (admin or _owns(row.api_key, row.tenant, api_key, tenant)):
        raise FileNotFound(f"no file {file_id!r}")
    return row


def list_files(
    *,
    api_key: str | None,
    admin: bool,
    purpose: str | None,
    after: str | None,
    limit: int,
    order: str,
    tenant: str = DEFAULT_TENANT,
) -> dict[str, Any]:
    """The caller's files (an admin key's: everyone's), a page of `limit` after the file `after`."""
    with session_scope() as session:
        cursor: Any = None
        if after is not None:
            try:
                cursor = _visible(session, after, api_key, admin, tenant, expired_too=True)
            except FileNotFound:
                # Deleted between two pages (by the client paging, an admin, the expiry sweep): its
                # place in the list is kept a week, the owner's to page from like the file's.
                place = stored.tombstone(session=session, file_id=after)
                if place is None or not (admin or _owns(place.api_key, place.tenant, api_key, tenant)):
                    raise BadFileQuery(f"after: no file {after!r}") from None
                cursor = place
        rows = stored.list_files(
            session=session,
            owner=None if admin else (api_key, tenant),
            purpose=purpose,
            after=cursor,
            limit=limit + 1,
            newest_first=order == "desc",
        )
        return list_object([file_object(row) for row in rows[:limit]], len(rows) > limit)


def delete_file(
    file_id: str, *, api_key: str | None, admin: bool, tenant: str = DEFAULT_TENANT
) -> dict[str, Any]:
    """Delete the file's row and bytes; refused while a batch that has not ended reads it."""
    with session_scope() as session:
        _visible(session, file_id, api_key, admin, tenant)
        row = stored.delete_file(session=session, file_id=file_id)
        if row is None:
            batch = stored.file_in_use(session=session, file_id=file_id)
            if batch is not None:
                raise FileInUse(f"file {file_id!r}: batch {batch!r} reads it until it ends (cancel it first)")
            raise FileNotFound(f"no file {file_id!r}")  # deleted by someone else meanwhile
        path = settings.batch_files_dir / row.path
    path.unlink(missing_ok=True)  # after the commit: a failed delete leaves the bytes with their row
    return {"id": file_id, "object": "file", "deleted": True}


# Bytes in the files folder with no row, left by a process that died between writing and recording
# them (an upload, a batch's finalizing), and scratch files a death left behind. Only ones older than
# this: anything younger may be on its way to a row (a finalizing writes for minutes, then commits).
ORPHAN_AGE_S = 3600.0
_OURS = regex.compile(
    r"(file-[0-9a-f]{24})\.(?:jsonl|partial)|\.file-[0-9a-f]{24}\.jsonl\.[0-9a-f]{32}(?:\.errors)?\.tmp"
)


# The scratch of a batch output file's rewrite (services/batches.py::rewrite_output_file): one left
# behind tells of a process killed mid-rewrite, so it is not deleted as an orphan but handed back to
# the sweep's caller, which writes the file again, then removes it.
REWRITE_SCRATCH = regex.compile(r"\.(file-[0-9a-f]{24})\.jsonl\.[0-9a-f]{32}\.tmp")


# How far a file's writer's clock may be behind the database's, for the orphan sweep: an unrecorded file
# written this long before the oldest running finalizing began is kept as if it were that try's.
CLOCKS_APART_S = 1800.0


def delete_orphan_files(older_than_s: float = ORPHAN_AGE_S, rewrites: list[Path] | None = None) -> list[str]:
    """Delete the files folder's unrecorded bytes and scratch files older than `older_than_s`; their
    names. Only names mlchat writes are touched. A rewrite's scratch that old is left in place, and
    added to `rewrites` when given (found in the same walk of the folder)."""
    root = settings.batch_files_dir
    if not root.is_dir():
        return []
    cutoff = time.time() - older_than_s
    scratch: list[Path] = []
    named: dict[str, tuple[Path, float]] = {}  # file id: its path and mtime
    for path in root.iterdir():
        ours = _OURS.fullmatch(path.name)
        if ours is None:
            continue
        try:
            mtime = path.stat().st_mtime
            if not path.is_file() or mtime >= cutoff:
                continue
        except FileNotFoundError:  # deleted meanwhile
            continue
        if REWRITE_SCRATCH.fullmatch(path.name):
            if rewrites is not None:
                rewrites.append(path)
        elif path.suffix == ".jsonl":
            named[ours[1]] = (path, mtime)
        else:
            scratch.append(path)
    if named:
        with session_scope() as session:
            recorded = stored.recorded_ids(session=session, file_ids=list(named))
            finalizing = oldest_finalizing_since(session=session)
        # A finalizing that runs past the hour (a batch of millions on a busy database) writes into
        # files it records only at its end, whose mtime a buffered writer may not move: one made since
        # the oldest running finalizing began may be its. A file's time is its writer's clock (or its
        # NFS server's), the finalizing's the database's: a minute of slack lost a batch's empty error
        # file to a writer two minutes behind, every try until it failed (review).
        since = None if finalizing is None else finalizing.timestamp() - CLOCKS_APART_S
        scratch += [
            path
            for file_id, (path, mtime) in named.items()
            if file_id not in recorded and (since is None or mtime < since)
        ]
    for path in scratch:
        path.unlink(missing_ok=True)
    return sorted(path.name for path in scratch)


def delete_expired_files() -> list[str]:
    """Delete the files past their expiry (rows, then bytes), but none a running batch still reads."""
    with session_scope() as session:
        rows = stored.delete_expired(session=session)
        gone = [(row.id, settings.batch_files_dir / row.path) for row in rows]
    for _, path in gone:
        path.unlink(missing_ok=True)
    return [file_id for file_id, _ in gone]
