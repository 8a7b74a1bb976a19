"""Best of n on the real engine: n candidates of one turn in the same engine call, the one the quality
gate ranks first kept, the others stored as alternatives that a run export can include."""

import json
import threading
import time

from db.models import RunStatus
from services.producer import enqueue_turns, wait_for_reply
from services.runs import export_run, run_state, submit_run
from services.runs.openai_lines import LineOptions
from tests.conftest import new_conversation


def _rank(quality: dict) -> tuple[int, float]:
    return (len(quality["below_bar"]), -(quality["persona"] - quality["self_repetition"]))


def test_a_turn_asking_for_three_candidates_keeps_the_best_and_stores_the_rest(celery_worker) -> None:
    request = new_conversation("elara") | {
        "message": "What is the safest road to the coast?",
        "params": {"n": 3, "seed": 11, "max_new_tokens": 24},
    }
    (turn_id,) = enqueue_turns([request])
    view = wait_for_reply(turn_id, timeout=300)
    assert view.reply and view.quality["candidates"] == 3
    assert len(view.alternatives) == 2
    assert {view.params["seed"]} | {a["seed"] for a in view.alternatives} == {11, 12, 13}
    assert all(_rank(view.quality) <= _rank(a["quality"]) for a in view.alternatives)
    assert all(a["text"] and a["finish_reason"] in ("stop", "length") for a in view.alternatives)


def test_a_run_with_two_candidates_exports_its_alternatives_for_writers(celery_worker, tmp_path) -> None:
    path = tmp_path / "drafts.jsonl"
    lines = [
        {
            "custom_id": f"d{i}",
            "character": "luffy",
            "message": f"배 위에서 뭐 해? {i}",
            "params": {"max_new_tokens": 16},
        }
        for i in range(3)
    ]
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    sub = submit_run(path, name="drafts-" + tmp_path.name, options=LineOptions(candidates=2))
    deadline = time.monotonic() + 300
    while (state := run_state(sub.name)).status != RunStatus.COMPLETED:
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    results, _, n_ok, _ = export_run(sub.name, tmp_path / "out", alternatives=True)
    exported = [json.loads(x) for x in results.read_text(encoding="utf-8").splitlines()]
    assert n_ok == 3 and all(x["quality"]["candidates"] == 2 for x in exported)
    assert all(len(x["alternatives"]) == 1 and x["alternatives"][0]["seed"] != x["seed"] for x in exported)


def test_a_batch_of_candidates_accounts_every_candidates_tokens(engine, monkeypatch) -> None:
    """process_batch end to end in this process (no worker): it used to raise in its accounting once
    a turn had several candidates, after storing the replies. And what it accounts is every
    candidate's tokens (found in review: only the replies were checked, not the count)."""
    from core import metrics
    from worker.inline import answer_now

    counted: list[dict[str, int]] = []
    record, here = metrics.record_batch, threading.get_ident()  # answer_now answers on this thread

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        if threading.get_ident() == here:  # not the session worker's batches
            counted.append(kwargs["tokens"])
        return record(*args, **kwargs)

    monkeypatch.setattr(metrics, "record_batch", counting)
    request = new_conversation("luffy") | {"message": "고기 먹자!", "params": {"n": 2, "max_new_tokens": 8}}
    (view,) = answer_now([request])
    assert view.reply and view.quality["candidates"] == 2 and len(view.alternatives) == 1
    paid = view.usage["completion_tokens"] + view.alternatives[0]["completion_tokens"]
    assert sum(t.get("completion", 0) for t in counted) == paid


def test_a_turns_generation_lasts_until_its_last_candidate_not_the_one_kept(engine, monkeypatch) -> None:
    """Found in review: a best of n's generate_ms was the kept candidate's; a turn waits for every
    candidate, so the rest of its generation was in no stage (ops under-read it up to n times)."""
    import dataclasses

    from tests.conftest import patch_on_this_thread
    from worker import pipeline
    from worker.inline import answer_now

    real = pipeline.keep_candidates

    def the_first_quick_the_others_slow(shape, generated, *, choices=1):  # type: ignore[no-untyped-def]
        first = generated[0][1]  # every candidate its text (a tie: the first is kept), the others slower
        for i, (seed, _) in enumerate(generated):
            generated[i] = (seed, dataclasses.replace(first, seconds=0.001 if i == 0 else 9.0))
        return real(shape, generated, choices=choices)

    patch_on_this_thread(monkeypatch, pipeline, "keep_candidates", the_first_quick_the_others_slow)
    request = new_conversation("elara") | {"message": "Any rooms?", "params": {"n": 3, "max_new_tokens": 8}}
    (view,) = answer_now([request])
    assert view.quality["candidates"] == 3 and view.timings["generate_ms"] == 9000.0, view.timings
