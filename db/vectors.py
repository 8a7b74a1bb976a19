"""pgvector's binary format for vector parameters: sent as float32 arrays, not text."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
from pgvector.psycopg import register_vector
from pgvector.sqlalchemy import Vector
from psycopg.types.array import ListBinaryDumper
from sqlalchemy import BindParameter, bindparam
from sqlalchemy.orm import Session

from db.session import psycopg_connection

_vector_ready: weakref.WeakSet[Any] = weakref.WeakSet()


def send_vectors_binary(session: Session) -> None:
    """Teach the session's psycopg connection pgvector's binary format (once per connection): 64
    vectors as text cost milliseconds to format and parse."""
    raw = psycopg_connection(session)
    if raw not in _vector_ready:
        register_vector(raw)
        raw.adapters.register_dumper(VectorArray, ListBinaryDumper)
        _vector_ready.add(raw)


class VectorArray(list[np.ndarray]):
    """Vectors for one `vector[]` parameter, sent as one binary array (psycopg dumps a plain list as a
    text array, formatting every float: ~26 ms of a 64-turn retrieval's client time, measured);
    only for statements whose session had send_vectors_binary."""

    def __init__(self, vectors: Any) -> None:
        super().__init__(np.asarray(v, dtype=np.float32) for v in vectors)


class BinaryVector(Vector):
    """A vector parameter handed to psycopg as a float32 array, sent in pgvector's binary format;
    only for statements whose session had send_vectors_binary."""

    cache_ok = True

    def bind_processor(self, dialect: Any) -> Any:
        def process(value: Any) -> Any:
            return None if value is None else np.asarray(value, dtype=np.float32)

        return process


def binary_vector_param(session: Session, name: str, dim: int | None) -> BindParameter[Any]:
    """A bound vector parameter sent in the binary format; registers the session's adapter for it."""
    send_vectors_binary(session)
    return bindparam(name, type_=BinaryVector(dim))
