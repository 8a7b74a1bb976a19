"""story_events hash-partitioned by story: each partition has its own small HNSW graph, so the
story filter of a retrieval no longer makes the scan visit every other story's events

The rows move over with their ids (the id sequence moves with them); the primary key becomes
(id, story) because a partitioned table's unique keys must hold the partition key.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30 18:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Fixed here, not a setting: changing it means moving every row again (a new revision). 32 keeps a
# few dozen stories mostly one per partition; with many more stories each partition holds several,
# still 1/32 of the events per graph.
PARTITIONS = 32

_COLUMNS = """
    id bigint NOT NULL DEFAULT nextval('story_events_id_seq'),
    story varchar(100) NOT NULL,
    ordinal integer NOT NULL,
    scene varchar(200) NOT NULL,
    time integer NOT NULL,
    text text NOT NULL,
    embedding vector(384)
"""

_HNSW = "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"


def _embedding_type() -> str:
    """The column's declared type as it stands (its dimension follows MLCHAT_EMBEDDING_DIM at 0001)."""
    bind = op.get_bind()
    return bind.exec_driver_sql(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = 'story_events'::regclass AND attname = 'embedding'"
    ).scalar_one()


def _move(*, partitioned: bool) -> None:
    """Rebuild story_events (partitioned or plain) with the same rows, ids and sequence."""
    columns = _COLUMNS.replace("vector(384)", _embedding_type())
    op.execute(
        f"CREATE TABLE story_events_next ({columns}){' PARTITION BY HASH (story)' if partitioned else ''}"
    )
    if partitioned:
        for i in range(PARTITIONS):
            op.execute(
                f"CREATE TABLE story_events_p{i} PARTITION OF story_events_next"
                f" FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {i})"
            )
    # Rows first, indexes after: one HNSW build per partition is far faster than row by row.
    op.execute(
        "INSERT INTO story_events_next (id, story, ordinal, scene, time, text, embedding)"
        " SELECT id, story, ordinal, scene, time, text, embedding FROM story_events"
    )
    op.execute("ALTER SEQUENCE story_events_id_seq OWNED BY story_events_next.id")
    op.execute("DROP TABLE story_events")
    op.execute("ALTER TABLE story_events_next RENAME TO story_events")
    key = "(id, story)" if partitioned else "(id)"
    op.execute(f"ALTER TABLE story_events ADD CONSTRAINT pk_story_events PRIMARY KEY {key}")
    op.execute(
        "ALTER TABLE story_events ADD CONSTRAINT uq_story_events_story_ordinal UNIQUE (story, ordinal)"
    )
    op.execute(f"CREATE INDEX ix_story_events_embedding_hnsw ON story_events {_HNSW}")


def upgrade() -> None:
    _move(partitioned=True)


def downgrade() -> None:
    _move(partitioned=False)
