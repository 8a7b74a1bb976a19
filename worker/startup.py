"""Worker start-up: refuse to run against a schema the embedder does not fit, then warm the models."""

from __future__ import annotations

import logging

from core.settings import settings
from db.introspect import vector_column_dim
from db.migrate import check_schema
from db.session import get_engine, session_scope
from db.vector_space import check
from worker.embedder import get_embedder, join_space

logger = logging.getLogger(__name__)


def check_and_warm_up(load_engine: bool = True) -> None:
    """Check embedder and database agree on the vector size and on the embedder the stored vectors
    come from, its name before loading it and its weights after (EmbedderMismatch); load the
    embedder and the engine. A schema behind this code's migrations is refused first (SchemaBehind):
    every claim would otherwise fail on a column it lacks, after minutes of loading."""
    with get_engine().connect() as connection:
        check_schema(connection)
    with session_scope() as session:
        column_dim = vector_column_dim(session=session, table="messages", column="embedding")
    if column_dim is None:
        raise RuntimeError("the database has no messages.embedding column: run `mlchat migrate` first")
    with session_scope() as session:  # before loading anything: a mismatch exits at once
        check(session=session, embedder=settings.embedder)
    # Recorded (or checked) only once the embedder is proven to load and fit the column; a worker's
    # first start takes vectors stored before anything recorded an embedder as its own.
    join_space(get_embedder(), claim_stored=True)
    if load_engine:
        from worker.pipeline import get_prompt_builder

        get_prompt_builder()  # loads the engine and its tokenizer
    logger.info(
        "worker ready: model=%s queue=%s batch=%d", settings.model, settings.queue, settings.batch_size
    )
