"""Stored files (batch input, output and error files): their rows; the bytes live on disk."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import StoredFile


def add_file(
    *, session: Session, file_id: str, purpose: str, filename: str, size: int, path: str, api_key: str | None
) -> StoredFile:
    row = StoredFile(id=file_id, purpose=purpose, filename=filename, bytes=size, path=path, api_key=api_key)
    session.add(row)
    session.flush()
    return row


def get_file(*, session: Session, file_id: str) -> StoredFile | None:
    return session.scalars(select(StoredFile).where(StoredFile.id == file_id)).one_or_none()
