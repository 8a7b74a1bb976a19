"""Run Alembic programmatically (the start-up step of every entry point that needs the schema)."""

from __future__ import annotations

import re

from alembic import command
from alembic.config import Config

from core.settings import PROJECT_ROOT


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


def upgrade(revision: str = "head") -> None:
    """Migrate the database up to `revision`."""
    command.upgrade(alembic_config(), revision)


def downgrade(revision: str) -> None:
    """Migrate the database down to `revision`."""
    command.downgrade(alembic_config(), revision)
