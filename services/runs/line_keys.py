"""The ids a run gives its lines' turns and fresh conversations: `<prefix>:<custom_id>`, hashed when
too long for the columns that hold them."""

from __future__ import annotations

import hashlib

KEY_CHARS = 200  # turns.idempotency_key and conversations.external_id are varchar(200)


def line_key(prefix: str, custom_id: str) -> str:
    """`<prefix>:<custom_id>`, or its digest when that would not fit varchar(200)."""
    key = f"{prefix}:{custom_id}"
    return key if len(key) <= KEY_CHARS else "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def line_conversation(run_name: str, custom_id: str) -> str:
    """The conversation a run line that names none is stored under: a scene line's, a fresh line's."""
    return line_key(f"run:{run_name}", custom_id)
