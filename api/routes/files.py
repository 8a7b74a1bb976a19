"""Files: upload a batch input file (multipart, as OpenAI's API takes it), list files, read a file's
metadata and content (a batch's output and error files), delete one. Ingest keys see their own files;
admin keys see all."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, BinaryIO, Literal

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from api.deps import Caller, needs
from services.files import (
    PURPOSES,
    BadExpiry,
    BadFileQuery,
    FileInUse,
    FileNotFound,
    FileTooLarge,
    FoundFile,
    KeyReused,
    QuotaReached,
    check_expiry,
    check_replay_room,
    check_room,
    delete_file,
    find_file,
    list_files,
    replayed_bytes,
    save_upload,
)
from services.schemas import HeaderText

router = APIRouter(prefix="/v1/files", tags=["files"])

FileId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]

logger = logging.getLogger(__name__)
_CHUNK = 1 << 20


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length", "")
    return int(value) if value.isascii() and value.isdigit() else None


@router.post("")
async def upload_file(
    request: Request,
    who: Annotated[Caller, Depends(needs("ingest"))],
    idempotency_key: Annotated[HeaderText | None, Header(min_length=1, max_length=200)] = None,
) -> Any:
    """Upload a JSONL file for a batch: multipart fields `file` and `purpose` ("batch").
    `Idempotency-Key` makes a retry safe: the same upload again answers with the file the first one
    stored, keeping no second copy (409 when the key was used for another upload or its file is
    gone)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "multipart/form-data":
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            "send the file as multipart/form-data (fields file, purpose)",
        )
    try:  # before a byte of the body is read (parsing it spools the file part to disk)
        replayed = await run_in_threadpool(replayed_bytes, who.key_id, who.tenant, idempotency_key)
        if replayed is None:
            await run_in_threadpool(check_room, who.key_id, _declared_length(request), who.tenant)
        else:  # a retry: the size of the file it repeats, not the quota the first may have filled
            check_replay_room(_declared_length(request), replayed, idempotency_key)
    except FileTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    except QuotaReached as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
    except KeyReused as exc:
        raise _key_conflict(exc) from None
    try:  # Starlette spools the file part to the temporary folder as it parses the body
        form = await request.form(max_files=1, max_fields=4)
    except OSError as exc:  # that folder full or unwritable: the deployment's, and a 503 says so
        logger.error("an upload could not be spooled to %s: %s", tempfile.gettempdir(), exc)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "the upload could not be written to the server's temporary folder; try again later",
        ) from None
    try:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose not in PURPOSES:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"purpose: must be one of {', '.join(PURPOSES)}")
        if not isinstance(upload, UploadFile):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "file: missing (a multipart file field)")
        expires_after_s = None
        if "expires_after[anchor]" in form or "expires_after[seconds]" in form:
            try:
                expires_after_s = check_expiry(
                    form.get("expires_after[anchor]"), form.get("expires_after[seconds]"), "expires_after"
                )
            except BadExpiry as exc:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None

        async def chunks() -> AsyncIterator[bytes]:
            while data := await upload.read(_CHUNK):
                yield data

        try:
            return await save_upload(
                chunks(),
                filename=upload.filename or "batch.jsonl",
                purpose=str(purpose),
                api_key=who.key_id,
                tenant=who.tenant,
                expires_after_s=expires_after_s,
                idempotency_key=idempotency_key,
                replayed=replayed,
            )
        except KeyReused as exc:
            raise _key_conflict(exc) from None
        except FileTooLarge as exc:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
        except QuotaReached as exc:
            raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
    finally:
        await form.close()  # the spooled part's temporary file


def _key_conflict(exc: KeyReused) -> HTTPException:
    # the openai client retries a 409 unless told not to
    return HTTPException(
        status.HTTP_409_CONFLICT, f"Idempotency-Key (header): {exc}", {"x-should-retry": "false"}
    )


@router.get("")
def get_files(
    who: Annotated[Caller, Depends(needs("ingest"))],
    purpose: Annotated[Literal["batch", "batch_output", "batch_error"] | None, Query()] = None,
    after: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = None,
    # OpenAI's default (the client's `for f in files.list(): files.delete(f.id)` reads one page; a
    # cursor naming a file deleted since pages from the place it kept, migration 0038).
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
) -> Any:
    """The caller's files, newest first unless `order=asc`; `after` a file id for the next page."""
    try:
        return list_files(
            api_key=who.key_id,
            admin=who.admin,
            purpose=purpose,
            after=after,
            limit=limit,
            order=order,
            tenant=who.tenant,
        )
    except BadFileQuery as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None


@router.delete("/{file_id}")
def remove_file(file_id: FileId, who: Annotated[Caller, Depends(needs("ingest"))]) -> Any:
    """Delete the file (its row and its bytes); 409 while a batch that has not ended reads it."""
    try:
        return delete_file(file_id, api_key=who.key_id, admin=who.admin, tenant=who.tenant)
    except FileNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except FileInUse as exc:
        # The openai client retries a 409 unless told not to: the batch still reads the file.
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc), {"x-should-retry": "false"}) from None


def _visible(file_id: str, who: Caller) -> FoundFile:
    found = find_file(file_id)
    if found is None or found.expired or not (who.admin or found.owned_by(who.key_id, who.tenant)):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file {file_id!r}")
    return found


@router.get("/{file_id}")
def get_file(file_id: FileId, who: Annotated[Caller, Depends(needs("ingest"))]) -> Any:
    """The file's metadata."""
    return _visible(file_id, who).info


@router.get("/{file_id}/content")
def get_file_content(file_id: FileId, who: Annotated[Caller, Depends(needs("ingest"))]) -> FileResponse:
    """The file's bytes, streamed from disk."""
    found = _visible(file_id, who)
    try:
        handle = found.path.open("rb")
    except (FileNotFoundError, IsADirectoryError):
        gone = f"file {file_id!r}: its bytes are no longer stored"
        raise HTTPException(status.HTTP_410_GONE, gone) from None
    return OpenedFileResponse(handle, media_type="application/jsonl", filename=found.info["filename"])


class OpenedFileResponse(FileResponse):
    """Starlette's FileResponse (ranges, ETag, Last-Modified) over a file the route already opened: a
    DELETE landing after the open reads nothing away from it, where FileResponse would stat and open
    the path itself later (a 500 once the file was gone)."""

    def __init__(self, handle: BinaryIO, **kwargs: Any) -> None:
        self._handle = handle
        super().__init__(handle.name, stat_result=os.fstat(handle.fileno()), **kwargs)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Never the server's own file sending (ASGI pathsend): it would open the path again.
        extensions = {k: v for k, v in scope.get("extensions", {}).items() if k != "http.response.pathsend"}
        try:
            await super().__call__({**scope, "extensions": extensions}, receive, send)
        finally:  # a 416, a 400 or a disconnect before the body never reach _open_file
            self._handle.close()

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:
        file = anyio.wrap_file(self._handle)
        try:
            yield file
        finally:
            with anyio.CancelScope(shield=True):  # closed even when the transfer is cancelled
                await file.aclose()
