"""The engine, always full: one thread drives vLLM's engine (`add_request` / `step`), every batch feeds it.

Requests join the running engine as soon as their prompts are built, and each one's result is
handed back the step it finishes, not when its batch's slowest reply is done. Live requests carry
priority 0 and bulk ones 1 under vLLM's priority scheduling, so a live turn joins the next engine
step ahead of any bulk request still waiting. At most `max_inflight` bulk requests are inside the
engine at once (live ones are never held back), and bulk requests are admitted only as fast as the
engine starts them (at most `prefill_budget` prompt tokens admitted but not yet started), so vLLM's
own waiting queue never holds more than one step of bulk prefill. The rest wait here, in arrival
order. A request marked `alone` (its turn was inside an engine that died) joins only an empty engine
and nothing joins while it is inside, so a request that kills the engine again is known to be the
one that did. Once one waits, nothing new joins (live requests neither): the engine drains, the alone
request runs, then the live requests that arrived meanwhile join before the next alone one waits
for its drain. Neither waits longer than one drain and one alone request. While a live request is
inside, no new bulk request is admitted (a hold of LIVE_SHIELD_S at most, then BULK_WINDOW_S in which
bulk joins freely, then a hold again, so steady live traffic neither loses its shield for good nor
starves bulk): the engine's steps then hold the
live turn and the decoding bulk ones, not long prefills of new bulk prompts. Bulk requests already
decoding share every step with it; they are not preempted. The worker announces a live turn when its
message arrives (`expect_live`, before its flush, claim, embedding and prompt): from then until a live
request joins, or for at most `live_notice_s`, no new bulk request joins a busy engine, so the step
the live prefill joins seldom carries a bulk prefill admitted just before it.

The engine core is its own process (vLLM's multiprocessing client), so while it computes, this
process's threads embed, retrieve, build prompts and write results. `busy` records when at least
one request was inside the engine: the benchmark's busy share comes from it.

When the engine dies, every future resolves with EngineDead. `in_engine=True` marks the requests
that may have killed it: those inside that had not yet returned any output (joining, or in their
prefill: a request that crashes vLLM almost always does so in the first steps after it joins), or
every request inside when all of them were already decoding, and the engine call (add_lora) that
was running. Requests decoding beside a joining one, and all others (waiting here, or arriving
later, calls queued behind the running one too) get in_engine=False. An engine that is alive but
makes no step progress for `stall_s` while requests are inside, or while one engine call (add_lora)
runs, counts as dead: vLLM's synchronous client can block for ever when its core hangs or dies.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from core.text import storable_output

logger = logging.getLogger(__name__)

LIVE, BULK = 0, 1  # vLLM priority: lower runs first
LIVE_SHIELD_S = 10.0  # the longest a stream of live turns may hold new bulk admissions back at once
BULK_WINDOW_S = 2.0  # then bulk joins freely this long before live turns may hold it again
# The longest a live turn announced by the worker (its message arrived) holds new bulk admissions back
# before it reaches the engine: about its wait for a flush plus its claim, embedding and prompt
# (MLCHAT_LIVE_NOTICE_S).
LIVE_NOTICE_S = 0.5
# How often the loop looks for a step's outputs while it waits for them: a new request wakes it at
# once, and the engine core steps on without it, so this only delays collecting outputs a little.
OUTPUT_POLL_S = 0.002
# A caller's wait() looks at the engine's health this often; a result set meanwhile wakes it at once.
WAIT_SLICE_S = 0.05


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    seconds: float = 0.0  # from submission to the last token
    # From submission until the engine took the request (add_request), and until its first token.
    admit_s: float = 0.0
    first_token_s: float = 0.0
    structured: Any = None  # a structured reply, parsed (worker/structured.py); None for free text
    emotion: str | None = None  # the emotion an NPC reply chose (only the NPC shape has one)


def reply_text(text: str, *, keep_edges: bool = False) -> str:
    """The engine's text as a reply keeps it (and its stream shows it): no NUL, which PostgreSQL's
    text and jsonb cannot hold (it would fail the store of every reply stored with it), and no
    whitespace around it unless `keep_edges` (a regex reply: its pattern may ask for that
    whitespace, and the reply is checked against the whole pattern)."""
    kept = storable_output(text)
    return kept if keep_edges else kept.strip()


def _keeps_edges(params: Any) -> bool:
    """Whether a request's reply is a regex reply (vLLM's structured outputs with a regex)."""
    return getattr(getattr(params, "structured_outputs", None), "regex", None) is not None


@dataclass
class _Job:
    token_ids: list[int]
    params: Any  # vllm.SamplingParams
    priority: int
    future: Future[Generation]
    lora: Any = None  # vllm.lora.request.LoRARequest, or None for the base model
    alone: bool = False  # joins only an empty engine, and nothing joins while it is inside
    submitted: float = field(default_factory=time.perf_counter)
    request_id: str = ""
    on_text: Callable[[str], None] | None = None  # told each new piece of the reply (live streaming)
    # A live request whose joining ends its turn's announcement (expect_live): a turn's first
    # candidate, marked by the pipeline; not its other candidates (best of n), nor a regeneration.
    ends_notice: bool = False
    shown: str = ""  # what on_text has been told so far
    started: bool = False  # a step has returned output for it: it is past its prefill
    admitted: float = 0.0  # perf_counter when add_request was called
    first_output: float = 0.0  # perf_counter when a step first returned output for it
    cancelled: bool = False  # marked by EngineLoop.cancel; the loop's thread drops or aborts it
    cache_salt: str | None = None  # who may share its cached prompt prefix (GenerationRequest.cache_salt)


GAPS_KEPT = 50_000
ABORTED_KEPT = 10_000


class BusyClock:
    """Wall time with at least one request inside the engine, and the idle gaps between."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None
        self.busy_s = 0.0
        # (start, end) of each recent idle gap, perf_counter: a benchmark reads those of its window; a
        # live-only worker adds one a turn, so only the newest are kept.
        self.gaps: deque[tuple[float, float]] = deque(maxlen=GAPS_KEPT)
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
        self,
        engine: Any,
        max_inflight: int,
        is_dead: Any,
        on_death: Any = None,
        prefill_budget: int = 4096,
        stall_s: float | None = None,
        max_loras: int = 0,
    ) -> None:
        self.engine = engine
        self.max_inflight = max_inflight
        self.prefill_budget = prefill_budget
        # The engine's adapter slots (0: none served): bulk leaves one free for a live turn's adapter.
        self.max_loras = max_loras
        self.stall_s = stall_s  # None: never declared stalled
        self._is_dead = is_dead  # () -> bool: the client says its engine core is gone
        self._on_death = on_death  # (the death) -> None, told once
        # The process is exiting (worker/engine.py::_shutdown): vLLM marks its core dead as it stops
        # it, which is no death to report.
        self.shutting = False
        self._cond = threading.Condition()
        self._inbox: deque[_Job] = deque()
        # Every job stays in one of these (or in _inside) until its future resolves, so a death at
        # any point finds it.
        self._live: deque[_Job] = deque()  # live requests waiting for the engine (behind an alone one)
        self._held: deque[_Job] = deque()  # bulk requests waiting for room in the engine
        self._alone: deque[_Job] = deque()  # requests waiting for an empty engine
        self._calls: deque[tuple[Any, Future[Any]]] = deque()  # (engine method, its future)
        self._cancelled: list[_Job] = []  # marked by cancel(), dropped or aborted by the loop's thread
        self._aborted: set[str] = set()  # aborted in the engine: a last output of theirs is no stranger
        self._progress_at = time.monotonic()  # the last step that returned, or the first admission
        self._inside: dict[str, _Job] = {}
        self._bulk_inside = 0
        self._unstarted: dict[str, int] = {}  # bulk requests inside but not yet prefilled: prompt tokens
        self._live_since: float | None = None  # when live requests inside (or announced) began to hold bulk
        self._bulk_window_until = 0.0  # after a full hold: bulk joins freely until then
        self._call_since: float | None = None  # when the engine call now running began
        self._live_owed = False  # an alone request just ran: the live ones that waited for it go first
        # Deadlines (perf_counter) of live turns announced by expect_live and not yet inside, oldest
        # first; while one runs, no new bulk request joins a busy engine.
        self._live_notices: deque[float] = deque()
        self.live_notice_s = LIVE_NOTICE_S
        self._ids = itertools.count()
        self._death: BaseException | None = None
        self.busy = BusyClock()
        if _outputs_ready(engine) is None:
            logger.warning(
                "engine loop: this vLLM client has no outputs queue to watch; requests join only "
                "between step() calls, so a live turn waits one step longer"
            )
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # --- callers -------------------------------------------------------------------------------

    def submit(
        self,
        requests: Iterable[tuple[list[int], Any, int, Any]],
        *,
        alone: bool = False,
        on_text: Sequence[Any] = (),
        ends_notice: Sequence[bool] = (),
        salts: Sequence[str | None] = (),
    ) -> list[Future[Generation]]:
        """Queue (token ids, sampling params, priority, LoRA request or None) requests; one future
        each, in order. `alone`: each runs in an otherwise empty engine. `on_text[i]`, when given and
        not None, is told request i's new text as the engine writes it. `ends_notice[i]`: live request
        i is the one its turn's announcement waits for (a turn's first candidate: a turn is announced
        once); none is, unless given. `salts[i]`: request i's cache salt, when given."""
        jobs = [
            _Job(ids, params, priority, Future(), lora, alone) for ids, params, priority, lora in requests
        ]
        for job in jobs:  # a waiter wakes once the result is set, not at its next 50 ms look (review)
            job.future.add_done_callback(self._wake)
        # Paired strictly: one list out of step would stream one turn's text into another's.
        for job, hook in zip(jobs, on_text, strict=True) if on_text else ():
            job.on_text = hook
        for job, salt in zip(jobs, salts, strict=True) if salts else ():
            job.cache_salt = salt
        if ends_notice:
            for job, ends in zip(jobs, ends_notice, strict=True):
                job.ends_notice = ends
        with self._cond:
            if self._death is not None:
                for job in jobs:
                    job.future.set_exception(self._dead_error(in_engine=False))
            else:
                self._inbox.extend(jobs)
                self._cond.notify_all()  # the loop's thread, not only a caller in wait()
        return [job.future for job in jobs]

    def expect_live(self) -> None:
        """A live turn is on its way (its message reached the worker; its prompt is not built yet):
        until a live request joins, or `live_notice_s` passes, no new bulk request joins an engine
        that has requests inside, so the step the live prefill joins seldom carries a bulk prefill
        too (one admitted before the announcement may still share it)."""
        if self.live_notice_s <= 0:
            return
        with self._cond:
            now = time.perf_counter()
            self._prune_notices(now)
            self._live_notices.append(now + self.live_notice_s)

    def call(self, method: str, *args: Any) -> Future[Any]:
        """Run `engine.<method>(*args)` on the loop's thread, between steps (vLLM's client is not
        thread-safe); its result, or its exception, on the future."""
        future: Future[Any] = Future()
        future.add_done_callback(self._wake)
        with self._cond:
            if self._death is not None:
                future.set_exception(self._dead_error(in_engine=False))
            else:
                self._calls.append((lambda: getattr(self.engine, method)(*args), future))
                self._cond.notify_all()  # the loop's thread, not only a caller in wait()
        return future

    def cancel(self, futures: Iterable[Future[Any]]) -> int:
        """Stop the requests of these futures: one still waiting leaves its queue, one inside the
        engine is aborted there, and its stream is told nothing more. The loop's thread does it (it
        owns the queues and vLLM's client) before its next admission or step; their futures then fail
        with RequestCancelled. Returns how many were marked (done ones are left alone). A batch that
        gives its turns back calls this, so their requests neither go on taking engine steps and bulk
        room nor keep writing a stream under a claim that no longer holds the turn."""
        wanted = {id(f) for f in futures if not f.done()}
        if not wanted:
            return 0
        marked = 0
        with self._cond:
            if self._death is not None:
                return 0  # every future was resolved by the death
            for job in [*self._inbox, *self._live, *self._held, *self._alone, *self._inside.values()]:
                if id(job.future) in wanted and not job.cancelled:
                    job.cancelled = True  # its stream hears nothing more from now on
                    self._cancelled.append(job)
                    marked += 1
            self._cond.notify_all()
        return marked

    def wait(self, futures: Sequence[Future[Any]], timeout: float | None = None) -> list[Future[Any]]:
        """Block until at least one of `futures` is done or `timeout` passes; returns the done ones.
        A death (reported, or a stall past `stall_s`) resolves every future, so this never blocks on
        a dead engine.

        Waits in short slices and checks the engine's health between them, because vLLM 0.32's
        synchronous client can block for ever when its engine core dies or hangs mid-step.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done = [f for f in futures if f.done()]
            if done or not futures:
                return done
            self.check_health()
            if deadline is not None and time.monotonic() >= deadline:
                return []
            with self._cond:  # looked at under the lock `_wake` takes: a result set since is seen
                if not any(f.done() for f in futures):
                    self._cond.wait(WAIT_SLICE_S)

    def _wake(self, _: Future[Any]) -> None:
        with self._cond:  # reentrant: a future resolved under the lock wakes its waiters too
            self._cond.notify_all()

    def check_health(self) -> None:
        """Declare the engine dead if its client says so, or if requests are inside and no step has
        returned for `stall_s`."""
        if self._death is not None:
            return
        if self._is_dead():
            self._die(RuntimeError("the engine core process is gone"))
            return
        with self._cond:
            now = time.monotonic()
            silent_s = now - self._progress_at if self._inside else 0.0
            call_s = now - self._call_since if self._call_since is not None else 0.0
        if self.stall_s is None:
            return
        if call_s > self.stall_s:
            self._die(EngineStalled(f"an engine call has not returned for {call_s:.0f} s"))
        elif silent_s > self.stall_s:
            self._die(EngineStalled(f"no engine step returned for {silent_s:.0f} s with requests inside"))

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
                    while not self._has_work() and self._death is None:
                        self.busy.mark(False)
                        # An idle engine's core can die too (killed, the GPU lost): looked at each
                        # tick, or the health check stays green until a turn runs into it.
                        if not self._cond.wait(0.5) and not self.shutting and self._is_dead():
                            break
                    if self._death is not None:
                        return
                    core_gone = not self._has_work()
                    self._sort_inbox()
                if core_gone:
                    self._die(RuntimeError("the engine core process is gone (found while idle)"))
                    return
                self._run_calls()
                self._drop_cancelled()
                self._admit_waiting()
                if not self._inside:
                    continue
                self.busy.mark(True)
                self._admit_until_outputs()
                if self._death is not None:  # declared dead (stalled) while it waited for outputs
                    return
                if not self._inside:  # cancelled while it waited: nothing to step
                    continue
                outputs = self.engine.step()
                with self._cond:
                    if self._death is not None:  # declared dead (stalled) while this step blocked
                        return
                    self._progress_at = time.monotonic()
                for out in outputs:
                    self._started(_own_id(out.request_id))
                    self._tell_text(out)
                    if out.finished:
                        self._finish(out)
        except BaseException as exc:  # the engine died (EngineDeadError) or something worse
            self._die(exc)

    def _sort_inbox(self) -> None:
        """Move submitted jobs to their waiting queue (the caller holds the lock, so a job is always
        somewhere _die looks)."""
        while self._inbox:
            job = self._inbox.popleft()
            self._queue_of(job).append(job)

    def _admit_until_outputs(self) -> None:
        """Admit what arrives until the engine has a step's outputs to hand back.

        vLLM's engine core (its own process) steps on its own and queues each step's outputs;
        `step()` only collects them. A request added while a step runs joins the core's next step;
        one added only after `step()` returns joins the step after that, a whole (bulk-laden) step
        later. Without a client whose outputs can be looked at, this returns at once."""
        ready = _outputs_ready(self.engine)
        if ready is None:
            return
        while not ready():
            with self._cond:
                if self._death is not None:
                    return
                if not self._inbox:
                    self._cond.wait(OUTPUT_POLL_S)  # a submit wakes it at once
                arrived = bool(self._inbox)
                self._sort_inbox()
            if self._cancelled:
                self._drop_cancelled()
                if not self._inside:  # every request inside was cancelled: no output will come
                    return
            if arrived:  # room for held requests only opens when a step returns: nothing else to admit
                self._admit_waiting()

    def _queue_of(self, job: _Job) -> deque[_Job]:
        if job.alone:
            return self._alone
        return self._live if job.priority == LIVE else self._held

    def _has_work(self) -> bool:
        return bool(
            self._inbox
            or self._inside
            or self._held
            or self._live
            or self._alone
            or self._calls
            or self._cancelled
        )

    def _drop_cancelled(self) -> None:
        """On the loop's thread: take the cancelled jobs out of their queues and the engine's books,
        abort those inside in vLLM (before any further step or admission), then fail their futures."""
        with self._cond:
            jobs, self._cancelled = self._cancelled, []
            if not jobs:
                return
            gone = {id(job) for job in jobs}
            for waiting in (self._inbox, self._live, self._held, self._alone):
                if any(id(job) in gone for job in waiting):
                    kept = [job for job in waiting if id(job) not in gone]
                    waiting.clear()
                    waiting.extend(kept)
            inside = [job for job in jobs if self._forget(job.request_id) is not None]
            aborts = [job.request_id for job in inside]
            self._live_owed = self._live_owed or any(job.alone for job in inside)
            if len(self._aborted) > ABORTED_KEPT:
                self._aborted.clear()  # vLLM seldom returns an aborted request's output at all
            self._aborted.update(aborts)
        try:
            if aborts:
                self.engine.abort_request(aborts)
        finally:  # an abort that raises (the engine died) still resolves them: _die no longer sees them
            for job in jobs:
                _resolve(job.future, error=RequestCancelled("cancelled: its batch gave its turns back"))

    def _started(self, request_id: str) -> None:
        """The engine returned output for this request: its prefill is done."""
        self._unstarted.pop(request_id, None)
        job = self._inside.get(request_id)
        if job is not None and not job.started:
            job.started = True
            job.first_output = time.perf_counter()

    def _run_calls(self) -> None:
        while self._calls:
            method, future = self._calls[0]
            with self._cond:
                self._call_since = time.monotonic()  # a call that hangs stalls the engine as a step does
            try:
                result = method()
            except Exception as exc:  # the call's own failure (an adapter that does not load)
                if _is_engine_death(exc):
                    raise
                if self._death is None:  # else declared dead (stalled) while it ran: resolved already
                    future.set_exception(exc)
            else:
                if self._death is None:
                    future.set_result(result)
            with self._cond:
                self._call_since = None
                if self._calls and self._calls[0][1] is future:  # else a death already cleared it
                    self._calls.popleft()

    def _admit_waiting(self) -> None:
        """Admit what may join the engine now: nothing beside a request that runs alone; while an
        alone request waits, nothing new (the engine drains, then it joins), except the live requests
        that waited for the alone request before it; otherwise live requests at once and bulk while
        there is room."""
        if self._alone_inside():
            return
        if self._alone and not self._live_owed:
            if not self._inside:
                self._admit(self._alone[0], self._alone)
            return
        self._live_owed = False
        while self._live:
            self._admit(self._live[0], self._live)
        if self._alone:
            return
        shielding = self._shielding()  # once a pass: a hold that lapses lets this whole pass in
        while self._room_for_bulk(shielding) or (self._base_model_first() and self._room_for_bulk(shielding)):
            self._admit(self._held[0], self._held)

    def _alone_inside(self) -> bool:
        return any(job.alone for job in self._inside.values())

    def _room_for_bulk(self, shielding: bool) -> bool:
        """Whether the next held bulk request may join the engine now."""
        if not self._held or self._bulk_inside >= self.max_inflight or shielding:
            return False
        if self._last_adapter_slot(self._held[0]):
            return False
        waiting = sum(self._unstarted.values())
        return not waiting or waiting + len(self._held[0].token_ids) <= self.prefill_budget

    def _base_model_first(self) -> bool:
        """While the first held bulk request waits for an adapter slot, the first base-model request
        behind it goes before it (it takes no slot): the waiting adapter no longer held every bulk
        request back (review: the engine drained each time a new adapter came first). True when one
        was moved."""
        if not self._held or not self._last_adapter_slot(self._held[0]):
            return False
        with self._cond:
            base = next((job for job in self._held if job.lora is None), None)
            if base is None:
                return False
            self._held.remove(base)
            self._held.appendleft(base)
        return True

    def _last_adapter_slot(self, job: _Job) -> bool:
        """Whether a bulk request would take the engine's last adapter slot: vLLM schedules no waiting
        request, a live one either, whose adapter would pass max_loras until every running request of
        one of the others has finished (its scheduler skips it; bulk replies are not preempted), so a
        player talking to an adapted character waited out four other adapters' bulk replies (review).
        Bulk keeps one slot free; with one slot in all there is none to keep."""
        if self.max_loras < 2 or job.lora is None:
            return False
        running = {inside.lora.lora_int_id for inside in self._inside.values() if inside.lora is not None}
        return job.lora.lora_int_id not in running and len(running) + 1 >= self.max_loras

    def _shielding(self) -> bool:
        """Whether new bulk admissions wait for the live requests inside the engine, or for an
        announced one on its way to a busy engine. A hold that has lasted LIVE_SHIELD_S opens a
        window of BULK_WINDOW_S in which bulk joins freely, then holds again: under steady live
        traffic (whose announcements bridge the gaps between turns) live turns keep their shield
        and bulk keeps a share of the admissions."""
        live_inside = len(self._inside) - self._bulk_inside
        if not live_inside and not (self._inside and self._live_noticed()):
            self._live_since = None
            return False
        now = time.perf_counter()
        if now < self._bulk_window_until:
            return False
        if self._live_since is None:
            self._live_since = now
        if now - self._live_since < LIVE_SHIELD_S:
            return True
        self._bulk_window_until = now + BULK_WINDOW_S
        self._live_since = None  # the next hold starts when the window closes
        return False

    def _live_noticed(self) -> bool:
        """Whether a live turn announced by expect_live is still on its way (the caller holds the
        lock or runs on the loop's thread)."""
        with self._cond:
            self._prune_notices(time.perf_counter())
            return bool(self._live_notices)

    def _prune_notices(self, now: float) -> None:
        """Drop the announcements that lapsed (the caller holds the lock): turns that never came
        (a duplicate, one claimed elsewhere, a failed one) leave nothing behind."""
        while self._live_notices and self._live_notices[0] <= now:
            self._live_notices.popleft()

    def _admit(self, job: _Job, waiting: deque[_Job]) -> None:
        """Hand `job`, the first of `waiting`, to the engine. It counts as inside from the moment
        add_request is called, unless that call finds the engine dead: vLLM's client checks its
        liveness flag before it sends anything (`ensure_alive`), so such a request never reached the
        core, and the ones inside when it died count the death, not it."""
        with self._cond:
            if job.cancelled:  # marked since it was picked: the next _drop_cancelled resolves it
                _drop_first(waiting, job)
                return
        job.request_id = f"r{next(self._ids)}"
        job.admitted = time.perf_counter()
        with self._cond:
            if not self._inside:
                self._progress_at = time.monotonic()  # the stall clock runs only with requests inside
            self._inside[job.request_id] = job
            if job.priority == LIVE and job.ends_notice:
                self._prune_notices(time.perf_counter())
                if self._live_notices:
                    self._live_notices.popleft()  # the oldest announced live turn still on its way has come
            if job.priority != LIVE:
                self._bulk_inside += 1
                self._unstarted[job.request_id] = len(job.token_ids)
        try:
            self.engine.add_request(
                job.request_id,
                {"prompt_token_ids": job.token_ids}
                | ({"cache_salt": job.cache_salt} if job.cache_salt else {}),
                job.params,
                lora_request=job.lora,
                priority=job.priority,
            )
        except Exception as exc:  # this request's fault (too long, bad params): it fails alone
            if _is_engine_death(exc):
                with self._cond:
                    self._forget(job.request_id)  # still in `waiting`: _die fails it as never inside
                raise
            with self._cond:
                self._forget(job.request_id)
                _drop_first(waiting, job)
            _resolve(job.future, error=exc)
            return
        with self._cond:
            _drop_first(waiting, job)

    def _forget(self, request_id: str) -> _Job | None:
        """Take a request out of the engine's books (the caller holds the lock)."""
        job = self._inside.pop(request_id, None)
        if job is not None:
            self._bulk_inside -= job.priority != LIVE
            self._unstarted.pop(request_id, None)
            if len(self._inside) == self._bulk_inside and not self._live_notices:
                self._live_since = None  # the live episode ended: the next one's hold starts afresh
        return job

    def _tell_text(self, out: Any) -> None:
        """Hand a streamed request's new text to its hook: the reply as it will be stored (stripped),
        so the pieces add up to it; whitespace at the end waits until text follows it."""
        job = self._inside.get(_own_id(out.request_id))
        if job is None or job.on_text is None or job.cancelled:
            return
        visible = reply_text(out.outputs[0].text, keep_edges=_keeps_edges(job.params))
        if len(visible) > len(job.shown) and visible.startswith(job.shown):
            piece, job.shown = visible[len(job.shown) :], visible
            try:
                job.on_text(piece)
            except Exception:  # a stream is a convenience: it never fails the request
                logger.warning("stream hook failed for %s", job.request_id, exc_info=True)

    def _finish(self, out: Any) -> None:
        with self._cond:
            job = self._forget(_own_id(out.request_id))
            if job is None:
                if _own_id(out.request_id) not in self._aborted:
                    logger.warning("engine returned an unknown request %s", out.request_id)
                return
            self._live_owed = self._live_owed or job.alone
            self._cond.notify_all()
        completion = out.outputs[0]
        if job.future.done():  # a death on another thread resolved it first
            return
        if completion.finish_reason == "error":
            # vLLM's retryable request-level error (a grammar that failed to compile in the engine, a
            # KV load that failed): nothing was generated, whatever text came with it.
            _resolve(job.future, error=EngineRequestError("the engine ended the request with an error"))
            return
        if completion.finish_reason == "abort":
            # Not this loop's cancel (those are forgotten first): the engine core aborts what it holds
            # when a stop signal reaches it too (a process group's, a terminal's Ctrl-C). Its text is
            # cut short: the turn goes back uncharged, as after any death not its fault.
            from worker.engine import EngineDead

            _resolve(job.future, error=EngineDead("the engine core aborted the request (it is stopping)"))
            return
        job.future.set_result(
            Generation(
                text=reply_text(completion.text, keep_edges=_keeps_edges(job.params)),
                prompt_tokens=len(job.token_ids),
                completion_tokens=len(completion.token_ids),
                finish_reason=completion.finish_reason,
                seconds=time.perf_counter() - job.submitted,
                admit_s=job.admitted - job.submitted,
                first_token_s=(job.first_output or time.perf_counter()) - job.submitted,
            )
        )

    def _die(self, exc: BaseException) -> None:
        with self._cond:
            if self._death is not None:
                return
            self._death = exc
            inside = list(self._inside.values())
            waiting = [*self._inbox, *self._live, *self._held, *self._alone, *self._cancelled]
            calls = [future for _, future in self._calls]
            # The engine call running when it died may be what killed it (an adapter that crashes
            # the engine as it loads); calls still queued behind it were never inside.
            running_call = calls[0] if calls and self._call_since is not None else None
            # A call that hung past the stall limit is what stopped the engine: the requests inside
            # were present, not suspects (poison review: a hung adapter load charged a death to every
            # request inside, and sent each alone). Any other death while a call ran keeps its
            # joiners suspects: a multiprocess core steps on its own, beside the call (review).
            call_stalled = running_call is not None and isinstance(exc, EngineStalled)
            suspects = [] if call_stalled else [j for j in inside if not j.started] or inside
            for queue in (self._inbox, self._live, self._held, self._alone, self._calls):
                queue.clear()
            self._cancelled = []
            self._inside.clear()
            self._unstarted.clear()
            self._cond.notify_all()
        logger.error(
            "the engine died: %r; failing %d requests inside it (%d joining: suspects), %d waiting",
            exc,
            len(inside),
            len(suspects),
            len(waiting),
            # Anything but the engine's own death or a stall is this loop's error (or vLLM's, short of
            # a death) taken for one: its traceback is what says where to look.
            exc_info=None if isinstance(exc, EngineStalled) or _is_engine_death(exc) else exc,
        )
        self.busy.mark(False)
        if self._on_death is not None and not self.shutting:
            self._on_death(exc)
        # Suspects first: a job being admitted is in both, and it was in the engine when it died. The
        # loop's thread may resolve one meanwhile (an admission's own failure): _resolve lets it be.
        for job in suspects:
            _resolve(job.future, error=self._dead_error(in_engine=True))
        for job in inside:
            _resolve(job.future, error=self._dead_error(in_engine=False, present=True))
        for job in waiting:
            _resolve(job.future, error=self._dead_error(in_engine=False))
        for future in calls:
            _resolve(future, error=self._dead_error(in_engine=future is running_call))

    def _dead_error(self, *, in_engine: bool, present: bool = False) -> BaseException:
        from worker.engine import EngineDead

        return EngineDead(f"the engine died: {_said(self._death)}", in_engine=in_engine, present=present)


def _said(death: BaseException | None) -> str:
    """A death as every turn inside it is told (other tenants' among them): its kind, and the text
    only of this loop's own stall; another error's text may quote the request it met (tenant review),
    and the log keeps it whole."""
    if isinstance(death, EngineStalled):
        return repr(death)
    return type(death).__name__


class RequestCancelled(RuntimeError):
    """The request was cancelled (EngineLoop.cancel) before it finished."""


class EngineRequestError(RuntimeError):
    """The engine ended one request with an error of its own (finish_reason "error"); retryable."""


class EngineStalled(RuntimeError):
    """The engine is alive but no step has returned for longer than the loop allows."""


def _outputs_ready(engine: Any) -> Callable[[], bool] | None:
    """Whether the engine's client has a step's outputs queued (vLLM's multiprocessing client keeps
    them in `outputs_queue`); None when the client has no such queue (an in-process engine)."""
    outputs = getattr(getattr(engine, "engine_core", None), "outputs_queue", None)
    if outputs is None or not callable(getattr(outputs, "empty", None)):
        return None
    return lambda: not outputs.empty()


def _resolve(future: Future[Any], *, error: BaseException) -> None:
    """Fail `future` unless it is resolved already (a death on another thread may have been first)."""
    with contextlib.suppress(InvalidStateError):
        future.set_exception(error)


def _drop_first(waiting: deque[_Job], job: _Job) -> None:
    if waiting and waiting[0] is job:  # else a death (on another thread) already cleared the queue
        waiting.popleft()


def _own_id(request_id: str) -> str:
    """The id we gave a request (ours hold no "-"; vLLM may append "-<suffix>" to it internally)."""
    return request_id.split("-", 1)[0]


def _is_engine_death(exc: BaseException) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, EngineDeadError)
