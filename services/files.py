"""Batch files: uploads streamed to disk under a size limit, output files registered, both read back.

A file's bytes live under `settings.batch_files_dir` (shared by the API, workers and sweeper) and its row
in the `files` table says who owns it and what it is for.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.settings import settings
from db.files import add_file, get_file
from db.models import StoredFile
from db.session import session_scope

PURPOSES = ("batch",)  # what callers may upload; batch_output and batch_error are written here


class FileTooLarge(ValueError):
    """The upload is over the size limit; nothing was kept."""


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


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
    }


def _path_of(file_id: str) -> Path:
    return settings.batch_files_dir / f"{file_id}.jsonl"


async def save_upload(
    chunks: AsyncIterator[bytes], *, filename: str, purpose: str, api_key: str | None
) -> dict[str, Any]:
    """Stream an upload to disk (refused past batch_file_max_bytes), then record it."""
    from fastapi.concurrency import run_in_threadpool

    settings.batch_files_dir.mkdir(parents=True, exist_ok=True)
    file_id = new_file_id()
    final = _path_of(file_id)
    partial = final.with_suffix(".partial")
    size = 0
    try:
        with partial.open("wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > settings.batch_file_max_bytes:
                    raise FileTooLarge(f"file: over {settings.batch_file_max_bytes} bytes")
                out.write(chunk)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    # A multipart filename is the client's bytes: keep what PostgreSQL text can hold.
    safe_name = filename.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")[:255] or "batch.jsonl"
    return await run_in_threadpool(_record, file_id, purpose, safe_name, size, final, api_key)


def _record(
    file_id: str, purpose: str, filename: str, size: int, path: Path, api_key: str | None
) -> dict[str, Any]:
    with session_scope() as session:
        row = add_file(
            session=session,
            file_id=file_id,
            purpose=purpose,
            filename=filename,
            size=size,
            path=path.name,
            api_key=api_key,
        )
        return file_object(row)


@dataclass(frozen=True)
class FoundFile:
    info: dict[str, Any]
    path: Path
    api_key: str | None


def find_file(file_id: str) -> FoundFile | None:
    with session_scope() as session:
        row = get_file(session=session, file_id=file_id)
        if row is None:
            return None
        return FoundFile(file_object(row), settings.batch_files_dir / row.path, row.api_key)
