"""story_events hash-partitioned by story: each partition has its own small HNSW graph, so the
story filter of a retrieval no longer makes the scan visit every other story's events

The rows move over with their ids (the id sequence moves with them); the primary key becomes
(id, story) because a partitioned table's unique keys must hold the partition key.

An offline step: writes to story_events wait from its start (EXCLUSIVE lock), reads too from the
DROP to the commit, which comes after the 32 HNSW graphs are built; stop the workers first. The
table is new, so GRANTs on story_events (other than its owner's) must be applied again afterwards.

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

_HNSW = "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"


def _move(*, partitioned: bool) -> None:
    """Rebuild story_events (partitioned or plain) with the same rows, ids and sequence."""
    # Readers go on until the DROP; a writer waits, so no row lands after the copy and is lost.
    op.execute("LOCK TABLE story_events IN EXCLUSIVE MODE")
    # LIKE: every column as it stands (types, NOT NULL, the id's sequence default), so a column
    # another revision added before this one moves over too instead of being dropped.
    op.execute(
        "CREATE TABLE story_events_next (LIKE story_events INCLUDING DEFAULTS)"
        f"{' PARTITION BY HASH (story)' if partitioned else ''}"
    )
    if partitioned:
        for i in range(PARTITIONS):
            op.execute(
                f"CREATE TABLE story_events_p{i} PARTITION OF story_events_next"
                f" FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {i})"
            )
    # Rows first, indexes after: one HNSW build per partition is far faster than row by row.
    op.execute("INSERT INTO story_events_next SELECT * FROM story_events")  # LIKE keeps the order
    op.execute("ALTER SEQUENCE story_events_id_seq OWNED BY story_events_next.id")
    op.execute("DROP TABLE story_events")
    op.execute("ALTER TABLE story_events_next RENAME TO story_events")
    key = "(id, story)" if partitioned else "(id)"
    op.execute(f"ALTER TABLE story_events ADD CONSTRAINT pk_story_events PRIMARY KEY {key}")
    op.execute(
        "ALTER TABLE story_events ADD CONSTRAINT uq_story_events_story_ordinal UNIQUE (story, ordinal)"
    )
    op.execute(f"CREATE INDEX ix_story_events_embedding_hnsw ON story_events {_HNSW}")
    op.execute("ANALYZE story_events")  # a new table has no statistics: plans would guess until autovacuum


def upgrade() -> None:
    _move(partitioned=True)


def downgrade() -> None:
    _move(partitioned=False)
