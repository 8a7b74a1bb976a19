"""Read facts about the live schema."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session


def vector_column_dim(*, session: Session, table: str, column: str) -> int | None:
    """The declared dimension of a pgvector column (pgvector stores it as the type modifier)."""
    dim = session.execute(
        text(
            "SELECT atttypmod FROM pg_attribute "
            "WHERE attrelid = to_regclass(:table) AND attname = :column AND NOT attisdropped"
        ),
        {"table": table, "column": column},
    ).scalar()
    return int(dim) if dim is not None and dim > 0 else None
