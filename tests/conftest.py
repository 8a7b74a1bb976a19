"""Shared fixtures: real embedded PostgreSQL + Redis in a throwaway state dir, the real embedder,
and the real vLLM engine loaded once per test session."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

# Before any project import: settings are read once, at import.
_STATE = Path(tempfile.mkdtemp(prefix="mlchat-test-"))
os.environ["MLCHAT_STATE_DIR"] = str(_STATE)
os.environ.setdefault(
    "MLCHAT_MODEL_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".mlchat" / "models")
)
os.environ.setdefault("MLCHAT_BATCH_SIZE", "8")
os.environ.setdefault("MLCHAT_FLUSH_INTERVAL", "0.2")
os.environ.setdefault("MLCHAT_MAX_NEW_TOKENS", "24")
os.environ.setdefault("MLCHAT_CPU_KVCACHE_GIB", "1")
os.environ.setdefault("MLCHAT_BATCH_RETRY_DELAY", "0.5")
os.environ.pop("DATABASE_URL", None)
os.environ.pop("REDIS_URL", None)
os.environ["MLCHAT_API_KEYS"] = '["test-key-1", "test-key-2"]'
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402

from core import embedded  # noqa: E402
from core.settings import queue_for_model, settings  # noqa: E402


@pytest.fixture(scope="session")
def services() -> Iterator[Path]:
    """Embedded PostgreSQL (migrated to head) and Redis, stopped and deleted after the session."""
    from core.services import broker_url, database_url
    from db.migrate import upgrade

    database_url()
    broker_url()
    upgrade()
    yield _STATE
    embedded.stop_redis(_STATE)
    embedded.stop_postgres(_STATE)
    shutil.rmtree(_STATE, ignore_errors=True)


@pytest.fixture(scope="session")
def world(services: Path) -> None:
    """The sample world from data/, seeded once."""
    from scripts.seed import seed_world

    seed_world()


@pytest.fixture(scope="session")
def engine(world: None):  # type: ignore[no-untyped-def]
    """The real vLLM engine with the default model: loaded once for the whole session."""
    from worker.engine import get_engine
    from worker.startup import check_and_warm_up

    check_and_warm_up(load_engine=True)
    return get_engine()


@pytest.fixture(scope="session")
def celery_worker(engine):  # type: ignore[no-untyped-def]
    """A real Celery worker on the real broker, in this process so it shares the session's engine."""
    from celery.contrib.testing.worker import start_worker

    from tasks.app import app

    with start_worker(
        app,
        pool="solo",
        concurrency=1,
        perform_ping_check=False,
        queues=[queue_for_model(settings.model, "live"), queue_for_model(settings.model, "bulk")],
        loglevel="WARNING",
        shutdown_timeout=60,
    ) as worker:
        yield worker


@pytest.fixture(scope="session")
def tokenizer():  # type: ignore[no-untyped-def]
    """The default model's tokenizer, without the engine."""
    from transformers import AutoTokenizer

    from worker.model_cache import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(settings))


def new_conversation(character: str = "elara") -> dict[str, str]:
    """A fresh conversation id for one test, so tests never share history."""
    return {"conversation": f"test-{character}-{uuid.uuid4().hex[:10]}", "character": character}
