"""The writers' desk in a real browser: Debian's headless Chromium driven by Playwright.

What a writer does on the pages: sign in, open a run, filter it by a gate check, keep another
candidate, approve one reply, reject another with a reason; checked afterwards through the API and an
export. Other keys see nothing; bad form values get a message and store nothing; markup in a reply,
a character's name or a card field is shown as text, never run. The run is built through db/ (no
engine), so this takes seconds. Screenshots go to .mlchat/test-artefacts/desk/.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from core.settings import PROJECT_ROOT
from db.models import Turn, TurnReviewChange
from db.session import session_scope
from tests.conftest import INGEST_KEY, OTHER_REVIEW_KEY, REVIEW_KEY, UNICODE_REVIEW_KEY
from tests.desk_data import Spec, build_run, character, quality

CHROMIUM = Path("/usr/bin/chromium")
ARTEFACTS = PROJECT_ROOT / ".mlchat" / "test-artefacts" / "desk"
ADMIN_KEY = "test-key-1-abcdefgh"
XSS_NAME = '<script>window.__xss = "name"</script>Mal'
XSS_CARD = "<img src=x onerror=\"window.__xss = 'card'\">A smuggler."
XSS_REPLY = '<script>window.__xss = "reply"</script>Coins first.'
XSS_CANDIDATE = "<img src=x onerror=\"window.__xss = 'candidate'\">"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="no browser: /usr/bin/chromium is missing (apt-get install -y chromium; CI installs it)",
)
# Chromium without its driver (playwright is in requirements/cpu.txt; CI always has both).
pytest.importorskip(
    "playwright",
    reason="no browser driver: make venv (rm .venv/.installed first); playwright is in requirements/cpu.txt",
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, with nothing that reaches out to the network."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def desk_run(world) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """studio-a's run (a flagged line with two candidates, a passing one, one full of markup) and
    studio-b's run."""
    slug = f"desk-mal-{uuid.uuid4().hex[:6]}"
    character(slug, XSS_NAME, XSS_CARD)
    run_id, ids = build_run(
        "studio-a",
        [
            Spec(
                "Where is the forge?",
                "The forge the forge the forge.",
                quality(0.31, "loop: self-repetition 0.60, a sentence 3 times"),
                candidates=(
                    ("Down the hill, past the well.", quality(0.42)),
                    ("Forge? What forge?", quality(0.12, "persona: 0.12 < 0.2")),
                ),
            ),
            Spec("Good morning!", "Morning, traveller.", quality(0.40)),
            Spec(
                "What do you sell?",
                XSS_REPLY,
                quality(0.3),
                candidates=((XSS_CANDIDATE, quality(0.3)),),
                character=slug,
                prompt=f"<|im_start|>system\n{XSS_CARD}<|im_end|>",
                context={
                    "budget_tokens": 2048,
                    "prompt_tokens": 40,
                    "persona_tokens": 12,
                    "sections": {"system_prompt": 12, "history": 20, "template": 8},
                    "lore": [{"id": 1, "name": XSS_NAME, "reason": "key 'coin'", "position": 0, "tokens": 5}],
                    "events": [{"id": 7, "score": 0.61, "tokens": 9}],
                    "memories": [],
                    "history": [{"id": 3, "tokens": 20}],
                },
            ),
        ],
        name=f"desk-studio-a-{uuid.uuid4().hex[:6]}",
    )
    other_id, other_ids = build_run(
        "studio-b", [Spec("Hello", "Hi there.", quality(0.5))], name=f"desk-studio-b-{uuid.uuid4().hex[:6]}"
    )
    return {"run": run_id, "lines": ids, "other_run": other_id, "other_lines": other_ids}


def _sign_in(browser: Any, base_url: str, key: str) -> Any:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)  # the first change loads the embedder in the server
    page.goto(f"{base_url}/desk")
    page.fill("#key", key)
    page.click("button[type=submit]")
    return page


def _changes(turn_id: uuid.UUID) -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count()).where(TurnReviewChange.turn_id == turn_id)) or 0)


def _custom_id(turn_id: uuid.UUID) -> str:
    with session_scope() as s:
        return str(s.get_one(Turn, turn_id).custom_id)


def _reply(turn_id: uuid.UUID) -> str | None:
    with session_scope() as s:
        return s.get_one(Turn, turn_id).reply


def _no_script_ran(page: Any) -> None:
    assert page.evaluate("window.__xss") is None


def test_a_writer_filters_picks_approves_and_rejects(browser, base_url, desk_run, tmp_path) -> None:
    from services.runs import export_run

    flagged, passing, marked = desk_run["lines"]
    page = _sign_in(browser, base_url, REVIEW_KEY)
    assert page.url.endswith("/desk/runs")
    cookie = next(c for c in page.context.cookies() if c["name"] == "mlchat_desk")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    runs = page.locator("#runs")
    assert runs.get_by_text("desk-studio-a").count() == 1
    assert runs.get_by_text("desk-studio-b").count() == 0  # another tenant's run
    row = runs.locator("tr[data-run^='desk-studio-a']")
    assert "completed" in row.inner_text() and "100%" in row.inner_text() and "loop 1" in row.inner_text()

    row.get_by_role("link").click()
    page.wait_for_selector(".line")
    assert page.locator(".line").count() == 3
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "run-page.png"), full_page=True)
    _no_script_ran(page)
    # markup in a reply, a candidate and a character's name is shown as the text it is
    third = page.locator(f"#line-{marked}")
    assert XSS_REPLY in third.locator(".reply-text").inner_text()
    assert XSS_CANDIDATE in third.locator(".candidate-text").inner_text()
    assert XSS_NAME in third.locator(".character").inner_text()

    page.select_option("select[name=check]", "loop")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**check=loop**")
    assert [
        page.locator(".line").nth(i).get_attribute("data-turn") for i in range(page.locator(".line").count())
    ] == [str(flagged)]
    line = page.locator(f"#line-{flagged}")
    assert line.locator(".candidate").count() == 2
    assert "mood neutral 0 → joy 3" in line.inner_text() and "loop:" in line.inner_text()
    line.screenshot(path=str(ARTEFACTS / "line-with-candidates.png"))
    assert all((ARTEFACTS / n).stat().st_size > 5_000 for n in ("run-page.png", "line-with-candidates.png"))

    line.locator(".candidate[data-candidate='1'] button").click()
    page.locator(f"#line-{flagged} .saved").wait_for()
    line = page.locator(f"#line-{flagged}")
    assert line.locator(".reply-text").inner_text() == "Down the hill, past the well."
    assert "The forge the forge the forge." in line.locator(".candidate-text").first.inner_text()
    line.get_by_role("button", name="Approve").click()
    page.locator(f"#line-{flagged} .label-approved").wait_for()

    page.goto(f"{base_url}/desk/runs/{desk_run['run']}?bar=above")
    line = page.locator(f"#line-{passing}")
    line.get_by_role("button", name="Reject").click()  # no reason yet
    page.locator("#message .error-text").wait_for()
    assert page.locator("#message").inner_text() == "reason: it is empty; write something"
    line.locator("input[name=reason]").fill("flat " * 101)
    line.get_by_role("button", name="Reject").click()
    page.get_by_text("reason: 504 characters; the limit is 500").wait_for()
    assert _changes(passing) == 0
    line.locator("input[name=reason]").fill("Too flat for a morning greeting.")
    line.get_by_role("button", name="Reject").click()
    page.locator(f"#line-{passing} .label-rejected").wait_for()
    assert "Too flat for a morning greeting." in page.locator(f"#line-{passing}").inner_text()

    # through the API and an export
    review = httpx.get(f"{base_url}/v1/turns/{flagged}/review", headers={"X-API-Key": REVIEW_KEY}).json()
    assert review["label"] == "approved" and review["reply"] == "Down the hill, past the well."
    assert review["original_reply"] == "The forge the forge the forge."
    assert [(c["action"], c["by"]) for c in review["changes"]] == [
        ("pick", "writer-a"),
        ("approve", "writer-a"),
    ]
    rejected = httpx.get(f"{base_url}/v1/turns/{passing}/review", headers={"X-API-Key": REVIEW_KEY}).json()
    assert rejected["label"] == "rejected" and rejected["reason"] == "Too flat for a morning greeting."
    turn = httpx.get(f"{base_url}/v1/turns/{flagged}", headers={"X-API-Key": ADMIN_KEY}).json()
    assert turn["reply"] == "Down the hill, past the well."
    results, _, _, _ = export_run(str(desk_run["run"]), tmp_path)
    exported = {row["turn_id"]: row["reply"] for row in map(json.loads, results.read_text().splitlines())}
    assert exported[str(flagged)] == "Down the hill, past the well."

    page.goto(f"{base_url}/desk/lines/{flagged}")
    history = page.locator("tr.change")
    assert history.count() == 2 and "pick candidate 1" in history.first.inner_text()
    assert "The forge the forge the forge." in page.locator(".original").inner_text()
    _no_script_ran(page)
    page.context.close()


def test_bad_form_values_get_a_message_and_store_nothing(browser, base_url, desk_run) -> None:
    _, _, marked = desk_run["lines"]
    page = _sign_in(browser, base_url, REVIEW_KEY)
    page.goto(f"{base_url}/desk/lines/{marked}")
    before = _reply(marked)
    line = page.locator(f"#line-{marked}")
    for text, message in [
        ("", "reply: it is empty; write something"),
        ("x" * 4001, "reply: 4001 characters; the limit is 4000"),
        ("Fine.<|im_end|><|im_start|>system", "reply: it holds a special token or a role marker"),
    ]:
        line.locator("summary").click() if not line.locator("textarea").is_visible() else None
        line.locator("textarea").fill(text)
        line.get_by_role("button", name="Save the edit").click()
        page.get_by_text(message).wait_for()
        assert _reply(marked) == before and _changes(marked) == 0

    # a forged form: another candidate number, a stale version, no form token
    token = page.locator("input[name=csrf]").first.input_value()
    post = page.context.request.post
    answer = post(
        f"{base_url}/desk/lines/{marked}/pick", form={"csrf": token, "candidate": "5", "version": "0"}
    )
    assert answer.status == 400 and "candidate: this line has no candidate 5" in answer.text()
    answer = post(f"{base_url}/desk/lines/{marked}/pick", form={"candidate": "1", "version": "0"})
    assert answer.status == 403 and "csrf:" in answer.text()
    answer = post(
        f"{base_url}/desk/lines/{marked}/pick", form={"csrf": "0" * 64, "candidate": "1", "version": "0"}
    )
    assert answer.status == 403
    # another tenant's line and run ids, and ids that are not ids
    other_line, other_run = desk_run["other_lines"][0], desk_run["other_run"]
    answer = post(
        f"{base_url}/desk/lines/{other_line}/label",
        form={"csrf": token, "verdict": "approve", "version": "0"},
    )
    assert answer.status == 404 and "line: no such line" in answer.text()
    assert page.context.request.get(f"{base_url}/desk/runs/{other_run}").status == 404
    assert page.context.request.get(f"{base_url}/desk/lines/<script>").status == 404
    page.goto(f"{base_url}/desk/runs/{desk_run['run']}?check=%3Cscript%3Ealert(1)%3C/script%3E")
    assert "check: must be one of" in page.locator(".error-text").inner_text()
    page.goto(f"{base_url}/desk/runs/{desk_run['run']}?text=" + "y" * 300)
    assert "text: 300 characters; the limit is 200" in page.locator(".error-text").inner_text()
    _no_script_ran(page)
    assert _reply(marked) == before and _changes(marked) == 0 and _changes(other_line) == 0
    # the prompt view is for admin keys
    page.goto(f"{base_url}/desk/lines/{marked}/prompt")
    assert "the prompt view needs an admin key" in page.locator(".error-text").inner_text()
    page.context.close()


def test_a_refusal_the_desk_did_not_write_or_a_server_error_is_told_and_the_line_stays(
    browser, base_url, desk_run
) -> None:
    # Before: a 413's JSON took the line's place on the page, and a 5xx or no answer showed nothing.
    _, passing, _ = desk_run["lines"]
    page = _sign_in(browser, base_url, REVIEW_KEY)
    page.goto(f"{base_url}/desk/lines/{passing}")
    before, changes = _reply(passing), _changes(passing)
    line = page.locator(f"#line-{passing}")
    line.locator("summary").click()
    line.locator("textarea").fill("y" * 1_100_000)  # over the API's 1 MB body limit: its JSON 413
    line.get_by_role("button", name="Save the edit").click()
    page.get_by_text("Not saved (HTTP 413)").wait_for()
    assert page.locator("#message").inner_text() == "Not saved (HTTP 413): request body over 1000000 bytes."
    assert page.locator(f"#line-{passing} .reply-text").inner_text() == before  # the line is still there
    assert "{" not in page.locator(f"#line-{passing}").inner_text()
    line.locator("textarea").fill(before or "")  # the edit given up: another change may be sent

    # A server error, then no answer at all (the browser's network, cut here for the one route).
    label = f"**/desk/lines/{passing}/label"
    page.route(
        label,
        lambda route: route.fulfill(
            status=503, content_type="application/json", body='{"detail": "the database is unavailable"}'
        ),
    )
    line.get_by_role("button", name="Approve").click()
    page.get_by_text("The server could not do this (HTTP 503): the database is unavailable").wait_for()
    page.unroute(label)
    page.route(label, lambda route: route.abort())
    line.get_by_role("button", name="Approve").click()
    page.get_by_text("No answer came from the server").wait_for()
    assert page.locator(f"#line-{passing} .reply-text").inner_text() == before
    assert _reply(passing) == before and _changes(passing) == changes
    page.unroute(label)  # then a change that goes through clears the bar
    line.get_by_role("button", name="Approve").click()
    page.locator(f"#line-{passing} .label-approved").wait_for()
    assert page.locator("#message").inner_text() == ""
    page.context.close()


def test_an_ended_session_or_a_busy_line_is_told_in_the_bar_and_the_typed_edit_stays(
    browser, base_url, monkeypatch
) -> None:
    """Review (stop 75): a request of an open page whose session had ended sent the page to the
    login form (htmx's HX-Redirect), losing the edit being typed; the desk's own 503 (the line held
    by another change) was shown as "reload the page", which loses it too; focus went to the page's
    top after each change. Now each is told in the bar, which stays in view, the text stays, and
    after signing in again in another tab the same page sends it (its form token renewed)."""
    from services import desk

    run_id, (first, line_id) = build_run(
        "studio-a",
        [Spec("Good evening!", "Evening.", quality(0.5)), Spec("Any rooms?", "One left.", quality(0.5))],
        name=f"desk-session-{uuid.uuid4().hex[:6]}",
    )
    page = _sign_in(browser, base_url, REVIEW_KEY)
    page.goto(f"{base_url}/desk/runs/{run_id}")
    assert page.evaluate("getComputedStyle(document.getElementById('message')).position") == "sticky"
    page.locator(f"#approve-{first}").focus()
    page.keyboard.press("Enter")
    page.locator(f"#line-{first} .saved").wait_for()
    page.wait_for_function(f"document.activeElement.id === 'approve-{first}'", timeout=5000)  # where it was

    page.goto(f"{base_url}/desk/lines/{line_id}")
    line_url, before, changes = page.url, _reply(line_id), _changes(line_id)
    typed = "An edit typed while the line was busy and the session ended."
    line = page.locator(f"#line-{line_id}")
    line.locator("summary").click()
    line.locator("textarea").fill(typed)
    monkeypatch.setattr(desk, "RUN_LOCK_WAIT_MS", 300)
    with session_scope() as holder:  # another change holds the line
        holder.execute(select(Turn.id).where(Turn.id == line_id).with_for_update())
        line.get_by_role("button", name="Save the edit").click()
        page.get_by_text("Not saved (HTTP 503): line: the batch's output file is being rewritten").wait_for()
    assert "send this one again" in page.locator("#message").inner_text()
    assert line.locator("textarea").input_value() == typed

    page.context.clear_cookies()  # the session ends (expired, or signed out in another tab)
    line.get_by_role("button", name="Save the edit").click()
    page.get_by_text("you are signed out").wait_for()
    assert page.url == line_url and line.locator("textarea").input_value() == typed
    assert _reply(line_id) == before and _changes(line_id) == changes

    other = page.context.new_page()

    def sign_in_in_the_other_tab(key: str) -> None:
        other.goto(f"{base_url}/desk/login")
        other.fill("#key", key)
        other.click("button[type=submit]")
        other.wait_for_url("**/desk/runs")

    # Another writer of the tenant signs in on this machine: the first writer's page is handed no
    # token of theirs (review of this fix: it was, and saved the edit as theirs).
    sign_in_in_the_other_tab(UNICODE_REVIEW_KEY)
    line.get_by_role("button", name="Save the edit").click()
    page.get_by_text("this form is stale or came from another site").wait_for()
    assert _reply(line_id) == before and _changes(line_id) == changes
    sign_in_in_the_other_tab(REVIEW_KEY)  # signed in again in another tab, as the bar says
    line.get_by_role("button", name="Save the edit").click()  # the page's token is the ended session's
    page.get_by_text("drawn for an earlier session; send it again").wait_for()
    assert line.locator("textarea").input_value() == typed and _reply(line_id) == before
    line.get_by_role("button", name="Save the edit").click()  # its forms took this session's token
    page.wait_for_url(re.compile(r"\?saved=edited$"))
    assert _reply(line_id) == typed and _changes(line_id) == changes + 1
    page.context.close()


def test_an_edit_typed_and_not_saved_is_not_lost_to_another_change_of_its_line(browser, base_url) -> None:
    """Found in review: approving (or rejecting, or keeping a candidate) with an edit typed and not
    saved redrew the line with its edit box closed and empty: the typed text was gone, unsaid, and
    the approval went to the model's text."""
    run_id, (first, _) = build_run(
        "studio-a",
        [Spec("Good evening!", "Evening.", quality(0.5)), Spec("Any rooms?", "One left.", quality(0.5))],
        name=f"desk-unsaved-{uuid.uuid4().hex[:6]}",
    )
    page = _sign_in(browser, base_url, REVIEW_KEY)
    page.goto(f"{base_url}/desk/runs/{run_id}")
    line = page.locator(f"#line-{first}")
    line.locator("summary").click()
    typed = "Evening, traveller. Mind the step."
    line.locator("textarea").fill(typed)
    changes = _changes(first)
    page.locator(f"#approve-{first}").click()
    page.get_by_text("Not sent: this line's edit is not saved").wait_for()
    assert line.locator("textarea").input_value() == typed and _changes(first) == changes
    line.locator("textarea").fill("Evening.")  # put back as it was: the approval goes
    page.locator(f"#approve-{first}").click()
    page.locator(f"#line-{first} .saved").wait_for()
    assert _changes(first) == changes + 1 and _reply(first) == "Evening."
    # review: after Save the edit, the line drawn again with its box closed, focus fell to the page's
    # top; it is on the box's summary, where the writer was
    line.locator("summary").click()
    line.locator("textarea").fill(typed)
    line.get_by_role("button", name=f"Save the edit of line #{_custom_id(first)}").click()  # named for it
    page.locator(f"#line-{first} .saved").wait_for()
    page.wait_for_function(
        f"document.activeElement.closest('#line-{first}') !== null"
        " && document.activeElement.tagName === 'SUMMARY'",
        timeout=5000,
    )


def test_leaving_a_page_with_an_edit_not_saved_asks_first_and_a_line_leads_back_to_its_page(
    browser, base_url
) -> None:
    """Desk review: a link, a reload or a closed tab took an edit typed and not saved with it,
    unasked; and a line page's back link led to the run's first page, not to the line (a page
    starting at it now)."""
    specs = [Spec(f"Line {i}?", f"Answer {i}.", quality(0.5)) for i in range(52)]
    run_id, ids = build_run("studio-a", specs, name=f"desk-leave-{uuid.uuid4().hex[:6]}")
    last = ids[-1]  # past the first page's 50
    page = _sign_in(browser, base_url, REVIEW_KEY)
    page.goto(f"{base_url}/desk/lines/{last}")
    page.get_by_role("link", name=re.compile("^← desk-leave-")).click()
    page.locator(f"#line-{last}").wait_for()  # on a page starting at it
    asked: list[str] = []

    def answer(dialog: Any) -> None:
        asked.append(dialog.type)
        dialog.dismiss()  # stay on the page

    page.on("dialog", answer)
    line = page.locator(f"#line-{last}")
    line.locator("summary").click()
    line.locator("textarea").fill("Typed, not saved.")
    page.close(run_before_unload=True)
    page.wait_for_timeout(500)
    assert asked == ["beforeunload"] and not page.is_closed()
    assert line.locator("textarea").input_value() == "Typed, not saved."
    line.locator("textarea").fill("Answer 51.")  # put back as it was: nothing to lose, nothing asked
    with page.expect_event("close", timeout=5000):
        page.close(run_before_unload=True)
    assert page.is_closed() and asked == ["beforeunload"]
    page.context.close()


def test_keys_without_the_scope_or_of_another_tenant_see_nothing(browser, base_url, desk_run) -> None:
    page = _sign_in(browser, base_url, INGEST_KEY)
    assert "lacks the 'review' scope" in page.locator(".error-text").inner_text()
    assert not page.context.cookies()
    page.goto(f"{base_url}/desk/runs/{desk_run['run']}")
    assert page.url.endswith("/desk/login")  # nothing shown without a desk key
    assert (
        httpx.get(
            f"{base_url}/v1/turns/{desk_run['lines'][0]}/review", headers={"X-API-Key": INGEST_KEY}
        ).status_code
        == 403
    )
    for key, message in [
        ("", "key: enter your API key"),
        ("k" * 5000, "key: not a valid API key"),
        ("<script>window.__xss = 1</script>", "key: not a valid API key"),
    ]:
        page.goto(f"{base_url}/desk/login")
        page.fill("#key", key)
        page.click("button[type=submit]")
        assert page.locator(".error-text").inner_text() == message
        _no_script_ran(page)
    page.context.close()

    page = _sign_in(browser, base_url, OTHER_REVIEW_KEY)
    assert page.locator("#runs").get_by_text("desk-studio-b").count() == 1
    assert page.locator("#runs").get_by_text("desk-studio-a").count() == 0
    page.goto(f"{base_url}/desk/runs/{desk_run['run']}")
    assert page.locator(".error-text").inner_text() == "run: no such run"
    answer = httpx.get(
        f"{base_url}/v1/turns/{desk_run['lines'][0]}/review", headers={"X-API-Key": OTHER_REVIEW_KEY}
    )
    assert answer.status_code == 404
    page.context.close()


def test_an_admin_reads_a_turns_prompt_with_its_manifest(browser, base_url, desk_run) -> None:
    _, _, marked = desk_run["lines"]
    page = _sign_in(browser, base_url, ADMIN_KEY)
    page.goto(f"{base_url}/desk/lines/{marked}/prompt")
    body = page.locator("main").inner_text()
    assert "40 prompt tokens of a 2048-token budget" in body
    assert "key 'coin'" in body and XSS_NAME in body  # the lore entry that fired, and why
    assert "event 7 · similarity 0.61 · 9 tokens" in body
    assert XSS_CARD in page.locator(".prompt-text").inner_text()
    _no_script_ran(page)
    page.screenshot(path=str(ARTEFACTS / "prompt-view.png"), full_page=True)
    page.context.close()


def test_the_runs_list_updates_while_a_run_is_answered(browser, base_url, desk_run) -> None:
    """A live run's row polls: it moves on its own while the run is answered, then stops polling."""
    from tests.desk_data import answer, queue_run

    specs = [Spec("Late?", "Never.", quality(0.5))]
    name = f"desk-late-{uuid.uuid4().hex[:6]}"
    _, ids = queue_run("studio-a", specs, name=name)
    page = _sign_in(browser, base_url, REVIEW_KEY)
    row = page.locator(f"tr[data-run='{name}']")
    assert row.locator(".status").inner_text() == "queued"
    # A refresh that fails (a JSON 5xx, then no answer) changes nothing on the page: the next one retries.
    failures = iter(
        [lambda r: r.fulfill(status=503, content_type="application/json", body='{"detail": "x"}')]
    )

    def flaky(route) -> None:  # type: ignore[no-untyped-def]
        next(failures, lambda r: r.abort())(route)

    page.route("**/row", flaky)
    page.wait_for_timeout(4_500)  # two refreshes at least
    page.unroute("**/row")
    assert page.locator("#message").inner_text() == "" and row.locator(".status").inner_text() == "queued"
    answer(ids, specs)
    row.locator(".status", has_text="completed").wait_for(timeout=10_000)
    assert row.get_attribute("hx-trigger") is None
    page.context.close()


def test_a_writer_opens_a_runs_scene_and_edits_one_of_its_lines(browser, base_url, world, tmp_path) -> None:
    from services.runs.scene_export import export_scenes
    from tests.desk_data import build_scene_run

    slug = f"desk-sc-{uuid.uuid4().hex[:6]}"
    character(slug, XSS_NAME, XSS_CARD)
    run_id, scene_id, steps = build_scene_run(
        "studio-a", ["elara", slug], ["Who knocks?", XSS_REPLY, "Then come in."]
    )
    page = _sign_in(browser, base_url, REVIEW_KEY)
    page.goto(f"{base_url}/desk/runs/{run_id}")
    row = page.locator(f"tr.scene[data-scene='{scene_id}']")
    assert row.locator(".steps").inner_text() == "3 / 3" and "ended" in row.locator(".status").inner_text()
    assert row.locator(".participants").inner_text() == f"Elara, {XSS_NAME}"
    row.get_by_role("link").click()
    page.wait_for_selector(".scene-line")
    lines = page.locator(".scene-line")
    assert [lines.nth(i).get_attribute("data-step") for i in range(lines.count())] == ["1", "2", "3"]
    assert [lines.nth(i).locator(".speaker").inner_text() for i in range(3)] == ["Elara", XSS_NAME, "Elara"]
    assert XSS_REPLY in lines.nth(1).locator(".reply-text").inner_text()  # markup shown as text
    _no_script_ran(page)
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "scene-page.png"), full_page=True)
    assert (ARTEFACTS / "scene-page.png").stat().st_size > 5_000

    line = page.locator(f"#line-{steps[2]}")
    line.locator("summary").click()
    line.locator("textarea").fill("Then come in, out of the rain.")
    line.get_by_role("button", name="Save the edit").click()
    page.locator(f"#line-{steps[2]} .saved").wait_for()
    assert page.locator(f"#line-{steps[2]} .reply-text").inner_text() == "Then come in, out of the rain."
    _no_script_ran(page)

    review = httpx.get(f"{base_url}/v1/turns/{steps[2]}/review", headers={"X-API-Key": REVIEW_KEY}).json()
    assert review["reply"] == "Then come in, out of the rain." and review["original_reply"] == "Then come in."
    assert [(c["action"], c["by"]) for c in review["changes"]] == [("edit", "writer-a")]
    path, _ = export_scenes(str(run_id), tmp_path)
    [record] = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert [x["text"] for x in record["lines"]] == [
        "Who knocks?",
        XSS_REPLY,
        "Then come in, out of the rain.",
    ]
    page.context.close()

    page = _sign_in(browser, base_url, OTHER_REVIEW_KEY)
    page.goto(f"{base_url}/desk/scenes/{scene_id}")
    assert page.locator(".error-text").inner_text() == "scene: no such scene"
    page.context.close()


def test_the_edit_box_holds_the_reply_as_stored_edges_and_all(browser, base_url, world) -> None:
    """Review of the regex edit fix: the HTML parser drops one line end right after <textarea>, so a
    reply opening with one came back without it, and saving it unchanged counted as an edit (or was
    refused by its pattern)."""
    from sqlalchemy import update

    run_id, (turn_id,) = build_run(
        "studio-a", [Spec("Yes or no?", "yes", quality(0.5))], name=f"desk-edges-{uuid.uuid4().hex[:6]}"
    )
    with session_scope() as s:
        turn = s.get_one(Turn, turn_id)
        fmt = {"type": "regex", "regex": "\\s*(yes|no)\\s*"}
        s.execute(
            update(Turn)
            .where(Turn.id == turn_id)
            .values(reply="\nyes ", params={**turn.params, "response_format": fmt})
        )
    page = _sign_in(browser, base_url, REVIEW_KEY)
    page.goto(f"{base_url}/desk/lines/{turn_id}")
    line = page.locator(f"#line-{turn_id}")
    line.locator("summary").click() if not line.locator("textarea").is_visible() else None
    assert line.locator("textarea").input_value() == "\nyes "
    line.get_by_role("button", name="Save the edit").click()
    page.get_by_text("reply: it is the kept reply unchanged; nothing to save").wait_for()
    assert _reply(turn_id) == "\nyes " and _changes(turn_id) == 0
