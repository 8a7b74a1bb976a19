"""Roleplay depth on the real pipeline (engine, embedder, PostgreSQL): an imported card with its
lorebook, the manifest, a narrator turn, story events appended by the game, mood and quality."""

from pathlib import Path

from sqlalchemy import select, update

from db.models import Conversation, Message, Role, TurnStatus
from db.session import session_scope
from roleplay.mood import AFFINITY_MAX, AFFINITY_MIN, EMOTIONS, MAX_STEP
from services.characters import add_story_event, import_card
from services.producer import enqueue_turns, get_turn
from tests.conftest import new_conversation, patch_on_this_thread
from worker.pipeline import process_batch

CARDS = Path(__file__).parent / "fixtures" / "cards"


def _answer(requests: list[dict]) -> list:
    ids = enqueue_turns(requests, send=False)
    report = process_batch(ids)
    assert sorted(report.done) == sorted(ids), report.failed
    return [get_turn(i) for i in ids]


def _conversation(external_id: str) -> Conversation:
    with session_scope() as s:
        return s.scalars(select(Conversation).where(Conversation.external_id == external_id)).one()


def test_an_imported_card_answers_with_its_lore_and_the_manifest_adds_up(engine, capsys) -> None:
    from scripts.cli import main as cli

    slug = import_card((CARDS / "mira_v2.json").read_bytes(), "mira").slug
    conv = new_conversation(slug) | {"player_name": "Rowan"}
    (view,) = _answer([conv | {"message": "How strong is the river current tonight?", "params": {"seed": 5}}])
    m = view.context
    lore = {e["name"]: e["reason"] for e in m["lore"]}
    assert lore["River"] == "key 'river' in the player's message"
    assert lore["Whispers"] == "key 'whisper' in recursion step 1: entry 1"  # from River's content
    assert lore["Rule"] == "constant" and "Town" not in lore
    assert (
        "The grey river floods every spring" in view.prompt
        and "Mira never takes payment in silver." in view.prompt
    )
    # Every prompt token is accounted for, and the count is the one the engine was given.
    assert sum(m["sections"].values()) == m["prompt_tokens"] == view.usage["prompt_tokens"]
    assert m["sections"]["lore"] == sum(e["tokens"] for e in m["lore"]) > 0
    assert cli(["manifest", str(view.id)]) == 0
    shown = capsys.readouterr().out
    assert f"{m['prompt_tokens']} of {m['budget_tokens']} tokens" in shown
    assert "lore 1 'River': " in shown and "key 'river' in the player's message" in shown
    assert set(view.quality) >= {"persona", "repetition", "language_match", "below_bar"}
    assert -1.0 <= view.quality["persona"] <= 1.0 and 0.0 <= view.quality["repetition"] <= 1.0


def test_a_narrator_turn_is_stored_as_narration_and_later_turns_see_it(engine) -> None:
    conv = new_conversation("elara") | {"player_name": "Rowan", "story": "ashfall", "story_time": 80}
    (narration,) = _answer([conv | {"message": "Rowan pushes open the cellar door.", "speaker": "narrator"}])
    assert narration.speaker == "narrator" and narration.context["speaker"] == "narrator"
    assert narration.state is None  # the narrator has no mood toward the player
    assert narration.prompt.startswith("<|im_start|>system\nYou are the narrator of this story.")
    with session_scope() as s:
        roles = {m.role for m in s.scalars(select(Message).where(Message.turn_id == narration.id))}
    assert roles == {Role.USER, Role.NARRATOR}
    (reply,) = _answer([conv | {"message": "What is down there?"}])
    assert f"[Narrator] {narration.reply}" in reply.prompt  # retrieved like any history


def test_a_story_event_added_by_the_game_is_retrieved_by_the_next_turn(engine) -> None:
    story = "test-story-" + new_conversation()["conversation"]
    event, _ = add_story_event(
        story, "A comet with a green tail split the night sky over the inn.", scene="Night"
    )
    assert event["ordinal"] == 1 and add_story_event(story, "The comet fell.")[0]["ordinal"] == 2
    conv = new_conversation("elara") | {"player_name": "Rowan", "story": story}
    (view,) = _answer([conv | {"message": "Did you see the comet with the green tail?"}])
    assert event["id"] in [e["id"] for e in view.context["events"]]
    assert "A comet with a green tail split the night sky" in view.prompt


def test_affinity_moves_within_bounds_across_a_scripted_exchange(engine) -> None:
    conv = new_conversation("elara") | {"player_name": "Rowan"}
    _answer([conv | {"message": "Hello."}])
    with session_scope() as s:  # start near the top so the bound is tested, not just the direction
        s.execute(
            update(Conversation).where(Conversation.external_id == conv["conversation"]).values(affinity=95)
        )
    script = [
        "Thank you so much, you're very kind. I brought you a gift, friend.",
        "I really like you, and I'm glad we met. Thank you for everything.",
        "Shut up, you useless liar. I hate you and I'll burn this place down.",
        "You're an idiot and a thief. I stole your money and I don't care.",
    ]
    trail = []
    for line in script:
        (view,) = _answer([conv | {"message": line, "params": {"seed": 1}}])
        before, after = view.state["before"], view.state["after"]
        trail.append((before["affinity"], after["affinity"], after["emotion"]))
        assert AFFINITY_MIN <= after["affinity"] <= AFFINITY_MAX
        assert abs(after["affinity"] - before["affinity"]) <= MAX_STEP
        assert after["emotion"] in EMOTIONS
        stored = _conversation(conv["conversation"])  # written with the reply, in its transaction
        assert (stored.affinity, stored.emotion) == (after["affinity"], after["emotion"])
        assert f"(affinity {before['affinity']} on a scale" in view.prompt  # the state the reply saw
    print("affinity trail (before, after, emotion):", trail)
    assert [t[0] for t in trail[1:]] == [t[1] for t in trail[:-1]]  # each turn starts where the last ended
    assert trail[0][1] == trail[1][1] == AFFINITY_MAX  # kind words raise it, but never past the bound
    assert trail[2][1] < trail[2][0] and trail[3][1] < trail[3][0]  # hostile words lower it


def test_an_unsure_classification_leaves_the_state_and_says_why(engine) -> None:
    conv = new_conversation("elara") | {"player_name": "Rowan"}
    (view,) = _answer([conv | {"message": "The road north takes two days."}])
    assert view.state["after"]["affinity"] == view.state["before"]["affinity"] == 0
    assert any(n.startswith("affinity unchanged: the message reads neither") for n in view.state["notes"])
    assert view.status == TurnStatus.DONE


def test_a_reply_below_the_quality_bar_is_regenerated_once(engine, monkeypatch) -> None:
    from core.settings import settings

    monkeypatch.setattr(settings, "quality_regenerate", True)
    monkeypatch.setattr(
        settings, "quality_min_persona", 1.0
    )  # no reply is that close: every one is regenerated
    conv = new_conversation("elara") | {"player_name": "Rowan"}
    (view,) = _answer([conv | {"message": "Any rooms free tonight?", "params": {"seed": 11}}])
    regen = view.quality["regenerated"]
    assert regen["first"]["below_bar"] and regen["second"]["below_bar"]  # both under the bar: one retry only
    assert regen["kept"] == "first"  # a tie keeps the first reply
    assert view.params["seed"] == 11  # the stored seed reproduces the stored reply


def test_a_kept_second_try_leaves_the_turns_generate_ms_its_first_generations(engine, monkeypatch) -> None:
    """Found in review: a turn whose second try was kept recorded the second generation as its
    generate_ms (already in the group's regenerate_ms) and the first one nowhere."""
    import dataclasses

    from core.settings import settings
    from worker import judge, pipeline

    monkeypatch.setattr(settings, "quality_regenerate", True)
    monkeypatch.setattr(settings, "quality_min_persona", 1.0)  # every first reply is below the bar
    real_judge, real_regenerate = judge._judge, pipeline.regenerate_weak

    def second_passes(turn, gen, vec, message_vec, ctx, prompt, seed=None):  # type: ignore[no-untyped-def]
        verdict = real_judge(turn, gen, vec, message_vec, ctx, prompt, seed)
        if seed == 11:
            return verdict
        return dataclasses.replace(verdict, quality={**verdict.quality, "below_bar": []})

    seen = {}

    def regenerate(judged, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real_regenerate(judged, *args, **kwargs)
        seen["first"], seen["kept"] = judged[0][1], out[0][1]
        return out

    monkeypatch.setattr(judge, "_judge", second_passes)
    monkeypatch.setattr(pipeline, "regenerate_weak", regenerate)
    conv = new_conversation("elara") | {"player_name": "Rowan"}
    (view,) = _answer([conv | {"message": "Any rooms free tonight?", "params": {"seed": 11}}])
    assert view.quality["regenerated"]["kept"] == "second" and view.reply == seen["kept"].text
    first = seen["first"]
    assert seen["kept"] is not first
    assert view.timings["generate_ms"] == round(first.seconds * 1000, 1)
    assert view.timings["first_token_ms"] == round(first.first_token_s * 1000, 1)
    assert view.timings["regenerate_ms"] >= round(seen["kept"].seconds * 1000, 1)


def test_a_greedy_weak_reply_is_not_generated_again(monkeypatch) -> None:
    """Found in review: a greedy request's reply below the bar was generated a second time with the
    next seed: the same text, paid for in its usage, losing the tie."""
    import uuid
    from types import SimpleNamespace

    from worker import engine as engine_module
    from worker import judge
    from worker.engine import GenerationRequest
    from worker.engine_loop import Generation

    asked: list[list[GenerationRequest]] = []

    def generate(requests, deadline=None, on_submit=None):  # type: ignore[no-untyped-def]
        asked.append(list(requests))
        return [Generation("Hm, well.", 2, 3, "stop") for _ in requests]

    patch_on_this_thread(monkeypatch, engine_module, "generate", generate)
    weak = {
        "greedy": GenerationRequest([1, 2], 0.0, 0.9, 32, 7, ()),
        "top_k_1": GenerationRequest([1, 2], 0.7, 0.9, 32, 7, (), controls={"top_k": 1}),
        "sampled": GenerationRequest([1, 2], 0.7, 0.9, 32, 7, ()),
    }
    turns = {name: SimpleNamespace(id=uuid.uuid4(), params={}) for name in weak}
    judged = [
        (turns[name], Generation("Hm.", 2, 3, "stop"), [0.0], judge.Verdict(None, {"below_bar": ["persona"]}))
        for name in weak
    ]
    patch_on_this_thread(monkeypatch, judge, "embed", lambda texts: [[0.0] for _ in texts])
    patch_on_this_thread(monkeypatch, judge, "_judge", lambda *args: judged[2][3])  # the second: a tie
    requests = {turns[name].id: request for name, request in weak.items()}
    each = {turn.id: None for turn in turns.values()}
    out = judge.regenerate_weak(judged, requests, each, each, each)  # type: ignore[arg-type]
    assert [[(r.temperature, r.controls) for r in call] for call in asked] == [[(0.7, {})]]  # one
    assert out[:2] == judged[:2]  # the greedy replies stand as they were
    assert out[2][3].quality["regenerated"]["kept"] == "first"


def test_a_regenerated_reply_that_cannot_be_read_is_dropped_alone(monkeypatch) -> None:
    """Found in review: the second look at a weak reply caught only BadStructuredReply from its
    reader, so any other error there (keep_candidates catches every one) failed the whole claim."""
    from worker import judge
    from worker.engine import GenerationRequest
    from worker.engine_loop import Generation

    def unreadable(shape, gen):  # type: ignore[no-untyped-def]
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(judge, "read_reply", unreadable)
    request = GenerationRequest([1, 2], 0.7, 0.9, 32, 7, (), reply_shape=object())
    result = judge._read(request, Generation('{"say": "hi"}', 2, 3, "stop"))
    assert isinstance(result, RecursionError)


def test_a_weak_replys_second_try_never_costs_the_replies_in_hand(monkeypatch) -> None:
    """Found in review: the second try of weak replies waited for the engine with no deadline (behind
    a bulk backlog the claim's hold ran out, so nothing was stored and the turns were generated
    again elsewhere), and any error in it (a submit, the embedder) failed the whole group."""
    import time
    import uuid
    from concurrent.futures import Future
    from types import SimpleNamespace

    import pytest

    from worker import engine as engine_module
    from worker import judge
    from worker.engine import EngineDead, GenerationRequest, NoTimeLeft
    from worker.engine_loop import Generation

    turn = SimpleNamespace(id=uuid.uuid4(), params={})
    request = GenerationRequest([1, 2], 0.7, 0.9, 32, 7, ())
    weak = [(turn, Generation("Hm.", 2, 3, "stop"), [0.0], judge.Verdict(None, {"below_bar": ["persona"]}))]
    call = (weak, {turn.id: request}, {}, {}, {})
    real_generate = engine_module.generate

    def broken(requests, deadline=None, on_submit=None):  # type: ignore[no-untyped-def]
        raise RuntimeError("the embedder's device went away")

    patch_on_this_thread(monkeypatch, engine_module, "generate", broken)
    assert judge.regenerate_weak(*call) == weak  # type: ignore[arg-type]

    def dead(requests, deadline=None, on_submit=None):  # type: ignore[no-untyped-def]
        raise EngineDead("gone")

    patch_on_this_thread(monkeypatch, engine_module, "generate", dead)
    with pytest.raises(EngineDead):  # a dead engine still ends the batch (its turns go back uncharged)
        judge.regenerate_weak(*call)  # type: ignore[arg-type]

    # The deadline: a request still generating then is cancelled and answered NoTimeLeft.
    never: Future = Future()
    cancelled: list[object] = []
    loop = SimpleNamespace(
        wait=lambda futures, timeout=None: time.sleep(min(timeout or 0.01, 0.01)) or [],
        cancel=lambda futures: cancelled.extend(futures) or len(futures),
    )
    patch_on_this_thread(monkeypatch, engine_module, "submit", lambda requests: [never])
    patch_on_this_thread(monkeypatch, engine_module, "get_loop", lambda: loop)
    (late,) = real_generate([request], deadline=time.monotonic() + 0.05)
    assert isinstance(late, NoTimeLeft) and cancelled == [never]
    # review: a deadline already past submits nothing; an engine death at the deadline still raises
    submitted: list[object] = []
    patch_on_this_thread(
        monkeypatch, engine_module, "submit", lambda requests: submitted.append(1) or [never]
    )
    (late,) = real_generate([request], deadline=time.monotonic() - 1)
    assert isinstance(late, NoTimeLeft) and submitted == []
    died: Future = Future()
    died.set_exception(EngineDead("gone"))
    loop.wait = lambda futures, timeout=None: time.sleep(min(timeout or 0.01, 0.01)) or []  # not seen
    patch_on_this_thread(monkeypatch, engine_module, "submit", lambda requests: [died])
    with pytest.raises(EngineDead):
        real_generate([request], deadline=time.monotonic() + 0.05)


def test_a_weak_replys_second_try_the_engine_ended_with_an_error_is_never_judged(monkeypatch) -> None:
    """Found in review: a second try that vLLM ended with finish_reason "error" (its retryable
    request-level error) was judged on whatever text it had, and could replace the first reply."""
    import uuid
    from types import SimpleNamespace

    import numpy as np

    from worker import engine as engine_module
    from worker import judge
    from worker.engine import GenerationRequest
    from worker.engine_loop import EngineRequestError, Generation

    turn = SimpleNamespace(id=uuid.uuid4(), params={})
    request = GenerationRequest([1, 2], 0.7, 0.9, 32, 7, ())
    weak = [(turn, Generation("Hm.", 2, 3, "stop"), [0.0], judge.Verdict(None, {"below_bar": ["persona"]}))]
    embedded: list[list[str]] = []
    monkeypatch.setattr(
        engine_module, "generate", lambda requests, **_: [EngineRequestError("ended with an error")]
    )
    monkeypatch.setattr(
        judge, "embed", lambda texts: embedded.append(list(texts)) or np.zeros((len(texts), 384))
    )
    assert judge.regenerate_weak(weak, {turn.id: request}, {}, {}, {}) == weak  # type: ignore[arg-type]
    assert embedded == []  # never embedded to be judged


def test_a_weak_replys_second_request_is_blamed_for_an_engine_death_and_cancelled_when_unread(
    monkeypatch,
) -> None:
    """Found in review: the second try's requests were not among the batch's futures, so an engine
    that died of one did not count the death against its turn (a poison second try was sent round for
    ever), and if waiting for them raised they generated on to max_tokens with nobody reading."""
    import uuid
    from concurrent.futures import Future
    from types import SimpleNamespace

    import pytest

    from worker import engine as engine_module
    from worker import judge
    from worker.engine import EngineDead, GenerationRequest
    from worker.engine_loop import Generation
    from worker.pipeline import _death_of

    turn = SimpleNamespace(id=uuid.uuid4(), params={})
    request = GenerationRequest([1, 2], 0.7, 0.9, 32, 7, ())
    weak = [(turn, Generation("Hm.", 2, 3, "stop"), [0.0], judge.Verdict(None, {"below_bar": ["persona"]}))]
    first: Future = Future()
    first.set_result(weak[0][1])
    futures_of: dict = {turn.id: [first]}
    killer: Future = Future()
    killer.set_exception(EngineDead("gone", in_engine=True))
    cancelled: list[object] = []
    loop = SimpleNamespace(wait=lambda futures, timeout=None: list(futures), cancel=cancelled.extend)
    patch_on_this_thread(monkeypatch, engine_module, "get_loop", lambda: loop)
    patch_on_this_thread(monkeypatch, engine_module, "submit", lambda requests: [killer])
    with pytest.raises(EngineDead):
        judge.regenerate_weak(weak, {turn.id: request}, {}, {}, {}, futures_of=futures_of)  # type: ignore[arg-type]
    assert futures_of[turn.id] == [first, killer] and _death_of(killer).in_engine  # type: ignore[union-attr]

    unread: Future = Future()

    def interrupted(futures, timeout=None):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt  # a warm shutdown while the second try generates

    loop.wait = interrupted
    patch_on_this_thread(monkeypatch, engine_module, "submit", lambda requests: [unread])
    with pytest.raises(KeyboardInterrupt):
        engine_module.generate([request])
    assert cancelled == [unread]


def test_a_weak_replys_second_try_loads_its_adapter_first(monkeypatch) -> None:
    """Found in review: the second try of weak replies named their adapters without loading them;
    vLLM may have evicted one since the batch loaded it (other threads' adapters, more than it keeps),
    and a request naming an evicted adapter reloads it inside an engine step, where a volume blip
    kills the engine core: every tenant's turns handed back. One that cannot load keeps its first."""
    import uuid
    from types import SimpleNamespace

    from worker import engine as engine_module
    from worker import judge
    from worker.engine import Adapter, AdapterUnavailable, GenerationRequest
    from worker.engine_loop import Generation

    voiced, unreadable = Adapter("voice@v1", 1, "/a"), Adapter("gone@v2", 2, "/b")
    turns = [SimpleNamespace(id=uuid.uuid4(), params={}) for _ in range(3)]
    requests = {
        t.id: GenerationRequest([1, 2], 0.7, 0.9, 32, 7, (), adapter=a)
        for t, a in zip(turns, (voiced, unreadable, None), strict=True)
    }
    weak = [
        (t, Generation("Hm.", 2, 3, "stop"), [0.0], judge.Verdict(None, {"below_bar": ["persona"]}))
        for t in turns
    ]
    loads: list[str] = []

    def load_adapter(adapter):  # type: ignore[no-untyped-def]
        loads.append(adapter.name)
        if adapter is unreadable:
            raise AdapterUnavailable("cannot read adapter_config.json", retry_in=60.0)

    asked: list[object] = []

    def generate(requests, deadline=None, on_submit=None):  # type: ignore[no-untyped-def]
        asked.extend(r.adapter for r in requests)
        return [Generation("Well met, traveller.", 2, 5, "stop") for _ in requests]

    patch_on_this_thread(monkeypatch, engine_module, "load_adapter", load_adapter)
    in_hand = {voiced.name, unreadable.name}  # review: one not in hand is not loaded anew (a wait)
    patch_on_this_thread(monkeypatch, engine_module, "adapter_in_hand", lambda a: a.name in in_hand)
    patch_on_this_thread(monkeypatch, engine_module, "generate", generate)
    patch_on_this_thread(monkeypatch, judge, "embed", lambda texts: [[0.0]] * len(texts))
    patch_on_this_thread(monkeypatch, judge, "_judge", lambda *a: judge.Verdict(None, {"below_bar": []}))
    each = {t.id: None for t in turns}
    out = judge.regenerate_weak(weak, requests, each, each, each)  # type: ignore[arg-type]
    assert sorted(loads) == ["gone@v2", "voice@v1"]
    assert asked == [voiced, None]  # the turn whose adapter did not load keeps its first reply
    assert out[1] == weak[1]
    assert out[0][1].text == "Well met, traveller." and out[2][1].text == "Well met, traveller."
    loads.clear()
    in_hand.clear()
    asked.clear()
    out = judge.regenerate_weak(weak, requests, each, each, each)  # type: ignore[arg-type]
    assert loads == [] and asked == [None] and out[0] == weak[0]
