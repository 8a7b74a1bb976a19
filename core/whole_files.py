"""Files put in place whole: written under a name of their own beside the file, renamed over it once
every one of them is written (a reader sees the old file or the new, never part of one; two writers
of the same files each write their own part), removed if the writing stops."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A part file not written to for this long is a writer's that was killed outright (SIGKILL, the OOM
# killer, a lost node), which removed nothing: the next writer into its folder removes it. A live
# writer writes as it reads, chunk by chunk, far more often.
STALE_PART_S = 24 * 3600


def _remove_stale_parts(folder: Path) -> None:
    now = time.time()
    try:
        found = list(folder.glob(".mlchat-*.part"))
    except OSError:
        return
    for part in found:
        try:
            if now - part.stat().st_mtime > STALE_PART_S:
                part.unlink(missing_ok=True)
        except OSError:  # another writer's cleanup got there first, or the folder is not ours to clean
            continue


@contextmanager
def replaced_whole(*paths: Path) -> Iterator[list[Path]]:
    """Paths to write the files at; each is renamed over its file when the block ends without error,
    and removed when it raises. Part files a killed writer left in these folders are removed first."""
    for folder in dict.fromkeys(path.parent for path in paths):
        _remove_stale_parts(folder)
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
