import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_bad_values_are_rejected_naming_the_variable() -> None:
    with pytest.raises(ValidationError, match="MLCHAT_MODEL"):
        Settings(model="gen queue with spaces")
    with pytest.raises(ValidationError, match="DATABASE_URL"):
        Settings(DATABASE_URL="mysql://x/y")
    with pytest.raises(ValidationError, match="REDIS_URL"):
        Settings(REDIS_URL="http://localhost")
    with pytest.raises(ValidationError, match="MLCHAT_MAX_NEW_TOKENS_LIMIT"):
        Settings(max_new_tokens_limit=4096, max_model_len=2048)


def test_urls_and_queue_are_derived() -> None:
    cfg = Settings(DATABASE_URL="postgresql://u:p@db:5432/mlchat", model="solar-10.7b")
    assert cfg.database_url == "postgresql+psycopg://u:p@db:5432/mlchat"
    assert cfg.queue == "gen.solar-10.7b"
    assert cfg.resolved_prompt_format == "solar"
    assert cfg.models == ["solar-10.7b"]
