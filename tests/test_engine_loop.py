"""The engine loop on the real engine: live ahead of bulk, bounded bulk admission, results as they finish,
and the worker pausing its bulk queue while the engine is full."""

import queue
import threading
import time

import pytest

# The fakes' add_request imports this: its first import takes seconds (more under load), here and not
# inside a test's wait for an admission.
import vllm.v1.engine.exceptions  # noqa: F401
from sqlalchemy import select

from core.settings import queue_for_model, settings
from db.models import Turn, TurnStatus
from db.session import session_scope
from services.producer import enqueue_turns, get_turn
from tasks.admission import bulk_gate
from tasks.generate import dispatch
from tests.conftest import new_conversation
from worker import engine as engine_module
from worker.engine import BULK, LIVE, GenerationRequest
from worker.pipeline import process_batch


def _request(engine, text: str, tokens: int, priority: int, seed: int = 0) -> GenerationRequest:
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    return GenerationRequest(ids, 0.8, 0.95, tokens, seed, (), priority)


def _all_done(futures, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not all(f.done() for f in futures):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def small_bulk_limit(engine):
    loop = engine_module.get_loop()
    before = loop.max_inflight
    loop.max_inflight = 3
    yield loop
    loop.max_inflight = before


def test_a_bulk_limit_set_past_the_live_reserve_is_lowered_to_it(engine, monkeypatch, caplog) -> None:
    """Found in review: MLCHAT_MAX_INFLIGHT was taken as set, so a value past the engine's sequences
    less the live reserve let bulk fill every slot; vLLM then admits nothing more (it preempts for KV
    blocks, not for priority), and live turns waited behind bulk decodes, nothing logged."""
    from core.settings import settings

    max_seqs = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
    monkeypatch.setattr(settings, "max_inflight", max_seqs + 24)
    with caplog.at_level("WARNING", logger="worker.engine"):
        assert engine_module.inflight_limit(engine.llm.llm_engine) == max_seqs - engine_module.LIVE_RESERVE
    assert "leaves no live reserve" in caplog.text
    monkeypatch.setattr(settings, "max_inflight", 2)
    assert engine_module.inflight_limit(engine.llm.llm_engine) == 2


def test_a_live_request_overtakes_a_bulk_backlog_inside_the_engine(engine, small_bulk_limit) -> None:
    from worker.engine_loop import _outputs_ready

    # The pinned vLLM's client queues each step's outputs: requests join the core's running step.
    assert _outputs_ready(small_bulk_limit.engine) is not None
    backlog = engine_module.submit(
        [_request(engine, f"Tell a long story about the harbour, part {i}.", 24, BULK, i) for i in range(12)]
    )
    (live,) = engine_module.submit([_request(engine, "Quick, where is the inn?", 8, LIVE)])
    assert _all_done([live], timeout=300)
    still_waiting = sum(not f.done() for f in backlog)
    assert still_waiting >= 6, f"the live request waited for the bulk backlog ({still_waiting} of 12 left)"
    assert _all_done(backlog, timeout=600)
    assert all(f.result().completion_tokens > 0 for f in backlog)


def test_bulk_admission_stays_within_its_limit_and_never_stalls(engine, small_bulk_limit) -> None:
    loop = small_bulk_limit
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], loop._bulk_inside)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        futures = engine_module.submit(
            [_request(engine, f"Name a colour, {i}.", 4, BULK, i) for i in range(10)]
        )
        # Every batch of 3 finishes before the next is admitted: the held ones must still go in.
        assert _all_done(futures, timeout=300), "bulk requests stayed held with an empty engine"
    finally:
        stop.set()
        watcher.join()
    assert 1 <= peak[0] <= 3


def test_a_short_reply_is_stored_before_its_batch_mates_long_one_finishes(engine) -> None:
    short, long = enqueue_turns(
        [
            new_conversation() | {"message": "Say yes.", "params": {"seed": 1, "max_new_tokens": 2}},
            new_conversation()
            | {
                "message": "Describe the whole village, house by house.",
                "params": {"seed": 1, "max_new_tokens": 96},
            },
        ],
        send=False,
    )
    report = process_batch([short, long])
    assert sorted(report.done) == sorted([short, long])
    with session_scope() as session:
        finished = dict(
            session.execute(select(Turn.id, Turn.finished_at).where(Turn.id.in_([short, long]))).all()
        )
    assert get_turn(long).usage["completion_tokens"] > 20
    assert finished[short] < finished[long]
    assert get_turn(short).timings["generate_ms"] < get_turn(long).timings["generate_ms"]


def _control(worker, command: str, queue: str) -> None:  # type: ignore[no-untyped-def]
    """Celery's remote control `command` (add_consumer, cancel_consumer) for `queue`, answered ok."""
    from tasks.app import app

    (reply,) = getattr(app.control, command)(queue, destination=[worker.hostname], reply=True, timeout=10)
    assert "ok" in reply[worker.hostname], reply


def _bulk_turns(model: str, lengths: list[int], message: str) -> list:  # type: ignore[type-arg]
    """Bulk turns of `lengths` tokens each, sent to `model`'s bulk queue (a message per batch)."""
    ids = enqueue_turns(
        [
            new_conversation() | {"message": f"{message} {i}.", "params": {"max_new_tokens": n}}
            for i, n in enumerate(lengths)
        ],
        send=False,
    )
    dispatch(ids, model=model, lane="bulk")
    return ids


def _turns_done(ids: list) -> bool:  # type: ignore[type-arg]
    return all((view := get_turn(t)) is not None and view.status == TurnStatus.DONE for t in ids)


def test_the_worker_pauses_its_bulk_queues_while_the_engine_is_full(celery_worker) -> None:
    from tasks.app import app

    consuming = celery_worker.consumer.task_consumer.consuming_from
    own = queue_for_model(settings.model, "bulk")
    # Another model's bulk queue, added at run time (Flower's "add consumer") while the gate is closed:
    # it feeds the same engine.
    extra_model = f"{settings.model}-extra"
    extra = queue_for_model(extra_model, "bulk")
    before = bulk_gate.capacity, bulk_gate.pauses
    bulk_gate.capacity, bulk_gate.peak = settings.batch_size, 0  # one bulk message fills this worker
    try:
        # 24 longer replies on its own queue (the gate stays closed a while), 24 short on the other.
        ids = _bulk_turns(settings.model, [48] * 24, "Hello")  # three messages
        assert _until(lambda: bulk_gate.closed, 60), "the gate never closed"
        _control(celery_worker, "add_consumer", extra)
        ids += _bulk_turns(extra_model, [4] * 24, "Hello")  # three messages on the other queue
        assert _until(lambda: _turns_done(ids), 600, 0.2), "bulk turns were not all answered"
        assert bulk_gate.pauses > before[1]
        # The gate closes on the message that fills it, and pauses a queue added while it is closed on
        # that queue's first message: a message more on each may have been on its way.
        assert bulk_gate.peak <= 3 * settings.batch_size, f"{bulk_gate.peak} bulk turns held at once"
        # Paused and resumed, the worker still consumes both bulk queues. The gate reopens on its own
        # timer once the last answered turns are released, a moment after they are stored.
        assert _until(lambda: consuming(own) and consuming(extra), 10, 0.1), (
            f"a bulk queue stayed paused ({bulk_gate.held} turns held)"
        )
    finally:
        bulk_gate.capacity = before[0]
        app.control.cancel_consumer(extra, destination=[celery_worker.hostname], reply=True, timeout=10)


def test_a_bulk_queue_an_operator_cancels_while_the_gate_has_it_paused_stays_cancelled(celery_worker) -> None:
    from tasks.app import app

    consuming = celery_worker.consumer.task_consumer.consuming_from
    own = queue_for_model(settings.model, "bulk")
    other_model = f"{settings.model}-cancelled"
    other = queue_for_model(other_model, "bulk")
    before = bulk_gate.capacity
    bulk_gate.capacity = settings.batch_size  # one bulk message fills this worker
    try:
        ids = _bulk_turns(settings.model, [32] * 16, "Evening")
        assert _until(lambda: bulk_gate.closed, 60), "the gate never closed"
        _control(celery_worker, "add_consumer", other)
        # Its first message arrives while the gate is closed: the gate pauses the queue (and the turn
        # it carried is taken, not left in Redis behind the cancel below).
        (first,) = _bulk_turns(other_model, [settings.max_new_tokens], "Morning")
        assert _until(
            lambda: other in bulk_gate.paused and get_turn(first).status != TurnStatus.QUEUED, 30
        ), "the gate did not pause the added bulk queue"
        _control(celery_worker, "cancel_consumer", other)
        assert _until(lambda: _turns_done([*ids, first]), 600, 0.2), "bulk turns were not all answered"
        assert _until(lambda: consuming(own), 10, 0.1), "the worker's own bulk queue stayed paused"
        time.sleep(1.0)  # ten of the gate's checks after it reopened
        assert not consuming(other), "the gate consumed again a queue the operator had cancelled"
    finally:
        bulk_gate.capacity = before
        app.control.cancel_consumer(other, destination=[celery_worker.hostname], reply=True, timeout=10)


def test_a_queue_cancelled_and_added_back_stays_in_what_a_reconnect_consumes(celery_worker) -> None:
    """A reconnect rebuilds the consumer from the selected queues (Celery's `consume_from`): a queue
    an operator cancelled and added back must be among them, not only consumed until then."""
    from tasks.app import app

    consumer = celery_worker.consumer
    name = queue_for_model(f"{settings.model}-readded", "bulk")
    try:
        for command in ("add_consumer", "cancel_consumer", "add_consumer"):
            _control(celery_worker, command, name)
            consumed = command == "add_consumer"
            assert _until(lambda want=consumed: consumer.task_consumer.consuming_from(name) == want), command
        assert name in consumer.app.amqp.queues.consume_from, "added back, yet gone at the next reconnect"
    finally:
        app.control.cancel_consumer(name, destination=[celery_worker.hostname], reply=True, timeout=10)


def test_the_worker_can_keep_its_threads_off_the_engines_cores(engine) -> None:
    import os

    from vllm.platforms import current_platform

    from worker.cpu_affinity import ORIGINAL_CPUS, engine_cpus, keep_off_engine_cpus, restore_all_cpus

    if not current_platform.is_cpu() or len(ORIGINAL_CPUS) < 2:
        pytest.skip("vLLM binds its engine to cores only on a CPU with cores to spare")
    taken = engine_cpus()
    assert taken and taken < ORIGINAL_CPUS  # vLLM bound its worker to some cores, not all
    try:
        free = keep_off_engine_cpus()
        assert free == ORIGINAL_CPUS - taken
        assert os.sched_getaffinity(0) == free
    finally:
        restore_all_cpus()
    assert os.sched_getaffinity(0) == ORIGINAL_CPUS


# --- death and stalls: the loop's own `engine` seam ---------------------------------------------
# These drive EngineLoop through the `engine` object it is built with: a stand-in whose add_request
# or step dies or hangs on cue, which a real engine core does only by chance. The real-engine paths
# are in test_pipeline.py (an engine death per request) and test_faults.py (a SIGKILLed core).


class _ScriptedEngine:
    """Finishes each request `decode_steps` steps after it joins (each step taking `step_s`); can be
    found dead at one admission (as vLLM's client finds its core dead before it sends a request) or
    die in a step, or hang in step or add_lora."""

    def __init__(
        self, die_at_admission: int | None = None, decode_steps: int = 1, step_s: float = 0.0
    ) -> None:
        self.die_at_admission = die_at_admission
        self.decode_steps, self.step_s = decode_steps, step_s
        self.die_in_step = threading.Event()
        self.admitted: list[str] = []
        self.prompts: dict[str, list[int]] = {}
        self.steps: list[set[str]] = []  # the requests inside at each step
        self.hang = threading.Event()
        self.release = threading.Event()
        self.aborted: list[str] = []
        self._inside: set[str] = set()
        self._left: dict[str, int] = {}
        self.errors: set[int] = set()  # a request whose prompt starts with one ends with "error"
        self.aborts: set[int] = set()  # one whose prompt starts with one is aborted by the core

    def add_request(self, request_id, prompt, params, **kwargs) -> None:  # type: ignore[no-untyped-def]
        from vllm.v1.engine.exceptions import EngineDeadError

        if len(self.admitted) == self.die_at_admission:
            self.admitted.append(request_id)
            raise EngineDeadError()
        self.admitted.append(request_id)
        self.prompts[request_id] = prompt["prompt_token_ids"]
        self._inside.add(request_id)
        self._left[request_id] = self.decode_steps

    def abort_request(self, request_ids: list[str]) -> None:
        self.aborted += request_ids
        self._inside -= set(request_ids)

    def add_lora(self, lora) -> bool:  # type: ignore[no-untyped-def]
        if self.hang.is_set():
            self.release.wait()
        return True

    def step(self):  # type: ignore[no-untyped-def]
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.hang.is_set():
            self.release.wait()
            return []
        if self.die_in_step.is_set():
            raise EngineDeadError()
        time.sleep(self.step_s)
        self.steps.append(set(self._inside))
        outputs = []
        for request_id in sorted(self._inside):
            self._left[request_id] -= 1
            written = "a" * (self.decode_steps - self._left[request_id])  # a token a step
            finished = self._left[request_id] == 0
            errored = finished and self.prompts[request_id][0] in self.errors
            if self.prompts[request_id][0] in self.aborts:  # the core stopping: it ends it mid-reply
                finished, self._left[request_id], errored = True, 0, False
            reason = "error" if errored else "abort" if self.prompts[request_id][0] in self.aborts else "stop"
            outputs.append(_Out(request_id, finished=finished, text=written, reason=reason))
        self._inside = {r for r in self._inside if self._left[r]}
        return outputs


class _Out:
    def __init__(self, request_id: str, finished: bool = True, text: str = "ok", reason: str = "stop"):
        self.request_id, self.finished = request_id, finished
        self.outputs = [type("Completion", (), {"text": text, "token_ids": [1], "finish_reason": reason})]


def _loop(fake: _ScriptedEngine, **kwargs):  # type: ignore[no-untyped-def]
    from worker.engine_loop import EngineLoop

    return EngineLoop(fake, max_inflight=8, is_dead=lambda: False, **kwargs)


def test_an_idle_engine_whose_core_dies_is_declared_dead_and_the_worker_told(monkeypatch) -> None:
    """Found in review: the core's liveness flag was read only while a caller waited for a request,
    so a core killed while the engine was idle went unnoticed: the health check stayed green and the
    worker took turns until one ran into it (and was blamed for the death)."""
    from worker.engine import EngineDead
    from worker.engine_loop import EngineLoop

    flag = {"dead": False}
    told: list[BaseException] = []
    loop = EngineLoop(_ScriptedEngine(), max_inflight=8, is_dead=lambda: flag["dead"], on_death=told.append)
    (first,) = loop.submit([([1], None, LIVE, None)])
    assert loop.wait([first], timeout=10) == [first] and first.exception() is None  # then idle
    flag["dead"] = True
    deadline = time.monotonic() + 5
    while not told and time.monotonic() < deadline:
        time.sleep(0.05)
    assert told and loop.dead is told[0] and "idle" in str(told[0])
    (late,) = loop.submit([([2], None, LIVE, None)])
    assert isinstance(late.exception(timeout=1), EngineDead) and not late.exception().in_engine
    # Review of that: vLLM marks its core dead as the process stops it at exit; no death is reported.
    flag["dead"], told[:] = False, []
    loop = EngineLoop(_ScriptedEngine(), max_inflight=8, is_dead=lambda: flag["dead"], on_death=told.append)
    loop.shutting = True
    flag["dead"] = True
    time.sleep(1.2)
    assert told == [] and loop.dead is None


def test_a_loop_error_taken_for_a_death_is_logged_with_its_traceback_a_real_death_without(caplog) -> None:
    # Found in review: any error in the loop (a bug of its own, a step error short of a death) stops
    # the worker as an engine death, logged as "the engine died: KeyError('x')" with no traceback.
    import logging

    from worker.engine import EngineDead

    told_turns: list[str] = []

    def died(fake: _ScriptedEngine) -> logging.LogRecord:
        caplog.clear()
        loop = _loop(fake)
        (future,) = loop.submit([([1], None, LIVE, None)])
        assert isinstance(future.exception(timeout=10), EngineDead)
        told_turns[:] = [str(future.exception())]
        (record,) = [r for r in caplog.records if r.getMessage().startswith("the engine died")]
        return record

    class _Buggy(_ScriptedEngine):
        def step(self):  # type: ignore[no-untyped-def]
            raise KeyError("x: a request's own words")

    with caplog.at_level(logging.ERROR, logger="worker.engine_loop"):
        bug = died(_Buggy())
        assert bug.exc_info is not None and bug.exc_info[0] is KeyError
        # tenant review: every turn inside is told the death, other tenants' with it: the kind only
        assert "own words" in bug.getMessage() and told_turns == ["the engine died: KeyError"]
        real = _ScriptedEngine()
        real.die_in_step.set()
        assert died(real).exc_info is None  # vLLM's own death: its message says it all


def test_requests_drained_but_not_admitted_fail_when_the_engine_dies() -> None:
    from worker.engine import EngineDead

    loop = _loop(_ScriptedEngine(die_at_admission=1))
    futures = loop.submit([([1, 2], None, LIVE, None)] * 3)  # one arrival: the second finds it dead
    for future in futures:
        assert loop.wait([future], timeout=30) == [future], "a request was stranded by the engine's death"
    errors = [f.exception() for f in futures]
    assert all(isinstance(e, EngineDead) for e in errors)
    # The first was inside the engine when it died; the second found it dead as it was added (vLLM's
    # client sends nothing then: found in review, it was blamed for the death); the third never came.
    assert [e.in_engine for e in errors] == [True, False, False]
    (late,) = loop.submit([([1], None, BULK, None)])
    assert isinstance(late.exception(timeout=1), EngineDead) and not late.exception().in_engine


def test_a_request_the_engine_ended_with_an_error_fails_alone_as_a_retryable_engine_error() -> None:
    """Found in review: vLLM ends a request whose grammar failed to compile in the engine (or whose KV
    load failed) with finish_reason "error", which it documents as retryable. It came back as a
    Generation, and each reader had to know: a memory job read it as an empty summary."""
    from worker.engine_loop import EngineRequestError

    fake = _ScriptedEngine(decode_steps=2)
    fake.errors = {7}
    loop = _loop(fake)
    errored, fine = loop.submit([([7, 1], None, BULK, None), ([8, 1], None, LIVE, None)])
    assert _all_done([errored, fine], timeout=10)
    assert isinstance(errored.exception(), EngineRequestError)
    assert fine.result().text == "aa" and fine.result().finish_reason == "stop"
    assert loop.dead is None  # one request's error, not the engine's


def test_a_request_the_engine_core_aborted_is_handed_back_not_stored_cut_short() -> None:
    """Found in review: a stop signal that reaches vLLM's core process too makes it abort what it
    holds, each with the text so far and finish_reason "abort"; that half sentence was stored as the
    finished reply (and a structured reply failed for good as unreadable)."""
    from worker.engine import EngineDead

    fake = _ScriptedEngine(decode_steps=3)
    fake.aborts = {7}
    loop = _loop(fake)
    aborted, fine = loop.submit([([7, 1], None, LIVE, None), ([8, 1], None, LIVE, None)])
    assert _all_done([aborted, fine], timeout=10)
    error = aborted.exception()
    assert isinstance(error, EngineDead) and not error.in_engine and not error.present  # uncharged, unblamed
    assert fine.result().text == "aaa"


def test_an_engine_with_no_step_progress_counts_as_dead_and_its_waiters_return() -> None:
    from worker.engine import EngineDead
    from worker.engine_loop import EngineStalled

    fake = _ScriptedEngine()
    fake.hang.set()  # alive, but its step never returns: a hung engine core
    loop = _loop(fake, stall_s=0.5)
    try:
        futures = loop.submit([([1, 2], None, LIVE, None), ([3], None, BULK, None)])
        started = time.monotonic()
        assert loop.wait(futures, timeout=30), "wait() blocked on a stalled engine"
        assert time.monotonic() - started < 10
        assert all(isinstance(f.exception(timeout=1), EngineDead) for f in futures)
        assert isinstance(loop.dead, EngineStalled)
    finally:
        fake.release.set()  # the hung step returns; the loop sees its death and stops


def test_a_request_marked_alone_never_shares_the_engine() -> None:
    fake = _ScriptedEngine()
    loop = _loop(fake)
    others = loop.submit([([i], None, LIVE if i % 2 else BULK, None) for i in range(3)])
    (suspect,) = loop.submit([([99], None, BULK, None)], alone=True)
    others += loop.submit([([i], None, LIVE if i % 2 else BULK, None) for i in range(3, 6)])
    assert _all_done([suspect, *others], timeout=10)
    assert all(f.result().text for f in [suspect, *others])
    steps = [sorted(fake.prompts[r][0] for r in step) for step in fake.steps]
    (suspect_step,) = [step for step in steps if 99 in step]
    assert suspect_step == [99], steps  # the engine held nothing else while it ran
    assert sorted(i for step in steps for i in step) == [0, 1, 2, 3, 4, 5, 99]


def test_an_alone_request_gets_its_turn_within_one_drain_under_steady_live_chat() -> None:
    # Each live request stays three steps; a new one arrives every step: the engine is never empty.
    fake = _ScriptedEngine(decode_steps=3, step_s=0.01)
    loop = _loop(fake)
    live = loop.submit([([i], None, LIVE, None) for i in range(2)])
    held = loop.submit([([50], None, BULK, None)])
    (suspect,) = loop.submit([([99], None, BULK, None)], alone=True)
    deadline = time.monotonic() + 5
    while not suspect.done() and time.monotonic() < deadline:
        live += loop.submit([([len(live)], None, LIVE, None)])
        time.sleep(0.01)
    assert suspect.done(), "the alone request never started while live chat went on"
    assert _all_done([*live, *held], timeout=10)
    steps = [sorted(fake.prompts[r][0] for r in step) for step in fake.steps]
    assert all(step == [99] for step in steps if 99 in step), steps


def test_a_death_counts_for_the_requests_joining_the_engine_not_those_decoding() -> None:
    from worker.engine import EngineDead

    # The engine dies in the step a fourth request joins, before it returned anything: the joining
    # one is the suspect, not the three decoding beside it.
    fake = _ScriptedEngine(decode_steps=1000, step_s=0.005)
    loop = _loop(fake)
    decoding = loop.submit([([i], None, BULK, None) for i in range(3)])
    while len(fake.steps) < 2:  # all three have returned output: they are decoding
        time.sleep(0.01)
    real_add = fake.add_request

    def kills_in_its_step(request_id, prompt, params, **kwargs):  # type: ignore[no-untyped-def]
        real_add(request_id, prompt, params, **kwargs)
        fake.die_in_step.set()  # its prefill kills the core: the next step raises

    fake.add_request = kills_in_its_step  # type: ignore[method-assign]
    (joining,) = loop.submit([([99], None, BULK, None)])  # the request that kills the engine
    assert loop.wait([joining], timeout=10) == [joining]
    assert _all_done(decoding, timeout=10)
    assert joining.exception().in_engine
    assert [f.exception().in_engine for f in decoding] == [False] * 3
    assert all(isinstance(f.exception(), EngineDead) for f in decoding)
    # Not suspects, but inside all the same (found in review: one of them killing the engine mid-reply,
    # beside a joiner every time, was never blamed): each counts a death seen.
    assert [f.exception().present for f in decoding] == [True] * 3
    assert joining.exception().present

    # A request that finds the engine dead as it is added never reached it (vLLM's client checks its
    # liveness flag before it sends): the ones decoding inside count the death, not it. Found in
    # review: the newcomer was blamed and the decoding ones, one of which killed the core, were not.
    fake = _ScriptedEngine(die_at_admission=3, decode_steps=1000, step_s=0.005)
    loop = _loop(fake)
    decoding = loop.submit([([i], None, BULK, None) for i in range(3)])
    while len(fake.steps) < 2:
        time.sleep(0.01)
    (newcomer,) = loop.submit([([99], None, BULK, None)])
    assert loop.wait([newcomer], timeout=10) == [newcomer]
    assert _all_done(decoding, timeout=10)
    assert not newcomer.exception().in_engine and not newcomer.exception().present
    assert [f.exception().in_engine for f in decoding] == [True] * 3

    # With no request joining (every one decoding), each inside counts the death.
    fake = _ScriptedEngine(decode_steps=1000, step_s=0.005)
    loop = _loop(fake)
    decoding = loop.submit([([i], None, BULK, None) for i in range(3)])
    while len(fake.steps) < 2:
        time.sleep(0.01)
    fake.die_in_step.set()
    assert _all_done(decoding, timeout=10)
    assert [f.exception().in_engine for f in decoding] == [True] * 3


class _CoreStepsOnItsOwn(_ScriptedEngine):
    """vLLM's multiprocessing client: its core process steps on its own and queues each step's
    outputs in `engine_core.outputs_queue`; `step()` takes the next (here: what the test puts)."""

    def __init__(self) -> None:
        super().__init__()
        self.engine_core = type("Client", (), {"outputs_queue": queue.Queue()})()

    def step(self):  # type: ignore[no-untyped-def]
        return self.engine_core.outputs_queue.get()


def test_a_live_request_joins_the_engine_while_a_step_runs() -> None:
    fake = _CoreStepsOnItsOwn()
    loop = _loop(fake)
    (bulk,) = loop.submit([([1], None, BULK, None)])
    assert _until(lambda: fake.admitted == ["r0"]), fake.admitted
    # The core is mid-step (no outputs yet): the live request must reach it now, not after the step.
    (live,) = loop.submit([([2], None, LIVE, None)])
    assert _until(lambda: len(fake.admitted) == 2), "the live request waited for the running step"
    fake.engine_core.outputs_queue.put([_Out("r0"), _Out("r1")])
    assert _all_done([bulk, live], timeout=10)
    assert live.result().text == "ok"


def test_cancelled_requests_leave_the_engine_and_their_streams_hear_nothing_more() -> None:
    from worker.engine_loop import RequestCancelled

    fake = _ScriptedEngine(decode_steps=1000, step_s=0.005)
    loop = _loop(fake)
    loop.max_inflight = 2
    heard: dict[int, list[str]] = {0: [], 1: []}
    inside = loop.submit(
        [([i], None, BULK, None) for i in range(2)], on_text=[heard[0].append, heard[1].append]
    )
    assert _until(lambda: len(fake.steps) >= 3 and heard[0]), "the requests never started decoding"
    (kept,) = loop.submit([([7], None, LIVE, None)])
    (waiting,) = loop.submit([([9], None, BULK, None)])  # no room for a third bulk request
    assert _until(lambda: [7] in fake.prompts.values())
    assert loop.cancel([*inside, waiting, kept.__class__()]) == 3  # a stranger future is no one's
    told = {i: len(heard[i]) for i in heard}
    assert all(isinstance(f.exception(timeout=1), RequestCancelled) for f in [*inside, waiting])
    assert _until(lambda: sorted(fake.prompts[r][0] for r in fake.aborted) == [0, 1]), fake.aborted
    steps_then = len(fake.steps)
    assert _until(lambda: len(fake.steps) >= steps_then + 5)
    assert {i: len(heard[i]) for i in heard} == told  # no text after the cancel
    assert [9] not in fake.prompts.values()  # the waiting one never joined
    assert loop.inside() == 1 and loop._bulk_inside == 0 and not kept.done()
    assert loop.cancel([kept]) == 1 and loop.cancel([kept]) == 0  # done ones are left alone


def test_a_core_that_never_returns_outputs_stalls_and_the_loop_stops_waiting_for_it() -> None:
    from worker.engine import EngineDead

    fake = _CoreStepsOnItsOwn()  # nothing ever puts outputs: a hung engine core
    loop = _loop(fake, stall_s=0.5)
    (future,) = loop.submit([([1], None, LIVE, None)])
    assert loop.wait([future], timeout=30) == [future], "wait() blocked on a stalled engine"
    assert isinstance(future.exception(), EngineDead)
    loop._thread.join(timeout=10)
    assert not loop._thread.is_alive(), "the loop's thread still waits on the dead engine"


def _until(condition, timeout: float = 10.0, step: float = 0.01) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def test_a_waiter_wakes_when_its_result_is_set_not_at_its_next_health_look(monkeypatch) -> None:
    """wait() looks at the engine's health every WAIT_SLICE_S; a result set meanwhile (a request's, a
    call's) must wake it at once, or each live reply waits up to a slice more. With the slice made a
    minute long, both come back in seconds."""
    from worker import engine_loop

    class _SlowLoad(_ScriptedEngine):
        def add_lora(self, lora) -> bool:  # type: ignore[no-untyped-def]
            time.sleep(0.5)
            return True

    monkeypatch.setattr(engine_loop, "WAIT_SLICE_S", 60.0)
    loop = _loop(_SlowLoad(decode_steps=5, step_s=0.1))  # each result comes a while after its wait begins
    for start in (lambda: loop.submit([([1], None, LIVE, None)])[0], lambda: loop.call("add_lora", None)):
        future = start()
        started = time.monotonic()
        assert loop.wait([future]) == [future]
        assert time.monotonic() - started < 20, "the waiter slept its whole slice"


def test_an_engine_call_that_hangs_counts_as_a_stall() -> None:
    from worker.engine import EngineDead
    from worker.engine_loop import EngineStalled

    fake = _ScriptedEngine()
    fake.hang.set()  # add_lora never returns: nothing is inside the engine meanwhile
    loop = _loop(fake, stall_s=0.5)
    try:
        future = loop.call("add_lora", None)
        assert loop.wait([future], timeout=10) == [future], "wait() blocked on a hung engine call"
        assert isinstance(future.exception(), EngineDead)
        assert isinstance(loop.dead, EngineStalled)
    finally:
        fake.release.set()


def test_requests_inside_an_engine_whose_call_hung_are_present_not_suspects() -> None:
    """Poison review: an adapter load that hung past the stall limit killed the engine, and every
    request inside was charged the death as a suspect (sent alone, toward engine_crash_loop) for the
    load's fault. A call runs between steps: the call is the suspect, the requests were present."""
    from worker.engine import EngineDead

    class _HangsInLoad(_ScriptedEngine):
        def add_lora(self, lora) -> bool:  # type: ignore[no-untyped-def]
            self.release.wait(30)
            return True

    fake = _HangsInLoad(decode_steps=10**6)
    loop = _loop(fake, stall_s=0.5)
    try:
        (request,) = loop.submit([([1], None, LIVE, None)])
        assert _until(lambda: fake.admitted == ["r0"]), fake.admitted
        call = loop.call("add_lora", None)
        assert loop.wait([call], timeout=10) == [call], "wait() blocked on a hung engine call"
        assert _all_done([request], timeout=10)
        inside, load = request.exception(timeout=1), call.exception(timeout=1)
        assert isinstance(inside, EngineDead) and isinstance(load, EngineDead)
        assert (inside.in_engine, inside.present, load.in_engine) == (False, True, True)
    finally:
        fake.release.set()


def test_an_announced_live_turn_holds_new_bulk_requests_back_until_it_joins() -> None:
    fake = _CoreStepsOnItsOwn()
    loop = _loop(fake)
    loop.live_notice_s = 30  # only the live request's joining may end this hold
    (first,) = loop.submit([([1], None, BULK, None)])
    assert _until(lambda: fake.admitted == ["r0"]), fake.admitted
    loop.expect_live()  # a live message reached the worker; its prompt is still being built
    (held,) = loop.submit([([2], None, BULK, None)])
    fake.engine_core.outputs_queue.put([_Out("r0", finished=False)])  # a step returns: there is room
    time.sleep(0.2)
    assert fake.admitted == ["r0"], "a bulk request joined while an announced live turn was on its way"
    (live,) = loop.submit([([3], None, LIVE, None)], ends_notice=[True])
    assert _until(lambda: fake.admitted == ["r0", "r1"]), fake.admitted  # the live one, alone with r0
    fake.engine_core.outputs_queue.put([_Out("r0", finished=False), _Out("r1")])  # the live one is done
    assert _until(lambda: fake.admitted == ["r0", "r1", "r2"]), "its announcement outlived the live turn"
    fake.engine_core.outputs_queue.put([_Out("r0"), _Out("r2")])
    assert _all_done([first, held, live], timeout=10)


def test_a_live_turn_of_three_candidates_ends_its_own_announcement_only() -> None:
    fake = _CoreStepsOnItsOwn()
    loop = _loop(fake)
    loop.live_notice_s = 30  # only live requests joining may end this hold
    (first,) = loop.submit([([1], None, BULK, None)])
    assert _until(lambda: fake.admitted == ["r0"]), fake.admitted
    loop.expect_live()  # a best-of-3 live turn
    loop.expect_live()  # and another live turn, whose prompt takes longer to build
    futures = loop.submit(
        [([2], None, LIVE, None), ([3], None, LIVE, None), ([4], None, LIVE, None)],
        ends_notice=[True, False, False],
    )
    assert _until(lambda: fake.admitted == ["r0", "r1", "r2", "r3"]), fake.admitted
    assert len(loop._live_notices) == 1, "the three candidates of one turn ended more than its announcement"
    fake.engine_core.outputs_queue.put([_Out("r0", finished=False), _Out("r1"), _Out("r2"), _Out("r3")])
    assert _until(lambda: all(f.done() for f in futures)), "the three candidates did not finish"
    futures += loop.submit([([5], None, BULK, None)])
    fake.engine_core.outputs_queue.put([_Out("r0", finished=False)])  # a step returns: there is room
    time.sleep(0.2)
    assert fake.admitted == ["r0", "r1", "r2", "r3"], "the candidates ended the other turn's announcement"
    futures += loop.submit([([6], None, LIVE, None)], ends_notice=[True])  # the other live turn comes
    assert _until(lambda: fake.admitted == ["r0", "r1", "r2", "r3", "r4"]), fake.admitted
    fake.engine_core.outputs_queue.put([_Out("r0", finished=False), _Out("r4")])  # and is answered
    assert _until(lambda: len(fake.admitted) == 6), "bulk stayed held after every announced turn came"
    fake.engine_core.outputs_queue.put([_Out("r0"), _Out("r5")])
    assert _all_done([first, *futures], timeout=10)


def test_a_live_request_not_marked_as_its_turns_first_ends_no_announcement() -> None:
    fake = _CoreStepsOnItsOwn()
    loop = _loop(fake)
    loop.live_notice_s = 30
    loop.expect_live()
    (regenerated,) = loop.submit([([1], None, LIVE, None)])  # a weak reply generated again, say
    assert _until(lambda: fake.admitted == ["r0"]), fake.admitted
    assert len(loop._live_notices) == 1, "a request no announcement waits for ended one"
    fake.engine_core.outputs_queue.put([_Out("r0")])
    assert _all_done([regenerated], timeout=10)


def test_an_announcement_whose_live_turn_never_comes_lapses() -> None:
    fake = _CoreStepsOnItsOwn()
    loop = _loop(fake)
    loop.live_notice_s = 1.0  # seconds, so that a busy machine's thread hiccup cannot outlast it
    futures = loop.submit([([1], None, BULK, None)])
    assert _until(lambda: fake.admitted == ["r0"]), fake.admitted
    loop.expect_live()  # its turn is never prompted (deferred, or failed before the engine)
    futures += loop.submit([([2], None, BULK, None)])
    fake.engine_core.outputs_queue.put([_Out("r0", finished=False)])
    time.sleep(0.05)
    assert fake.admitted == ["r0"]
    time.sleep(1.0)
    fake.engine_core.outputs_queue.put([_Out("r0", finished=False)])  # the next step after it lapsed
    assert _until(lambda: fake.admitted == ["r0", "r1"]), "an unanswered announcement held bulk for good"
    fake.engine_core.outputs_queue.put([_Out("r0"), _Out("r1")])
    assert _all_done(futures, timeout=10)
    # An idle engine is never held back: there is no step for the bulk prefill to share.
    idle = _loop(_CoreStepsOnItsOwn())
    idle.expect_live()
    (alone,) = idle.submit([([1], None, BULK, None)])
    assert _until(lambda: idle.engine.admitted == ["r0"]), "bulk waited for an announcement in an idle engine"
    idle.engine.engine_core.outputs_queue.put([_Out("r0")])
    assert _all_done([alone], timeout=10)


def test_a_live_message_announces_its_turns_to_the_engine_loop(monkeypatch) -> None:
    import functools

    from tasks.admission import announce_live

    announced: list[str] = []
    stub = type("Loop", (), {"expect_live": lambda self: announced.append("live")})()
    monkeypatch.setattr(engine_module, "get_loop", functools.cache(lambda: stub))
    message = type("Message", (), {"headers": {}})()
    live = ((), {"turn_ids": ["a"], "model": "m", "lane": "live"}, {})
    bulk = ((), {"turn_ids": ["b", "c"], "model": "m", "lane": "bulk"}, {})
    announce_live(message, live)
    assert announced == [], "announced to a loop that was never started"
    engine_module.get_loop()  # the worker's engine loop is running
    announce_live(message, live)
    announce_live(message, bulk)
    announce_live(message, "not a task body")
    announce_live(type("Message", (), {"headers": {"eta": "2026-12-01T12:00:00"}})(), live)  # sent for later
    assert announced == ["live"]


def test_announcements_hold_bulk_back_no_longer_than_the_live_shield_and_then_again(monkeypatch) -> None:
    from worker import engine_loop

    # A second each, not tenths: a thread hiccup on a busy machine must not outlast a window.
    monkeypatch.setattr(engine_loop, "LIVE_SHIELD_S", 1.0)
    monkeypatch.setattr(engine_loop, "BULK_WINDOW_S", 1.0)
    fake = _CoreStepsOnItsOwn()
    loop = _loop(fake)
    loop.live_notice_s = 30  # none lapses: only the shield's cap may let bulk in
    futures = loop.submit([([1], None, BULK, None)])
    assert _until(lambda: fake.admitted == ["r0"]), fake.admitted
    loop.expect_live()  # live messages keep arriving and none reaches the engine (each deferred, say)
    started = time.monotonic()
    futures += loop.submit([([2], None, BULK, None)])

    def step_until(admitted: int) -> float:
        while len(fake.admitted) < admitted and time.monotonic() - started < 10:
            loop.expect_live()
            fake.engine_core.outputs_queue.put([_Out("r0", finished=False)])
            time.sleep(0.02)
        return time.monotonic()

    first = step_until(2)
    assert fake.admitted == ["r0", "r1"], "announcements held bulk back past the live shield"
    assert first - started >= 0.9
    futures += loop.submit([([3], None, BULK, None)])  # within the window: joins at once
    assert step_until(3) - first < 0.8, "bulk waited inside the window after a full hold"
    time.sleep(1.3)  # the window closed: the hold starts again
    again = time.monotonic()
    futures += loop.submit([([4], None, BULK, None)])
    assert step_until(4) - again >= 0.8, "the shield lapsed for good after its first cap"
    assert fake.admitted == ["r0", "r1", "r2", "r3"], "bulk never joined again under steady announcements"
    fake.engine_core.outputs_queue.put([_Out("r0"), _Out("r1"), _Out("r2"), _Out("r3")])
    assert _all_done(futures, timeout=10)


def test_the_busy_clock_keeps_only_the_newest_idle_gaps() -> None:
    """Found in review: every idle-to-busy change appended a gap that only benchmarks read, so a
    live-only worker held one per turn for its whole life (about 100 MB a million turns)."""
    from worker.engine_loop import GAPS_KEPT, BusyClock

    clock = BusyClock()
    for _ in range(GAPS_KEPT + 1000):
        clock.mark(True)
        clock.mark(False)
    busy, gaps = clock.snapshot()
    assert len(gaps) == GAPS_KEPT and busy >= 0
    assert all(a <= b for a, b in gaps) and gaps[-1][1] >= gaps[0][1]


def test_a_batch_handed_back_stops_its_requests_in_the_engine(engine, monkeypatch) -> None:
    # Its claim's hold runs out mid-generation (GenerationTimeout): the turns go back to the queue, and
    # their requests, whose replies would not be stored, no longer take engine steps and bulk room.
    from worker.pipeline import GenerationTimeout

    story = "Tell the whole long story of the road north, every village on the way."
    ids = enqueue_turns(
        [
            new_conversation() | {"message": story, "params": {"max_new_tokens": 400, "seed": i}}
            for i in range(3)
        ],
        send=False,
    )
    from worker.engine_loop import RequestCancelled

    loop = engine_module.get_loop()
    submitted: list = []  # type: ignore[type-arg]  # the batch's requests (the session engine is shared)
    real_submit = loop.submit

    mine = threading.get_ident()

    def recorded(*args, **kwargs):  # type: ignore[no-untyped-def]
        futures = real_submit(*args, **kwargs)
        if threading.get_ident() == mine:  # review: the session worker's own batches submit here too
            submitted.extend(futures)
        return futures

    monkeypatch.setattr(loop, "submit", recorded)
    monkeypatch.setattr(settings, "visibility_timeout", 1)  # how long a claim may be held
    with pytest.raises(GenerationTimeout):
        process_batch(ids)
    assert len(submitted) == 3
    # Those still generating fail with RequestCancelled once the loop's thread has aborted them in vLLM;
    # before, each went on to its 400 tokens and resolved with a reply nobody would store. (A reply
    # that ended before the hold ran out was stored: its turn is done.)
    errors = [f.exception(timeout=60) for f in submitted]
    cancelled = sum(isinstance(e, RequestCancelled) for e in errors)
    assert cancelled and all(e is None or isinstance(e, RequestCancelled) for e in errors), errors
    statuses = [get_turn(t).status for t in ids]
    assert statuses.count(TurnStatus.QUEUED) == cancelled
    assert set(statuses) <= {TurnStatus.QUEUED, TurnStatus.DONE}
    # poison review: an engine too busy to answer within the hold is no fault of the turns': refunded
    assert all(get_turn(t).attempts == 0 for t in ids if get_turn(t).status == TurnStatus.QUEUED)


def test_an_adapter_load_the_engine_dies_in_is_a_suspect_and_one_queued_behind_it_is_not() -> None:
    """Found in review: every engine call was failed in_engine=False, and the pipeline charged the
    death to every turn whose adapter was loading, so a load only queued behind a poison request
    took its turns toward engine_crash_loop. The call running is a suspect now, the others are not."""
    from vllm.v1.engine.exceptions import EngineDeadError

    from worker.engine import EngineDead

    class _DiesInLoad(_ScriptedEngine):
        def add_lora(self, lora) -> bool:  # type: ignore[no-untyped-def]
            self.release.wait(10)  # the second call is queued behind this one meanwhile
            raise EngineDeadError()

    fake = _DiesInLoad()
    loop = _loop(fake)
    running = loop.call("add_lora", "first")
    deadline = time.monotonic() + 10
    while loop._call_since is None and time.monotonic() < deadline:  # the first call is running
        time.sleep(0.01)
    queued = loop.call("add_lora", "second")
    fake.release.set()
    assert _all_done([running, queued], timeout=30)
    errors = [running.exception(timeout=1), queued.exception(timeout=1)]
    assert all(isinstance(e, EngineDead) for e in errors), errors
    assert [e.in_engine for e in errors] == [True, False]


def test_a_death_reported_during_a_warm_shutdown_keeps_its_exit_code(monkeypatch) -> None:
    """Review: Celery's warm shutdown sets should_stop to 0, which `in (None, False)` took for "not
    stopping", so an engine death reported meanwhile turned a clean exit into exit code 3."""
    from types import SimpleNamespace

    from worker import lifecycle

    for before, after in ((0, 0), (None, lifecycle.EXIT_ENGINE_DEAD), (False, lifecycle.EXIT_ENGINE_DEAD)):
        state = SimpleNamespace(should_stop=before)
        monkeypatch.setattr(lifecycle, "worker_state", state)
        lifecycle.stop_for_dead_engine(RuntimeError("the engine core process is gone"))
        assert state.should_stop == after and type(state.should_stop) is type(after), before


def test_bulk_requests_leave_an_adapter_slot_for_a_live_turns_adapter() -> None:
    """Found in review: vLLM schedules no waiting request, a live one either, whose adapter would pass
    max_loras while the running ones fill it; bulk replies of four adapters kept a player's turn to a
    fifth adapted character waiting until one of them drained. Bulk keeps one slot free."""
    from types import SimpleNamespace

    fake = _CoreStepsOnItsOwn()
    loop = _loop(fake, max_loras=2)
    a, b, c = (SimpleNamespace(lora_int_id=i, lora_name=f"voice-{i}") for i in (1, 2, 3))
    (first,) = loop.submit([([1], None, BULK, a)])
    assert _until(lambda: fake.admitted == ["r0"]), fake.admitted
    (second, same) = loop.submit([([2], None, BULK, b), ([3], None, BULK, a)])
    time.sleep(0.2)
    assert fake.admitted == ["r0"], "a bulk request took the last adapter slot"
    (live,) = loop.submit([([4], None, LIVE, c)])
    assert _until(lambda: fake.admitted == ["r0", "r1"]), fake.admitted  # the live one, at once
    assert fake.prompts["r1"] == [4]
    fake.engine_core.outputs_queue.put([_Out("r0"), _Out("r1")])  # adapter a's and c's requests end
    assert _until(lambda: fake.admitted == ["r0", "r1", "r2"]), fake.admitted  # b's, alone: a's waits
    time.sleep(0.2)
    assert fake.admitted == ["r0", "r1", "r2"] and fake.prompts["r2"] == [2], fake.admitted
    fake.engine_core.outputs_queue.put([_Out("r2")])
    assert _until(lambda: fake.admitted == ["r0", "r1", "r2", "r3"]), fake.admitted
    fake.engine_core.outputs_queue.put([_Out("r3")])
    assert _all_done([first, second, same, live], timeout=10)
    # Review: the adapter waiting first held every bulk request back, base-model ones too; a
    # base-model request behind it goes before it (it takes no slot)
    (again,) = loop.submit([([6], None, BULK, a)])
    assert _until(lambda: fake.admitted[4:] == ["r4"]), fake.admitted
    waiting, base, after = loop.submit([([7], None, BULK, b), ([8], None, BULK, None), ([9], None, BULK, a)])
    assert _until(lambda: len(fake.admitted) == 6), fake.admitted
    time.sleep(0.2)
    assert [fake.prompts[r] for r in fake.admitted[5:]] == [[8]], fake.admitted  # b's and a's behind it wait
    fake.engine_core.outputs_queue.put([_Out("r4"), _Out("r5")])
    assert _until(lambda: [fake.prompts[r] for r in fake.admitted[6:]] == [[7]]), fake.admitted
    fake.engine_core.outputs_queue.put([_Out("r6")])
    assert _until(lambda: [fake.prompts[r] for r in fake.admitted[7:]] == [[9]]), fake.admitted
    fake.engine_core.outputs_queue.put([_Out("r7")])
    assert _all_done([again, waiting, base, after], timeout=10)
    one = _loop(_CoreStepsOnItsOwn(), max_loras=1)  # one slot in all: none to keep, bulk is not held
    (alone,) = one.submit([([5], None, BULK, a)])
    assert _until(lambda: one.engine.admitted == ["r0"]), one.engine.admitted
    one.engine.engine_core.outputs_queue.put([_Out("r0")])
    assert _all_done([alone], timeout=10)
