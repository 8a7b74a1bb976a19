"""One batch of turns, end to end: claim → embed → retrieve → prompt → generate → embed replies → store.

The stages before generation are one call for the whole batch. The prompts then join the running
engine (worker/engine_loop.py), which other batches feed at the same time, and the turns are judged
and stored in small groups as they finish, never waiting for the batch's slowest reply. A turn that
fails alone (its prompt cannot fit, the engine refuses it, any stage of its own work raises) is
retried on its own attempts or recorded failed with its reason and code; its batch-mates go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar

from celery.worker import state as worker_state
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session
from tenacity.stop import stop_base

from core import metrics
from core.now_and_then import NowAndThen
from core.panics import fenced
from core.settings import Lane, settings
from db.callbacks import with_callbacks
from db.models import Role, TurnErrorCode
from db.retrieval import ContextQuery, fetch_batch_context
from db.scenes import NewStep, pop_new_steps
from db.session import (
    again_on_conflict,
    again_while_away,
    connection_lost,
    database_away,
    rolled_back_for_a_conflict,
    session_scope,
)
from db.turns import (
    ClaimedTurn,
    ClaimResult,
    Failure,
    StalledTurn,
    TurnOutcome,
    claim_turns,
    fail_turns,
    hand_back_after_engine_death,
    mark_dispatched,
    requeue_turns,
    store_replies,
)
from memory.context import attach_memory
from memory.schedule import schedule_memory
from roleplay.mood import Mood
from services.schemas import SAMPLING_CONTROLS
from services.turn_callbacks import send_turn_callbacks
from streaming.publisher import publisher
from worker import engine as engine_module
from worker.embedder import embed
from worker.engine import (
    GRAMMAR_BUILD_TIMED_OUT,
    Adapter,
    AdapterUnavailable,
    EngineDead,
    GenerationRequest,
    adapter_key,
    refused_by_engine,
)
from worker.engine_loop import EngineRequestError, Generation
from worker.judge import Judged, judge_candidates, regenerate_weak
from worker.lease import LeaseKeeper
from worker.prompt import BuiltPrompt, PromptBuilder, PromptInput, PromptTooLong
from worker.stage_timer import GenerationSpan, StageTimer
from worker.structured import NPC, BadStructuredReply, ReplyShape, actions_prompt, read_reply, shape_of

logger = logging.getLogger(__name__)
batch_log = logging.getLogger("mlchat.batch")  # one JSON object per line, one line per batch
_T = TypeVar("_T")


@dataclass
class BatchReport:
    """What became of each turn id handed to the batch."""

    done: list[uuid.UUID] = field(default_factory=list)
    failed: dict[uuid.UUID, Failure] = field(default_factory=dict)
    retry: dict[uuid.UUID, str] = field(default_factory=dict)  # back to queued after a failed attempt
    # Of those, turns whose next message waits: {id: seconds} (an adapter looked at again only then).
    retry_in: dict[uuid.UUID, float] = field(default_factory=dict)
    # Of those, turns not at fault (their adapter not loadable for now): the attempt handed back, up
    # to MLCHAT_MAX_OUTAGE_REFUNDS times, so a passing outage costs them their wait, not their life.
    refund: set[uuid.UUID] = field(default_factory=set)
    # Waits for an earlier turn of its conversation: {turn id: times deferred so far}.
    deferred: dict[uuid.UUID, int] = field(default_factory=dict)
    stalled: list[StalledTurn] = field(default_factory=list)  # such earlier turns nobody answers: send now
    # Another model's turns (on a queue added to this worker): stamped sent, for their model's queue.
    elsewhere: list[StalledTurn] = field(default_factory=list)
    held: dict[uuid.UUID, float] = field(default_factory=dict)  # another worker's: {id: lease seconds left}
    skipped: list[uuid.UUID] = field(default_factory=list)  # finished, cancelled or unknown already
    lost: list[uuid.UUID] = field(default_factory=list)  # answered, but the lease lapsed: not stored
    # Queued again: uncharged after an engine death; after the batch raised, charged unless the
    # database's connection was lost.
    handed_back: list[uuid.UUID] = field(default_factory=list)
    # Of `failed`, those committed failed (by the claim or a group's write): a batch that raised later
    # may hold failures it only noted, whose turns its hand-back could not reach.
    failed_written: set[uuid.UUID] = field(default_factory=set)
    raised: str | None = None  # the class of the error the batch raised, if it did
    # The engine died and the database took no hand-back: still running under this worker's lease,
    # sent again so a claim takes them once it lapses (nothing else would but a sweep).
    unsettled: list[uuid.UUID] = field(default_factory=list)
    next_steps: list[NewStep] = field(default_factory=list)  # scene steps the stored replies created: send
    engine_dead: BaseException | None = None
    futures: dict[uuid.UUID, list[Any]] = field(default_factory=dict)  # each turn's engine requests
    # Turns whose adapter was loading when the engine died: they count the death as if inside it.
    loading: list[uuid.UUID] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    stores: int = 0  # the transactions that stored its finished turns' replies (one a group)
    # Sends the stalled earlier turns as soon as the claim committed (the caller's): they were stamped
    # sent there, so nothing else sends them; waiting for the batch's end, a worker killed meanwhile
    # left them unsent for a visibility timeout. What it sent leaves `stalled`.
    send_stalled: Callable[[list[StalledTurn]], None] | None = field(default=None, repr=False)

    def stalled_sent_now(self) -> None:
        if self.stalled and self.send_stalled is not None:
            stalled, self.stalled = self.stalled, []
            self.send_stalled(stalled)

    @property
    def send_again(self) -> list[uuid.UUID]:
        """Turns that need a new message now (held turns wait for their lease, deferred ones back off)."""
        return [*self.retry, *self.handed_back, *self.unsettled]


@cache
def get_prompt_builder() -> PromptBuilder:
    """The prompt builder for this worker's model (shares the engine's tokenizer)."""
    loaded = engine_module.get_engine()
    return PromptBuilder(loaded.tokenizer, settings.resolved_prompt_format, settings.max_model_len)


def process_batch(
    turn_ids: Sequence[uuid.UUID], *, lane: Lane = "live", report: BatchReport | None = None
) -> BatchReport:
    """Run one batch; never raises for a single turn's fault.

    The batch's turns are claimed under one token and lease (kept alive while the batch runs). If
    the engine dies, they are handed back without charging an attempt and the report says so, but a
    turn inside the engine at MLCHAT_MAX_ENGINE_DEATHS deaths is failed (engine_crash_loop); if
    anything else raises, they are handed back before the error propagates, the attempt counted
    (refunded for a lost database connection, writes that kept meeting deadlocks, or an engine that
    did not answer while the claim was held, within MLCHAT_MAX_OUTAGE_REFUNDS);
    then `report`, when given, holds what the batch had decided (turns it had written already).
    """
    timer = StageTimer()
    report = BatchReport() if report is None else report
    # Made here, not by the claim: a claim whose COMMIT reply was lost may have committed, and only
    # its token can hand its turns back (below).
    claim_token = uuid.uuid4()

    def claim_them() -> ClaimResult:
        report.stalled = []  # not an attempt's rolled back
        with session_scope() as session:
            claimed = claim_turns(
                session=session,
                turn_ids=list(turn_ids),
                token=claim_token,
                lease_s=settings.lease_seconds,
                max_attempts=settings.max_attempts,
                wait_limit_s=settings.order_wait_limit_s,
                models=settings.answered_models,
            )
            # Before the commit: the claim stamped these sent, and if the commit's reply is lost (it
            # may have gone through) the batch's report must still send them, or nothing would for
            # an hour.
            report.stalled = claimed.stalled
            mark_dispatched(session=session, turn_ids=list(claimed.deferred))  # the task sends them again
        return claimed

    # A claim ending a run's or a scene's turns locks their rows: a deadlock with another worker's
    # store rolls it back whole, and it is run again (it was the batch sent again alone, every turn
    # of a bulk chunk then a batch of its own).
    with timer("claim"):
        try:
            claim = again_on_conflict(claim_them, what="a batch's claim")
        except BaseException as exc:
            if connection_lost(exc) and not isinstance(exc, PoolTimeout):  # no connection: no commit
                _claim_lost(claim_token, turn_ids, report)
            raise
    report.deferred, report.skipped, report.held = claim.deferred, claim.skipped, claim.held
    report.elsewhere = claim.elsewhere
    if claim.elsewhere and (times := _OTHER_MODELS_SAID.due()) is not None:  # one line a while
        logger.warning(
            "turns of %s reached this worker of %s (a queue of that model added to it?): sent to their"
            " own model's queue, not answered with these weights (MLCHAT_ANSWERS_FOR_MODELS names the"
            " models they answer); %d batch(es) held such turns since the last line",
            ", ".join(sorted({t.model for t in claim.elsewhere})),
            settings.model,
            times,
        )
    _end_streams(claim.streams_ended)  # committed: no worker writes these turns' stream ends
    report.failed.update(
        {t: Failure("no attempts left", TurnErrorCode.ATTEMPTS_EXHAUSTED) for t in claim.exhausted}
    )
    report.failed.update(
        {t: Failure(reason, TurnErrorCode.BLOCKED_BY_EARLIER_TURN) for t, reason in claim.blocked.items()}
    )
    report.failed_written.update([*claim.exhausted, *claim.blocked])
    # A character's turns side by side: their prompts share the persona prefix in vLLM's cache.
    turns = sorted(claim.claimed, key=lambda t: t.character.id)
    if not turns:
        report.stalled_sent_now()
        _call_back([*claim.exhausted, *claim.blocked])
        report.timings = timer.ms
        if report.failed or report.deferred:
            _account(report, claimed=0)
        return report
    ids = [t.id for t in turns]
    with LeaseKeeper(
        claim.token, settings.lease_seconds, settings.visibility_timeout, turn_ids=ids
    ) as keeper:
        # Under the lease keeper: a broker slow to take these sends and callbacks (kombu retries each
        # publish) must not let the lease of the turns just claimed lapse before its first renewal.
        report.stalled_sent_now()
        _call_back([*claim.exhausted, *claim.blocked])
        try:
            priority = engine_module.LIVE if lane == "live" else engine_module.BULK
            _answer(
                turns,
                claim.token,
                report,
                timer,
                failed_by_claim={*claim.exhausted, *claim.blocked},
                priority=priority,
                hold_until=keeper.deadline,
            )
        except EngineDead as exc:
            report.engine_dead = exc
            # Nothing to cancel after a death (it resolved every request); after the core aborted one
            # (it is stopping), the batch's others must not go on writing streams of turns handed back.
            _cancel_requests(report)
            ended = _hand_back_dead(claim.token, turns, exc, report, until=_hand_back_until(keeper))
            _announce(turns, [*report.handed_back, *ended])
            _call_back(ended, turns)
        except BaseException as exc:
            _cancel_requests(report)
            # The database's connection lost under the batch is nobody's fault: its turns are not
            # charged (three blips in a turn's life would otherwise fail it as out of attempts), up to
            # MLCHAT_MAX_OUTAGE_REFUNDS times a turn (a statement that crashes its backend every time
            # looks the same, and would take the database down at every round for ever). So is a
            # write the server kept rolling back for deadlocks with other workers' (each write is run
            # again first: db/session.py again_on_conflict).
            # So is an engine too busy to answer while the claim was held (poison review: an hour's
            # backlog charged every turn in it), within the same refunds.
            # Any other error, a statement timeout too, is charged: a turn that raises it every
            # time is dead-lettered at its attempt cap, not sent round for ever.
            reason = f"the batch raised ({type(exc).__name__}); sent again"
            refund = (
                connection_lost(exc) or rolled_back_for_a_conflict(exc) or isinstance(exc, GenerationTimeout)
            )
            handed = _hand_back(
                claim.token, [t.id for t in turns], reason, refund=refund, until=_hand_back_until(keeper)
            )
            _announce(turns, handed)
            _requeued(report, handed)
            report.raised = type(exc).__name__
            report.timings = {**report.timings, **timer.ms, "total_ms": timer.elapsed_ms()}
            try:  # a batch that raised is accounted like any other (its log line, its metrics)
                _account(report, claimed=len(turns))
            except Exception:
                logger.warning("could not account a batch that raised", exc_info=True)
            raise
    report.timings = {**report.timings, **timer.ms, "total_ms": timer.elapsed_ms()}
    _account(report, claimed=len(turns))
    return report


CLAIM_LOST_HAND_BACK_S = 5.0


def _claim_lost(token: uuid.UUID, turn_ids: Sequence[uuid.UUID], report: BatchReport) -> None:
    """The claim's connection was lost: its COMMIT may have gone through with its reply lost, the
    turns running under a lease no one keeps, charged an attempt never run (review of database
    errors: the player waited out the lease, and a turn at its last attempt failed for good). They
    are handed back under its token, uncharged as after any outage (nothing if it never committed);
    the caller sends them again."""
    reason = "the database's connection was lost during the claim; sent again"
    # A few seconds: long enough for a lost reply's hand-back, not to hold the flush through an
    # outage (the claim never committed then, and the chunk is sent again anyway).
    until = time.monotonic() + CLAIM_LOST_HAND_BACK_S
    report.handed_back = _hand_back(token, list(turn_ids), reason, refund=True, until=until)


def _cancel_requests(report: BatchReport) -> None:
    """Stop the batch's requests still in the engine: its turns are handed back, so a reply to them
    would not be stored, and a streamed one would go on writing under a claim that lost its turn."""
    futures = [f for candidates in report.futures.values() for f in candidates if not f.done()]
    if not futures:
        return
    try:
        cancelled = engine_module.get_loop().cancel(futures)
        logger.info("cancelled %d engine requests of a batch handed back", cancelled)
    except Exception:  # never in the way of the hand-back
        logger.warning("could not cancel the engine requests of a batch handed back", exc_info=True)


def _requeued(report: BatchReport, turn_ids: list[uuid.UUID]) -> None:
    """These turns were handed back: a failure or retry the batch had only noted (not written) is
    queued again instead."""
    report.handed_back = turn_ids
    for turn_id in turn_ids:
        report.failed.pop(turn_id, None)
        report.retry.pop(turn_id, None)
        report.retry_in.pop(turn_id, None)


class _ShuttingDown(stop_base):
    """A hand-back's retries stop at a cold shutdown (should_terminate) or the process's exit
    (threading's own flag, set before the interpreter joins this thread): no one waits for the batch
    then, its lease lapses and the next claim takes its turns, charged the attempt. A warm shutdown
    (should_stop 0, which == False: hence the `is not False`) drains its running tasks, so a deploy
    during a failover keeps trying for a third of a lease (the refund an outage is owed; repeated
    deploys in an outage ran turns out of attempts), then stops. An engine death's exit code (3) is
    set before its hand-back, which waits for the database as long as _hand_back_until allows."""

    def __call__(self, retry_state: Any) -> bool:
        should_stop = worker_state.should_stop
        warm = should_stop == 0 and should_stop is not False
        exiting = getattr(threading, "_SHUTTING_DOWN", False) or not threading.main_thread().is_alive()
        warm_and_waited = warm and retry_state.seconds_since_start >= settings.lease_seconds / 3
        return warm_and_waited or worker_state.should_terminate is not None or exiting


def _hand_back_until(keeper: LeaseKeeper) -> float:
    """How long a hand-back may wait for the database (time.monotonic()): while the claim is held,
    at least a third of a lease (a batch that ran out its hold has no time left of its own) and at
    most five leases (a worker asked to stop, or whose engine died, waits no longer than that)."""
    now = time.monotonic()
    return min(max(keeper.deadline, now + settings.lease_seconds / 3), now + 5 * settings.lease_seconds)


def _best_effort_hand_back(
    turns: Sequence[Any], write: Callable[[Session], _T], *, until: float
) -> _T | None:
    """Run a hand-back write in its own transaction; None if it fails. A database that went away (a
    restart, a failover: the very error that usually stops the batch) is tried again until `until`
    (time.monotonic()), the claim's hold limit: a hand-back tried once, at the moment the connection
    dropped, failed as a rule, and one given up sooner than the outage (a failover of a minute) left
    the turns to wait out their lease and be charged the attempt by the next claim, three such
    outages failing a turn for good. The write is the claim's own (its token): one that lands after
    the lease lapsed and another worker claimed the turns changes nothing."""

    def in_own_session() -> _T:
        with session_scope() as session:
            return write(session)

    try:
        return again_while_away(
            in_own_session,
            also=rolled_back_for_a_conflict,  # a deadlock with another worker's write: run again
            within_s=until - time.monotonic(),
            first_wait_s=HAND_BACK_FIRST_WAIT_S,
            max_wait_s=5.0,
            stop=_ShuttingDown(),
        )
    except Exception as exc:
        away = database_away(exc)
        if away is None:
            logger.warning("could not hand back %d turns; their lease will expire", len(turns), exc_info=True)
        elif (times := _HAND_BACK_AWAY_SAID.due()) is not None:  # an outage: one line a while
            logger.warning(
                "%s: %d hand-back(s) failed since the last line; their leases will expire", away, times
            )
    return None


_HAND_BACK_AWAY_SAID = NowAndThen(30.0)
_OTHER_MODELS_SAID = NowAndThen(60.0)


HAND_BACK_FIRST_WAIT_S = 0.25


def _hand_back(
    token: uuid.UUID, turn_ids: Sequence[uuid.UUID], reason: str, *, refund: bool, until: float
) -> list[uuid.UUID]:
    """Requeue the batch's turns still under its claim; best effort."""
    reasons = dict.fromkeys(turn_ids, reason)
    requeued = _best_effort_hand_back(
        turn_ids,
        lambda session: requeue_turns(
            session=session,
            token=token,
            reasons=reasons,
            refund_attempt=refund,
            max_refunds=settings.max_outage_refunds,
        ),
        until=until,
    )
    return requeued or []


def _hand_back_dead(
    token: uuid.UUID, turns: Sequence[ClaimedTurn], error: EngineDead, report: BatchReport, *, until: float
) -> list[uuid.UUID]:
    """The engine died: requeue the claim's turns uncharged, counting a death for each that may have
    killed it (a request of its was a suspect inside the engine, or its adapter was loading), and fail
    those at the limit; returns those it failed. Best effort. A turn the batch had only noted failed
    or for a retry, not yet written, is requeued with the rest and leaves the report's failures and
    retries; one written already was announced and called back then."""
    reason = f"engine died: {error}"
    deaths = {
        t: [d for d in map(_death_of, futures) if d is not None] for t, futures in report.futures.items()
    }
    in_engine = [t for t, seen in deaths.items() if any(d.in_engine for d in seen)]
    present = [t for t, seen in deaths.items() if any(d.present for d in seen)]
    outcome = _best_effort_hand_back(
        turns,
        lambda session: hand_back_after_engine_death(
            session=session,
            token=token,
            turn_ids=[t.id for t in turns],
            in_engine=[*in_engine, *report.loading],
            reason=reason,
            max_deaths=settings.max_engine_deaths,
            present=present,
        ),
        until=until,
    )
    if outcome is None:
        # Those a group's write ended (stored, or failed and announced) are settled already.
        # And those it found another's (lost): counted once, as lost (review).
        stored = set(report.done) | report.failed_written | set(report.lost)
        report.unsettled = [t.id for t in turns if t.id not in stored]
        # Not announced as failed or retried (their outcome may never have been written); a retry
        # that waits (an adapter looked at again later) keeps its wait.
        for turn_id in report.unsettled:
            report.failed.pop(turn_id, None)
            report.retry.pop(turn_id, None)
        return []
    _requeued(report, outcome.requeued)
    report.failed_written.update(outcome.crash_looped)  # committed by the hand-back
    for turn_id in outcome.crash_looped:
        report.failed[turn_id] = Failure(
            f"inside the engine at {settings.max_engine_deaths} engine deaths ({reason})",
            TurnErrorCode.ENGINE_CRASH_LOOP,
        )
    if outcome.crash_looped:
        logger.error("failed %d turns that were inside the engine at each death", len(outcome.crash_looped))
    return list(outcome.crash_looped)


def _death_of(future: Any) -> EngineDead | None:
    """The engine death that ended this request, if one did: whether it was inside the engine then
    (`present`), and a suspect (`in_engine`; worker/engine_loop.py)."""
    error = future.exception() if future.done() else None
    return error if isinstance(error, EngineDead) else None


# Deaths seen (inside, decoding, not a suspect) after which a turn runs alone: a request that kills
# the engine mid-reply, always beside another joining, would otherwise never be blamed.
DEATHS_SEEN_ALONE = 3


def runs_alone(turn: ClaimedTurn) -> bool:
    """Whether the turn runs alone in the engine, where a death is its own: it was a suspect at a
    death, or inside at DEATHS_SEEN_ALONE of them."""
    return turn.engine_deaths > 0 or turn.engine_deaths_seen >= DEATHS_SEEN_ALONE


def _load_adapters(turns: Sequence[ClaimedTurn], report: BatchReport) -> None:
    """Load each adapted character's LoRA, once per adapter, before any request uses it; a turn whose
    adapter does not load is alone in it (adapter_unavailable): failed when it never will (a rank
    over the engine's limit), else sent again once the worker looks at the adapter again, while it
    has attempts left. If the engine dies while one loads, the turns that needed it are recorded in
    `report.loading` (they count that death); not if the load was only waiting for the engine."""
    needing: dict[Adapter, list[ClaimedTurn]] = {}
    for turn in turns:
        adapter = adapter_of(turn.character, turn.tenant, turn.speaker)
        if adapter is not None:
            needing.setdefault(adapter, []).append(turn)
    for adapter, adapted in needing.items():
        try:
            engine_module.load_adapter(adapter)
        except AdapterUnavailable as exc:
            unavailable = TurnErrorCode.ADAPTER_UNAVAILABLE
            for turn in adapted:
                if exc.retry_in is None:  # for good: every attempt would fail the same way
                    report.failed[turn.id] = Failure(f"{exc} (not retried)", unavailable)
                    continue
                _retry_or_fail(turn, str(exc), unavailable, report)
                if turn.id in report.retry:
                    report.retry_in[turn.id] = exc.retry_in
                    report.refund.add(turn.id)
        except EngineDead as exc:
            if exc.in_engine:  # its load ran when the engine died; one only queued behind is blameless
                report.loading = [t.id for t in adapted]
            raise


def _answer(
    turns: list[ClaimedTurn],
    token: uuid.UUID,
    report: BatchReport,
    timer: StageTimer,
    *,
    failed_by_claim: set[uuid.UUID],
    priority: int,
    hold_until: float,
) -> None:
    """Embed, retrieve and build the claimed turns' prompts, hand them all to the running engine, then
    judge and store them in small groups as they finish. Raises
    GenerationTimeout if replies are still missing at `hold_until` (time.monotonic()), when the
    claim's lease is no longer renewed."""
    first_batch = engine_module.get_engine.cache_info().currsize == 0  # this batch pays for the load
    builder = get_prompt_builder()
    load_ms = engine_module.get_engine().load_ms if first_batch else 0.0

    with timer("embed"):
        vectors = embed([t.query or t.message for t in turns])
    with timer("retrieve"), session_scope() as session:
        contexts = fetch_batch_context(
            session=session,
            queries=[
                ContextQuery(t.conversation_id, t.story, t.story_time, vec)
                for t, vec in zip(turns, vectors, strict=True)
            ],
            recent_n=settings.recent_history,
            history_k=settings.rag_history_k,
            story_k=settings.rag_story_k,
            ef_search=settings.hnsw_ef_search,
            connections=settings.retrieval_connections,
        )
        attach_memory(
            session=session,
            conversation_ids=[t.conversation_id for t in turns],
            vectors=list(vectors),
            contexts=contexts,
            in_run=[t.run_id is not None for t in turns],
        )
    prepared: dict[uuid.UUID, Prepared] = {}
    with timer("prompt"):
        for turn, ctx in zip(turns, contexts, strict=True):
            try:
                prepared[turn.id] = _prepare(turn, ctx, builder, priority, token)
            except PromptTooLong as exc:
                report.failed[turn.id] = Failure(str(exc), TurnErrorCode.PROMPT_TOO_LONG)
            except TurnFault as fault:
                _faulted(turn, fault, report)
    with timer("adapters"):
        _load_adapters([t for t in turns if t.id in prepared], report)
    ready = [t for t in turns if t.id in prepared and t.id not in report.failed and t.id not in report.retry]
    prompts = {t.id: prepared[t.id].prompt for t in ready}
    requests = {t.id: prepared[t.id].request for t in ready}
    vector_of = {t.id: v for t, v in zip(turns, vectors, strict=True)}
    context_of = {t.id: c for t, c in zip(turns, contexts, strict=True)}
    shared_ms = {**timer.ms, "batch_size": len(turns), "llm_load_ms": round(load_ms, 1)}

    # Turns that failed before the engine (a prompt that cannot fit, a stage that raised) are
    # written at once: failed, or queued again for their next attempt; those the claim failed itself
    # (no attempts left, blocked past the order wait) were never ours to write.
    early = {t: f for t, f in report.failed.items() if t not in failed_by_claim}
    early_retry = dict(report.retry)
    if early or early_retry:
        with timer("write"):  # a group of no replies: run again, as any group's, if a deadlock ends it
            written = write_group(token, [], early, early_retry, timings=shared_ms, refund=report.refund)
        written.keep_written(report, early, early_retry)
        report.next_steps += written.next_steps
        _announce(turns, [*written.failed, *written.requeued])
        _call_back(written.failed, turns)

    loop = engine_module.get_loop()
    shared_ms["to_engine_ms"] = timer.elapsed_ms()  # from the claim until the prompts join the engine
    candidates = {t.id: prepared[t.id].candidates for t in ready}
    # Recorded as they are submitted: a second submit that raises still leaves the first cancellable.
    future_of: dict[uuid.UUID, list[Any]] = {}
    report.futures = future_of  # an engine death asks them which turns were inside the engine
    for alone in (False, True):  # turns that were inside an engine that died run alone
        part = [t for t in ready if prepared[t.id].request.alone is alone]
        if part:
            futures = iter(
                loop.submit(
                    (job for t in part for job in prepared[t.id].jobs),
                    alone=alone,
                    on_text=[engine_module.stream_hook(r) for t in part for r in candidates[t.id]],
                    ends_notice=[k == 0 for t in part for k in range(len(candidates[t.id]))],
                    salts=[r.cache_salt for t in part for r in candidates[t.id]],
                )
            )
            future_of.update({t.id: [next(futures) for _ in candidates[t.id]] for t in part})
    window = store_window(turns, priority)
    waiting = list(ready)
    span = GenerationSpan()
    while waiting:
        group = next_group(loop, waiting, future_of, window, hold_until)
        # From admission until the batch's last reply, less the time spent on its earlier groups (their
        # own stages): its turns' generation, shared with other batches.
        timer.ms["generate_ms"] = span.ms()
        taken = {t.id for t in group}
        waiting = [t for t in waiting if t.id not in taken]
        if not group:  # a candidate finished, but no turn has all of its candidates yet
            continue
        outcomes = {t.id: _results(future_of[t.id], candidates[t.id], every=_choices(t) > 1) for t in group}
        with span.other_stages():
            _finish_group(
                group,
                outcomes,
                token,
                report,
                timer,
                requests,
                prompts,
                vector_of,
                context_of,
                shared_ms,
                hold_until,
            )
    report.timings = {**shared_ms, **timer.ms}


def next_group(
    loop: Any,
    waiting: Sequence[ClaimedTurn],
    future_of: Mapping[uuid.UUID, Sequence[Any]],
    window: float,
    hold_until: float,
) -> list[ClaimedTurn]:
    """The waiting turns whose every candidate is done, once one is (or none, when a candidate finished
    and no turn has all of its own yet), after `window` for more to join; GenerationTimeout when
    none is done by the claim's hold. A turn that finished while the last group was being judged and
    written is taken at once (review: the wait was for one more of the futures still running, so such
    a turn waited for its slowest batch-mate, and at the hold its reply was thrown away)."""

    def finished() -> list[ClaimedTurn]:
        return [t for t in waiting if all(f.done() for f in future_of[t.id])]

    if not finished():
        # Until one more is done (or the engine died), and no longer than the claim is held.
        pending = [f for t in waiting for f in future_of[t.id] if not f.done()]
        if not loop.wait(pending, timeout=max(hold_until - time.monotonic(), 0.0)) and pending:
            raise GenerationTimeout(f"{len(waiting)} turns had no reply when the claim's hold ran out")
    _gather(window, [f for t in waiting for f in future_of[t.id]], hold_until)
    return finished()


# After the first reply of a group finishes, how long to wait for others finishing in the same steps.
GROUP_WINDOW_S = 0.02
_GATHER_POLL_S = 0.02


def store_window(turns: Sequence[ClaimedTurn], priority: int) -> float:
    """How long a group waits, after its first reply, for more of the claim's replies before it is
    stored: a few engine steps for live turns (a player waits for each), MLCHAT_BULK_STORE_WINDOW_S
    for a bulk claim (nobody waits for one reply of a run: fewer, larger store transactions). A scene
    step's next step waits for its store, so a claim holding one keeps the short window."""
    if priority == engine_module.LIVE or any(t.group is not None for t in turns):
        return GROUP_WINDOW_S
    return max(settings.bulk_store_window_s, GROUP_WINDOW_S)


def _gather(window: float, futures: Sequence[Any], hold_until: float) -> None:
    """Wait `window` for more replies to join the group (not past the claim's hold), or until every
    reply of the claim is in."""
    deadline = min(time.monotonic() + window, hold_until)
    while (left := deadline - time.monotonic()) > 0:
        if all(f.done() for f in futures):
            return
        time.sleep(min(left, _GATHER_POLL_S))


class GenerationTimeout(RuntimeError):
    """The engine did not answer the batch's turns while its claim was held (the batch hands them back)."""


class TurnFault(Exception):
    """A stage of one turn's own work raised: that turn alone is retried, then failed with `code`."""

    def __init__(self, stage: str, code: TurnErrorCode, error: BaseException) -> None:
        super().__init__(f"{stage} failed: {type(error).__name__}: {error}")
        self.code = code
        self.final = refused_by_engine(error)


@contextmanager
def _stage(stage: str, code: TurnErrorCode) -> Iterator[None]:
    """Turn any error of this turn's stage into its TurnFault (a prompt too long and a dead engine
    keep their own handling), a native panic too."""
    try:
        yield
    except (PromptTooLong, EngineDead):
        raise
    except BaseException as exc:
        if not fenced(exc):
            raise
        raise TurnFault(stage, code, exc) from exc


@dataclass(frozen=True)
class Prepared:
    """One turn ready for the engine: its prompt, its request, and its candidates as engine jobs."""

    prompt: BuiltPrompt
    request: GenerationRequest
    candidates: list[GenerationRequest]
    jobs: list[tuple[list[int], Any, int, Any]]  # (token ids, SamplingParams, priority, LoRARequest)


def _prepare(
    turn: ClaimedTurn, ctx: Any, builder: PromptBuilder, priority: int, token: uuid.UUID
) -> Prepared:
    """Build one turn's prompt and engine requests; raises PromptTooLong or the failing stage's TurnFault."""
    with _stage("reading the reply shape", TurnErrorCode.INVALID_PARAMS):
        shape = shape_of(turn.params, turn.character, speaker=turn.speaker)
    with _stage("building the prompt", TurnErrorCode.PROMPT_ERROR):
        prompt = builder.build(
            PromptInput(
                turn.character,
                turn.player_name,
                turn.message,
                ctx,
                shape.max_tokens(turn.params["max_new_tokens"]) if shape else turn.params["max_new_tokens"],
                mood=Mood(turn.emotion, turn.affinity),
                speaker=turn.speaker,
                system_prompt=turn.params.get("system_prompt"),
                direction=turn.params.get("direction"),
                group=turn.group,
                regard=turn.regard,
                memory_tokens=settings.memory_budget_tokens,
                actions=actions_prompt(shape, "{{char}}"),
            )
        )
    with _stage("naming the LoRA adapter", TurnErrorCode.ADAPTER_ERROR):
        adapter = adapter_of(turn.character, turn.tenant, turn.speaker)
        lora = engine_module.lora_request(adapter)
    with _stage("checking the sampling parameters", TurnErrorCode.INVALID_PARAMS):
        request = _request(turn, prompt, priority, adapter, token, shape)
        # Best of n: n requests per turn that differ only in their seed; the engine's prefix cache
        # computes their shared prompt once.
        candidates = candidate_requests(request, turn.params.get("n", 1))
        jobs = [(r.token_ids, engine_module.sampling_params(r), r.priority, lora) for r in candidates]
    return Prepared(prompt, request, candidates, jobs)


def candidate_requests(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The turn's n candidates: its own request, then the same with the next seeds."""
    return [request] + [dataclasses.replace(request, seed=request.seed + k) for k in range(1, n)]


def _choices(turn: ClaimedTurn) -> int:
    """How many of the turn's candidates its caller reads: an OpenAI line's n, else the kept one."""
    return int(turn.params.get("choices", 1))


def _results(futures: list[Any], requests: list[GenerationRequest], *, every: bool = False) -> Any:
    """A turn's candidates that were generated, as (seed, Generation); the first exception if none
    was (none with text: an empty one is no answer, and the error may be retried), or if any was not
    and `every` candidate is needed; EngineDead propagates."""
    made, errors = [], []
    for future, request in zip(futures, requests, strict=True):
        error = future.exception()
        if isinstance(error, EngineDead):
            raise error
        if error is not None:
            errors.append(error)
        else:
            made.append((request.seed, future.result()))
    return errors[0] if errors and (every or not any(gen.text for _, gen in made)) else made


def _finish_group(
    group: list[ClaimedTurn],
    results: dict[uuid.UUID, Any],
    token: uuid.UUID,
    report: BatchReport,
    timer: StageTimer,
    requests: dict[uuid.UUID, GenerationRequest],
    prompts: dict[uuid.UUID, BuiltPrompt],
    vector_of: dict[uuid.UUID, Any],
    context_of: dict[uuid.UUID, Any],
    shared_ms: dict[str, Any],
    hold_until: float | None = None,
) -> None:
    """Judge and store the turns whose generation just finished, in one transaction (a weak reply's
    second try ends at `hold_until`, the claim's hold)."""
    group_timer = StageTimer()
    broken = {t.id: r for t, r in ((t, results[t.id]) for t in group) if isinstance(r, Exception)}
    failed_before = set(report.failed)
    for turn in group:
        if turn.id in broken:
            error = broken[turn.id]
            refused = refused_by_engine(error)
            code = TurnErrorCode.INVALID_PARAMS if refused else TurnErrorCode.ENGINE_ERROR
            # str, not repr: vLLM's own words keep the parameter and value it names (its repr drops them)
            reason = f"engine error: {type(error).__name__}: {error}"
            request = requests.get(turn.id)
            if isinstance(error, EngineRequestError) and request is not None and request.structured_outputs:
                # The engine core compiles a request's grammar against the model's vocabulary, which
                # the door's build (no tokenizer) cannot; a grammar it cannot build ends it so.
                reason += (
                    f" (its structured reply, response_format or the character's actions: {_NO_GRAMMAR})"
                )
            # A grammar fault is sent again once (a passing fault); met again by the next attempt, it
            # is the request's: every further attempt compiled its grammar for nothing (poison
            # review), or held the engine's one thread for vLLM's whole limit (review: three times).
            # Its last attempt's own error tells (review: an attempt spent otherwise, a judge's
            # fault, was taken for the first).
            twice = next(
                (said for mark, said in _TWICE if mark in reason and mark in (turn.last_error or "")), None
            )
            if twice is not None:
                report.failed[turn.id] = Failure(
                    f"{reason}; {twice}, not retried", TurnErrorCode.INVALID_PARAMS
                )
                continue
            _retry_or_fail(turn, reason, code, report, final=refused)
    answered = []
    for turn in group:
        if turn.id in broken:
            continue
        made, failure = keep_candidates(
            requests[turn.id].reply_shape, results[turn.id], choices=_choices(turn)
        )
        if failure is None:
            answered.append((turn, made))
        else:
            report.failed[turn.id] = failure
    with group_timer("embed_reply"):
        reply_vectors = embed([g.text for _, made in answered for _, g in made])
    with group_timer("quality"):
        judged = _judge_each(answered, reply_vectors, vector_of, context_of, prompts, report)
    # A turn's generation stage is its first generation's, even when its second try's reply is kept:
    # the second try's time is the group's regenerate_ms. It lasts until its last candidate's end (a
    # best of n waits for every one): the kept one's alone left the rest in no stage (review).
    first_of = {turn.id: gen for turn, gen, _, _ in judged}
    generated_s = {turn.id: max(gen.seconds for _, gen in results[turn.id]) for turn, _ in answered}
    if settings.quality_regenerate:
        # A streamed reply is never regenerated: the player has read it already (README, Streaming).
        shown = [j for j in judged if _streamed(j[0])]
        with group_timer("regenerate"):
            judged = shown + regenerate_weak(
                [j for j in judged if not _streamed(j[0])],
                requests,
                vector_of,
                context_of,
                prompts,
                deadline=hold_until,
                futures_of=report.futures,
            )
    outcomes = []
    for turn, gen, reply_vec, verdict in judged:
        timings = {k: round(v, 1) for k, v in shared_ms.items()}
        first = first_of[turn.id]
        timings["generate_ms"] = round(generated_s[turn.id] * 1000, 1)
        # Inside the engine loop: waiting to be admitted, and from submission to the first token.
        timings["engine_wait_ms"] = round(first.admit_s * 1000, 1)
        timings["first_token_ms"] = round(first.first_token_s * 1000, 1)
        timings["queue_ms"] = round(turn.queued_ms, 1)
        outcomes.append(
            TurnOutcome(
                turn_id=turn.id,
                conversation_id=turn.conversation_id,
                user_message=turn.message,
                user_embedding=vector_of[turn.id],
                reply=gen.text,
                reply_embedding=reply_vec,
                prompt=prompts[turn.id].text,
                context=prompts[turn.id].manifest,
                usage={
                    "prompt_tokens": gen.prompt_tokens,
                    "completion_tokens": gen.completion_tokens,
                    "total_tokens": gen.prompt_tokens + gen.completion_tokens,
                    "finish_reason": gen.finish_reason,
                    # every candidate the engine finished for it, kept or dropped: what it cost
                    "generated_completion_tokens": sum(
                        g.completion_tokens for g in _generations(report.futures.get(turn.id, ()))
                    ),
                },
                timings=timings,
                params={**turn.params, "seed": verdict.seed},
                alternatives=verdict.alternatives or None,
                adapter=_adapter_name(requests[turn.id]),
                reply_role=Role.NARRATOR if turn.speaker == "narrator" else Role.ASSISTANT,
                state=verdict.mood.as_json() if verdict.mood else None,
                quality=verdict.quality,
                speaker_id=turn.character.id if _member_speaks(turn) else None,
                speaker_name=turn.character.name if _member_speaks(turn) else None,
                structured=gen.structured,
            )
        )
    newly_failed = {t: f for t, f in report.failed.items() if t not in failed_before}
    retry = {t.id: report.retry[t.id] for t in group if t.id in report.retry}
    with group_timer("write"):
        # Stage times of this group, and the turn's own total, recorded once they are known.
        done_ms = {**group_timer.ms}
        for outcome in outcomes:
            outcome.timings.update({k: round(v, 1) for k, v in done_ms.items()})
            outcome.timings["total_ms"] = round(outcome.timings["queue_ms"] + timer.elapsed_ms(), 1)
        written = write_group(token, outcomes, newly_failed, retry, timings=shared_ms)
        report.stores += 1
    written.keep_written(report, newly_failed, retry)
    stored = written.stored
    report.next_steps += written.next_steps  # committed: the task sends them on their scene's lane
    _announce(group, [*stored, *written.failed, *written.requeued])
    _call_back([*stored, *written.failed], group)
    stored_ids = set(stored)
    schedule_memory([t.conversation_id for t in group if t.id in stored_ids and t.run_id is None])
    report.done += stored
    lost = [o.turn_id for o in outcomes if o.turn_id not in set(stored)]
    if lost:
        report.lost += lost
        logger.warning("lease lapsed before the write; %d replies not stored: %s", len(lost), lost)
    for stage, ms in group_timer.ms.items():
        timer.ms[stage] = timer.ms.get(stage, 0.0) + ms


@dataclass(frozen=True)
class Written:
    """What a group's write changed: a turn left out had left this claim (its lease lapsed and another
    claim took it), which now answers it."""

    stored: list[uuid.UUID]
    failed: list[uuid.UUID]
    requeued: list[uuid.UUID]
    next_steps: list[NewStep]  # the scene steps the stored replies created

    def keep_written(
        self, report: BatchReport, failures: Iterable[uuid.UUID], retry: Iterable[uuid.UUID]
    ) -> None:
        """Take out of `report` the failures and retries that were not written: another claim's now,
        they are neither announced, called back nor sent again from here."""
        report.failed_written.update(self.failed)
        unwritten = [*(set(failures) - set(self.failed)), *(set(retry) - set(self.requeued))]
        for turn_id in unwritten:
            report.failed.pop(turn_id, None)
            report.retry.pop(turn_id, None)
            report.retry_in.pop(turn_id, None)
        if unwritten:
            report.lost += unwritten
            logger.warning(
                "lease lapsed before the write; %d turns not failed or handed back: %s",
                len(unwritten),
                unwritten,
            )


def write_group(
    token: uuid.UUID,
    outcomes: Sequence[TurnOutcome],
    failures: dict[uuid.UUID, Failure],
    retry: dict[uuid.UUID, str],
    *,
    timings: dict[str, Any] | None = None,
    refund: Collection[uuid.UUID] = (),
) -> Written:
    """Store a group's replies, fail and hand back its other turns (those in `refund` with their
    attempt handed back, within MLCHAT_MAX_OUTAGE_REFUNDS), in one transaction. Finishing
    turns advances their runs, which takes the runs' rows in more than one pass (stored turns', then
    failed ones'), so two workers finishing turns of the same runs in opposite roles can deadlock;
    the server then rolls one of them back, which is run again (it left nothing behind) instead of
    handing the whole group back with an attempt charged."""

    def write() -> Written:
        with session_scope() as session:
            stored = store_replies(session=session, token=token, outcomes=outcomes)
            failed = fail_turns(session=session, token=token, failures=failures, timings=timings)
            charged = {t: r for t, r in retry.items() if t not in refund}
            refunded = {t: r for t, r in retry.items() if t in refund}
            requeued = requeue_turns(session=session, token=token, reasons=charged)
            requeued += requeue_turns(
                session=session,
                token=token,
                reasons=refunded,
                refund_attempt=True,
                max_refunds=settings.max_outage_refunds,
            )
            return Written(stored, failed, requeued, pop_new_steps(session))

    turns = len(outcomes) + len(failures) + len(retry)
    return again_on_conflict(write, what=f"the write of a group of {turns} turns")


def keep_candidates(
    shape: ReplyShape | None, generated: list[tuple[int, Any]], *, choices: int = 1
) -> tuple[list[tuple[int, Any]], Failure | None]:
    """A turn's candidates as it keeps them: those with text that read (worker/structured.py: every
    candidate of a structured turn is schema-valid, or it is not kept), or the turn's Failure when
    none does, or when fewer than `choices` do (an OpenAI line's n: its client reads choices 0..n-1,
    so a missing choice fails the line with the reason rather than answering short)."""
    kept, bad, empty = [], None, []
    for seed, gen in generated:
        if not gen.text:
            empty.append(gen.finish_reason or "none")
            continue
        try:
            kept.append((seed, read_reply(shape, gen)))
        except BadStructuredReply as exc:
            bad = bad or exc
        except BaseException as exc:  # reading one reply never fails its batch-mates (the claim's group)
            if not fenced(exc):
                raise
            logger.warning("a structured reply could not be read", exc_info=True)
            bad = bad or BadStructuredReply(
                f"the reply could not be read: {type(exc).__name__}: {str(exc)[:200]}",
                TurnErrorCode.INVALID_STRUCTURED_REPLY,
            )
    if kept and len(kept) >= choices:
        return kept, None
    if len(generated) < choices:  # refused at submission; a turn stored before that check still fails plainly
        return [], Failure(
            f"the request asked for {choices} choices but only {len(generated)} candidates were generated",
            TurnErrorCode.INVALID_PARAMS,
        )
    short = f"the request asked for {choices} choices and {len(kept)} of {len(generated)} candidates read: "
    short = short if kept else ""
    if bad is not None:
        return [], Failure(short + str(bad), bad.code)
    reasons = ", ".join(sorted(set(empty)))
    return [], Failure(
        f"{short}model produced an empty reply (finish_reason={reasons})", TurnErrorCode.EMPTY_REPLY
    )


def _judge_each(
    answered: list[tuple[ClaimedTurn, list[Any]]],
    reply_vectors: Any,
    vector_of: dict[uuid.UUID, Any],
    context_of: dict[uuid.UUID, Any],
    prompts: dict[uuid.UUID, BuiltPrompt],
    report: BatchReport,
) -> list[Judged]:
    """Judge each turn's candidates on their own: a turn whose judging raises is retried or failed
    alone. `reply_vectors` are every candidate's, in order."""
    judged: list[Judged] = []
    start = 0
    for turn, made in answered:
        vectors, start = reply_vectors[start : start + len(made)], start + len(made)
        try:
            with _stage("judging the reply", TurnErrorCode.JUDGE_ERROR):
                judged += judge_candidates([(turn, made)], vectors, vector_of, context_of, prompts)
        except TurnFault as fault:
            _faulted(turn, fault, report)
    return judged


def _generations(futures: Iterable[Any]) -> Iterator[Generation]:
    """What the engine finished of these requests: candidates kept or dropped (a structured reply
    that did not parse, an empty one), regenerations."""
    for future in futures:
        if not future.done() or future.cancelled() or future.exception() is not None:
            continue
        made = future.result()
        if isinstance(made, Generation):
            yield made


def _engine_tokens(report: BatchReport) -> dict[str, int]:
    """The tokens of every request of the batch the engine finished: the engine's work."""
    tokens = {"prompt": 0, "completion": 0}
    for made in _generations(f for candidates in report.futures.values() for f in candidates):
        tokens["prompt"] += made.prompt_tokens
        tokens["completion"] += made.completion_tokens
    return tokens


def _account(report: BatchReport, *, claimed: int) -> None:
    """One JSON log line per batch, and the Prometheus metrics."""
    timings = {k: round(v, 1) for k, v in report.timings.items()}
    batch_log.info(
        json.dumps(
            {
                "event": "batch",
                "model": settings.model,
                "size": claimed,
                "done": [str(t) for t in report.done],
                "failed": {str(t): f.reason[:200] for t, f in report.failed.items()},
                "retry": [str(t) for t in report.retry],
                "deferred": [str(t) for t in report.deferred],
                "held": [str(t) for t in report.held],
                "handed_back": [str(t) for t in report.handed_back],
                "lost": [str(t) for t in report.lost],
                "skipped": len(report.skipped),
                "timings_ms": timings,
                **({"raised": report.raised} if report.raised else {}),
            },
            ensure_ascii=False,
        )
    )
    metrics.record_batch(
        settings.model,
        timings_ms=report.timings,
        claimed=claimed,
        outcomes={
            "done": len(report.done),
            # committed failures only: a batch that raised may hold failures it noted and never wrote
            "failed": len(report.failed_written),
            "retried": len(report.retry),
            "deferred": len(report.deferred),
            "handed_back": len(report.handed_back),
            # run and never stored (the lease lapsed), or left under this lease by a dead engine: the
            # engine time they took was counted in no outcome (review)
            "lost": len(report.lost),
            "unsettled": len(report.unsettled),
        },
        tokens=_engine_tokens(report),
    )


def _member_speaks(turn: ClaimedTurn) -> bool:
    """Whether a group member gives this reply (its line is stored under the member's name)."""
    return turn.group is not None and turn.speaker != "narrator"


def _streamed(turn: ClaimedTurn) -> bool:
    """Whether the turn's reply goes out as it is written (`stream` on the turn)."""
    return bool(turn.params.get("stream"))


def _announce(turns: Sequence[ClaimedTurn], changed: Any) -> None:
    """Tell the streamed turns' readers that an outcome is committed (a reply, a failure, a retry)."""
    changed = set(changed)
    _end_streams([turn.id for turn in turns if turn.id in changed and _streamed(turn)])


def _end_streams(turn_ids: Sequence[uuid.UUID]) -> None:
    """Write the end of these turns' streams (their outcomes are committed); never raises: a stream
    that cannot be told ends at its readers' next status check."""
    try:
        for turn_id in turn_ids:
            publisher().end(turn_id)
    except Exception:
        logger.warning("could not end the streams of %d turns", len(turn_ids), exc_info=True)


def _call_back(turn_ids: Sequence[uuid.UUID], claimed: Sequence[ClaimedTurn] | None = None) -> None:
    """Queue the callbacks of the finished turns that asked for one (POST /v1/turns callback_url);
    `claimed`: the turns as claimed, which say whether they asked (else they are looked up)."""
    if claimed is not None:
        asked = {t.id for t in claimed if t.callback}
        send_turn_callbacks([i for i in turn_ids if i in asked])
        return
    if not turn_ids:
        return
    try:
        with session_scope() as session:
            wanted = with_callbacks(session=session, turn_ids=turn_ids)
    except Exception:  # the outcomes are stored; a callback is not worth failing the batch for
        logger.warning("could not look up the callbacks of %d turns", len(turn_ids), exc_info=True)
        return
    send_turn_callbacks(wanted)


def _request(
    turn: ClaimedTurn,
    prompt: BuiltPrompt,
    priority: int,
    adapter: Adapter | None,
    token: uuid.UUID,
    shape: ReplyShape | None = None,
) -> GenerationRequest:
    p = turn.params
    return GenerationRequest(
        priority=priority,
        token_ids=prompt.token_ids,
        temperature=p["temperature"],
        top_p=p["top_p"],
        max_tokens=shape.max_tokens(p["max_new_tokens"]) if shape else p["max_new_tokens"],
        seed=p["seed"],
        # The grammar ends a JSON reply; a stop string (the format's turn markers, or the turn's own,
        # which a character's declared actions make JSON after the API checked them) could only cut
        # it inside a string. A regex or choice reply keeps them (its grammar may leave room for more).
        stop=()
        if shape and shape.kind not in ("regex", "choice")
        else tuple(p.get("stop") or ()) + prompt.stop,
        controls={name: p[name] for name in SAMPLING_CONTROLS if name in p},
        adapter=adapter,
        alone=runs_alone(turn),
        stream=(turn.id, token, turn.claims) if _streamed(turn) else None,
        structured_outputs=shape.outputs if shape else None,
        reply_shape=dataclasses.replace(shape, say_stops=prompt.stop)
        if shape and shape.kind == NPC
        else shape,
        cache_salt=tenant_salt(turn.tenant),
    )


def tenant_salt(tenant: str) -> str:
    """The cache salt of a tenant's turns: its prompts share cached prefixes with each other alone."""
    return f"tenant:{tenant}"


def _adapter_name(request: GenerationRequest) -> str | None:
    return request.adapter.name if request.adapter is not None else None


def adapter_of(character: Any, tenant: str, speaker: str = "character") -> Adapter | None:
    """The character's registered LoRA when the engine serves adapters and it answers this tenant's
    turns (one trained on a tenant's dialogue answers that tenant's alone) on this worker's model
    (one trained on a model answers that model's alone); None: the base model.
    A narrator's turn (`speaker`) is claimed with the conversation's lead character, whose voice
    the adapter learnt: the narrator speaks in the base model's."""
    if not settings.enable_lora or not character.lora_path or speaker == "narrator":
        return None
    if character.lora_tenant is not None and character.lora_tenant != tenant:
        return None
    if character.lora_model is not None and character.lora_model not in settings.answered_models:
        return None  # these weights' own names answer with it (MLCHAT_ANSWERS_FOR_MODELS: the same weights)
    name = f"{character.slug}@v{character.lora_version}"
    return Adapter(name, adapter_id(adapter_key(name, character.lora_path)), character.lora_path)


_ADAPTER_ID_SPACE = 2**31 - 1
_adapter_ids: dict[str, int] = {}  # this process's engine: {adapter key: vLLM's integer id}
_adapter_names: dict[int, str] = {}
_adapter_ids_lock = threading.Lock()


def adapter_id(key: str) -> int:
    """vLLM's positive integer id for an adapter, one per key (`adapter_key`) in this process: its
    hash, or the next free id when another key hashed to it (vLLM would take the second adapter for the
    first, already loaded, and serve its weights)."""
    with _adapter_ids_lock:
        known = _adapter_ids.get(key)
        if known is not None:
            return known
        int_id = _hashed_id(key)
        while _adapter_names.get(int_id, key) != key:
            int_id = int_id % _ADAPTER_ID_SPACE + 1
        _adapter_ids[key], _adapter_names[int_id] = int_id, key
        return int_id


def _hashed_id(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % _ADAPTER_ID_SPACE + 1


_NO_GRAMMAR = "the engine may be unable to build its grammar"
# A grammar fault in an error's text, and what a second one in a row is called.
_TWICE = ((_NO_GRAMMAR, "ended so twice"), (GRAMMAR_BUILD_TIMED_OUT, "ran past it twice"))


def _faulted(turn: ClaimedTurn, fault: TurnFault, report: BatchReport) -> None:
    """A stage of the turn's own work raised: logged with its traceback (the turn's stored error
    has its one line only; review, stop 76: nothing logged it), then retried or failed."""
    logger.warning("turn %s: %s", turn.id, fault, exc_info=fault.__cause__)
    _retry_or_fail(turn, str(fault), fault.code, report, final=fault.final)


def _retry_or_fail(
    turn: ClaimedTurn, reason: str, code: TurnErrorCode, report: BatchReport, *, final: bool = False
) -> None:
    """A fault of the turn's own: it is sent again while it has attempts left (a passing fault gets
    another chance), then failed with `code`; at once when it is `final` (the engine refused the
    request itself: every attempt would fail the same way). Its batch-mates' attempts are never
    touched."""
    if final:
        report.failed[turn.id] = Failure(f"{reason} (the engine refused the request; not retried)", code)
    elif turn.attempts < settings.max_attempts:
        report.retry[turn.id] = f"{reason}; retrying"
    else:
        report.failed[turn.id] = Failure(f"{reason} (gave up after {turn.attempts} attempts)", code)
