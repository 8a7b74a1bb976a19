"""Run Alembic programmatically (the start-up step of every entry point that needs the schema)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from core.settings import PROJECT_ROOT


def alembic_config() -> Config:
    """Alembic config for this project; the URL comes from settings in migrations/env.py."""
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(revision: str = "head") -> None:
    """Migrate the database up to `revision`."""
    command.upgrade(alembic_config(), revision)


def downgrade(revision: str) -> None:
    """Migrate the database down to `revision`."""
    command.downgrade(alembic_config(), revision)
