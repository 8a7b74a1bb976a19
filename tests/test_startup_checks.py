"""The worker refuses to start when the embedder and the database disagree on the vector size."""

import pytest

from db.introspect import vector_column_dim
from db.session import session_scope
from worker.embedder import EmbedderDimensionError, check_dimension, get_embedder


def test_the_live_schema_and_the_embedder_agree(services) -> None:
    with session_scope() as s:
        assert vector_column_dim(session=s, table="messages", column="embedding") == 384
        assert vector_column_dim(session=s, table="story_events", column="embedding") == 384
    assert get_embedder().get_embedding_dimension() == 384


def test_a_mismatch_is_a_clear_start_up_error(services) -> None:
    with pytest.raises(EmbedderDimensionError, match=r"768-d vectors but the database stores vector\(384\)"):
        check_dimension(768, 384)
