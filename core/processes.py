"""Whether a process of this host is alive, by its pid."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (in this pid namespace); another user's counts."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
