"""Run Alembic programmatically (the start-up step of every entry point that needs the schema)."""

from __future__ import annotations

import logging
import re
from functools import cache

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from core.settings import PROJECT_ROOT

logger = logging.getLogger(__name__)


def alembic_config() -> Config:
    """Alembic config for this project; the URL comes from settings in migrations/env.py."""
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    cfg.attributes["configure_logger"] = False
    return cfg


# The advisory lock a migration holds (migrations/env.py): one process migrates a database at a time.
MIGRATION_LOCK_KEY = 0x6D6C63686174  # "mlchat"

# Partitions of a partitioned table (story_events_p0..., migration 0014): their columns and indexes
# are the parent's, which the models describe; autogenerate would otherwise offer to drop them.
_PARTITION = re.compile(r"^story_events_p\d+$")


def include_name(name: str | None, type_: str, parent_names: dict[str, str | None]) -> bool:
    """Alembic's name filter for comparing the models with the live schema: skips partitions."""
    return not (type_ == "table" and name is not None and _PARTITION.match(name))


class SchemaBehind(RuntimeError):
    """The database's schema is older than this code's migrations: `mlchat migrate` first."""


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


@cache
def code_head() -> str:
    """The newest revision this code's migrations know."""
    head = _scripts().get_current_head()
    assert head is not None  # the project has migrations
    return head


@cache
def _known(revision: str) -> bool:
    try:
        return _scripts().get_revision(revision) is not None
    except Exception:  # alembic's "Can't locate revision"
        return False


def schema_ahead(connection: Connection) -> str | None:
    """The database's revision when this code does not know it (a newer release migrated it: this is
    a rollback), else None. A database behind this code raises SchemaBehind, naming both revisions."""
    current = MigrationContext.configure(connection).get_current_revision()
    if current == code_head():
        return None
    if current is None:
        raise SchemaBehind("the database has no schema yet: run `mlchat migrate` first")
    if _known(current):
        raise SchemaBehind(
            f"the database's schema is at revision {current}, this code needs {code_head()}:"
            " run `mlchat migrate` first"
        )
    return current


# The oldest PostgreSQL this schema and its statements run on: a run's lines are stored with uuidv7()
# (db/bulk_turns.py), which PostgreSQL 18 brought. On an older server every migration passed, and
# every run submission and batch failed at its first chunk (review).
OLDEST_SERVER = 180000  # server_version_num


def server_too_old(version_num: int) -> str | None:
    """Why a server of this `server_version_num` cannot hold mlchat's database, or None."""
    if version_num >= OLDEST_SERVER:
        return None
    major = version_num // 10000
    return (
        f"the database server is PostgreSQL {major}; mlchat needs PostgreSQL 18 or later (with pgvector"
        " 0.8): a run's lines are stored with uuidv7()"
    )


class ServerTooOld(RuntimeError):
    """The database server is older than the one mlchat's statements need."""


def current_revision(connection: Connection) -> str | None:
    """The database's schema revision (None: no schema yet)."""
    return MigrationContext.configure(connection).get_current_revision()


def newer_schema(revision: str) -> str:
    """What a database ahead of this code is, in one line (a rollback to an older release)."""
    return (
        f"the database's schema is at revision {revision}, newer than this code's {code_head()} (a rollback?)"
    )


def check_schema(connection: Connection) -> None:
    """Refuse a database behind this code (SchemaBehind: every claim of a new column would fail
    later, one by one); one ahead of it is said and allowed: a rollback to the release before, whose
    code reads a schema that newer revisions only added to."""
    ahead = schema_ahead(connection)
    if ahead is not None:
        logger.warning("%s; going on", newer_schema(ahead))


def upgrade(revision: str = "head") -> None:
    """Migrate the database up to `revision`. To head, a database a newer release already migrated
    past this code's head is left as it is, said in one line (migrations/env.py): rolling back to an
    older image must not fail its start-up migration."""
    command.upgrade(alembic_config(), revision)


def downgrade(revision: str) -> None:
    """Migrate the database down to `revision`."""
    command.downgrade(alembic_config(), revision)
