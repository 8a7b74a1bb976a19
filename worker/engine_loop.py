"""The engine, always full: one thread drives vLLM's engine (`add_request` / `step`), every batch feeds it.

Requests join the running engine as soon as their prompts are built, and each one's result is
handed back the step it finishes, not when its batch's slowest reply is done. Live requests carry
priority 0 and bulk ones 1 under vLLM's priority scheduling, so a live turn joins the next engine
step ahead of any bulk request still waiting. At most `max_inflight` bulk requests are inside the
engine at once (live ones are never held back), and bulk requests are admitted only as fast as the
engine starts them (at most `prefill_budget` prompt tokens admitted but not yet started), so vLLM's
own waiting queue never holds more than one step of bulk prefill. The rest wait here, in arrival
order. While a live request is inside, no new bulk request is admitted (for at most LIVE_SHIELD_S):
the engine's steps then hold the live turn and the decoding bulk ones, not long prefills of new
bulk prompts. Bulk requests already decoding share every step with it; they are not preempted.

The engine core is its own process (vLLM's multiprocessing client), so while it computes, this
process's threads embed, retrieve, build prompts and write results. `busy` records when at least
one request was inside the engine: the benchmark's busy share comes from it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

LIVE, BULK = 0, 1  # vLLM priority: lower runs first
LIVE_SHIELD_S = 10.0  # the longest a stream of live turns may hold new bulk admissions back


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    seconds: float = 0.0  # from admission to the last token


@dataclass
class _Job:
    token_ids: list[int]
    params: Any  # vllm.SamplingParams
    priority: int
    future: Future[Generation]
    lora: Any = None  # vllm.lora.request.LoRARequest, or None for the base model
    submitted: float = field(default_factory=time.perf_counter)
    request_id: str = ""
    on_text: Callable[[str], None] | None = None  # told each new piece of the reply (live streaming)
    shown: str = ""  # what on_text has been told so far


class BusyClock:
    """Wall time with at least one request inside the engine, and the idle gaps between."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None
        self.busy_s = 0.0
        self.gaps: list[tuple[float, float]] = []  # (start, end) of each idle gap, perf_counter
        self._idle_since: float | None = time.perf_counter()

    def mark(self, busy: bool) -> None:
        now = time.perf_counter()
        with self._lock:
            if busy and self._since is None:
                self._since = now
                if self._idle_since is not None:
                    self.gaps.append((self._idle_since, now))
                self._idle_since = None
            elif not busy and self._since is not None:
                self.busy_s += now - self._since
                self._since = None
                self._idle_since = now

    def snapshot(self) -> tuple[float, list[tuple[float, float]]]:
        """(busy seconds so far, idle gaps so far)."""
        with self._lock:
            running = time.perf_counter() - self._since if self._since is not None else 0.0
            return self.busy_s + running, list(self.gaps)


class EngineLoop:
    """Owns an LLMEngine from one thread; any thread may submit requests and wait for their futures."""

    def __init__(
        self, engine: Any, max_inflight: int, is_dead: Any, on_death: Any = None, prefill_budget: int = 4096
    ) -> None:
        self.engine = engine
        self.max_inflight = max_inflight
        self.prefill_budget = prefill_budget
        self._is_dead = is_dead  # () -> bool: the client says its engine core is gone
        self._on_death = on_death  # () -> None, told once
        self._cond = threading.Condition()
        self._inbox: deque[_Job] = deque()
        self._held: deque[_Job] = deque()  # bulk requests waiting for room in the engine
        self._inside: dict[str, _Job] = {}
        self._bulk_inside = 0
        self._unstarted: dict[str, int] = {}  # bulk requests inside but not yet prefilled: prompt tokens
        self._live_since: float | None = None  # when the live requests now inside began to hold bulk back
        self._ids = itertools.count()
        self._death: BaseException | None = None
        self.busy = BusyClock()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # --- callers -------------------------------------------------------------------------------

    def submit(
        self, requests: Iterable[tuple[list[int], Any, int, Any]], on_text: Sequence[Any] = ()
    ) -> list[Future[Generation]]:
        """Queue (token ids, sampling params, priority, LoRA request or None) requests; one future
        each, in order. `on_text[i]`, when given and not None, is told request i's new text as the
        engine writes it."""
        jobs = [_Job(ids, params, priority, Future(), lora) for ids, params, priority, lora in requests]
        for job, hook in zip(jobs, on_text, strict=False):
            job.on_text = hook
        with self._cond:
            if self._death is not None:
                for job in jobs:
                    job.future.set_exception(self._dead_error())
            else:
                self._inbox.extend(jobs)
                self._cond.notify()
        return [job.future for job in jobs]

    def wait(
        self, futures: Sequence[Future[Generation]], timeout: float | None = None
    ) -> list[Future[Generation]]:
        """Block until at least one of `futures` is done (or the engine died); returns the done ones.

        Waits in short slices and checks the engine's liveness between them, because vLLM 0.32's
        synchronous client can block for ever when its engine core dies mid-step.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done = [f for f in futures if f.done()]
            if done or not futures:
                return done
            if self._is_dead():
                self._die(RuntimeError("the engine core process is gone"))
            if deadline is not None and time.monotonic() >= deadline:
                return []
            with self._cond:
                self._cond.wait(0.05)

    @property
    def dead(self) -> BaseException | None:
        return self._death

    def inside(self) -> int:
        with self._cond:
            return len(self._inside)

    # --- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._inside or self._held) and self._death is None:
                        self.busy.mark(False)
                        self._cond.wait(0.5)
                    if self._death is not None:
                        return
                    arrived = list(self._inbox)
                    self._inbox.clear()
                for job in arrived:
                    if job.priority == LIVE:
                        self._admit(job)
                    else:
                        self._held.append(job)
                while self._room_for_bulk():
                    self._admit(self._held.popleft())
                if not self._inside:
                    continue
                self.busy.mark(True)
                for out in self.engine.step():
                    self._unstarted.pop(_own_id(out.request_id), None)
                    self._tell_text(out)
                    if out.finished:
                        self._finish(out)
        except BaseException as exc:  # the engine died (EngineDeadError) or something worse
            self._die(exc)

    def _room_for_bulk(self) -> bool:
        """Whether the next held bulk request may join the engine now."""
        if not self._held or self._bulk_inside >= self.max_inflight or self._shielding():
            return False
        waiting = sum(self._unstarted.values())
        return not waiting or waiting + len(self._held[0].token_ids) <= self.prefill_budget

    def _shielding(self) -> bool:
        """Whether new bulk admissions wait for the live requests inside the engine."""
        live_inside = len(self._inside) - self._bulk_inside
        if not live_inside:
            self._live_since = None
            return False
        now = time.perf_counter()
        if self._live_since is None:
            self._live_since = now
        return now - self._live_since < LIVE_SHIELD_S

    def _admit(self, job: _Job) -> None:
        job.request_id = f"r{next(self._ids)}"
        try:
            self.engine.add_request(
                job.request_id,
                {"prompt_token_ids": job.token_ids},
                job.params,
                lora_request=job.lora,
                priority=job.priority,
            )
        except Exception as exc:  # this request's fault (too long, bad params): it fails alone
            if _is_engine_death(exc):
                raise
            job.future.set_exception(exc)
            return
        with self._cond:
            self._inside[job.request_id] = job
            if job.priority != LIVE:
                self._bulk_inside += 1
                self._unstarted[job.request_id] = len(job.token_ids)

    def _tell_text(self, out: Any) -> None:
        """Hand a streamed request's new text to its hook: the reply as it will be stored (stripped),
        so the pieces add up to it; whitespace at the end waits until text follows it."""
        job = self._inside.get(_own_id(out.request_id))
        if job is None or job.on_text is None:
            return
        visible = out.outputs[0].text.strip()
        if len(visible) > len(job.shown) and visible.startswith(job.shown):
            piece, job.shown = visible[len(job.shown) :], visible
            try:
                job.on_text(piece)
            except Exception:  # a stream is a convenience: it never fails the request
                logger.warning("stream hook failed for %s", job.request_id, exc_info=True)

    def _finish(self, out: Any) -> None:
        with self._cond:
            job = self._inside.pop(_own_id(out.request_id), None)
            if job is None:
                logger.warning("engine returned an unknown request %s", out.request_id)
                return
            self._bulk_inside -= job.priority != LIVE
            self._unstarted.pop(job.request_id, None)
            self._cond.notify_all()
        completion = out.outputs[0]
        job.future.set_result(
            Generation(
                text=completion.text.strip(),
                prompt_tokens=len(job.token_ids),
                completion_tokens=len(completion.token_ids),
                finish_reason=completion.finish_reason,
                seconds=time.perf_counter() - job.submitted,
            )
        )

    def _die(self, exc: BaseException) -> None:
        with self._cond:
            if self._death is not None:
                return
            self._death = exc
            doomed = list(self._inbox) + list(self._held) + list(self._inside.values())
            self._inbox.clear()
            self._held.clear()
            self._inside.clear()
            self._unstarted.clear()
            self._cond.notify_all()
        logger.error("the engine died: %r; failing %d requests in flight", exc, len(doomed))
        self.busy.mark(False)
        if self._on_death is not None:
            self._on_death()
        for job in doomed:
            if not job.future.done():
                job.future.set_exception(self._dead_error())

    def _dead_error(self) -> BaseException:
        from worker.engine import EngineDead

        return EngineDead(f"the engine died: {self._death!r}")


def _own_id(request_id: str) -> str:
    """The id we gave a request (ours hold no "-"; vLLM may append "-<suffix>" to it internally)."""
    return request_id.split("-", 1)[0]


def _is_engine_death(exc: BaseException) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, EngineDeadError)
