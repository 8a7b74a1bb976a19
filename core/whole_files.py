"""Files put in place whole: written under a name of their own beside the file, renamed over it once
every one of them is written (a reader sees the old file or the new, never part of one; two writers
of the same files each write their own part), removed if the writing stops."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_whole(*paths: Path) -> Iterator[list[Path]]:
    """Paths to write the files at; each is renamed over its file when the block ends without error,
    and removed when it raises."""
    tag = uuid.uuid4().hex
    # Named apart from the file: its own name may be as long as the filesystem takes.
    parts = [path.with_name(f".mlchat-{tag}-{i}.part") for i, path in enumerate(paths)]
    try:
        yield parts
        for part, path in zip(parts, paths, strict=True):
            part.replace(path)
    finally:
        for part in parts:
            part.unlink(missing_ok=True)
