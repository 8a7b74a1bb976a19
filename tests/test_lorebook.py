"""Lorebook activation: which entries fire, why, and which the token budget drops."""

import pytest

from roleplay.lorebook import Lorebook, LoreEntry, SelectiveLogic, activate, stored_lorebook


def _words(text: str) -> int:
    return len(text.split())


def _book(*entries: dict, **book) -> Lorebook:
    return Lorebook.model_validate(
        {"entries": [{"id": i, "content": f"entry {i} text"} | e for i, e in enumerate(entries)]} | book
    )


def _texts_prepared(monkeypatch) -> list[str]:  # type: ignore[no-untyped-def]
    """The texts the scan prepares (normalises and casefolds) from now on, by where they come from."""
    from roleplay import lorebook

    prepared: list[str] = []
    made = lorebook._Text.of.__func__  # type: ignore[attr-defined]

    def counting(cls, where, text):  # type: ignore[no-untyped-def]
        prepared.append(where)
        return made(cls, where, text)

    monkeypatch.setattr(lorebook._Text, "of", classmethod(counting))
    return prepared


def _fired(book: Lorebook, message: str, history=(), **kw) -> dict:
    act = activate(book, message=message, history=list(history), count_tokens=_words, **kw)
    return {f.entry.id: f.reason for f in act.kept}


def test_keys_match_case_insensitively_unless_the_entry_says_so() -> None:
    book = _book({"keys": ["Dragon"]}, {"keys": ["Dragon"], "case_sensitive": True})
    assert _fired(book, "a dragon flew over") == {0: "key 'Dragon' in the player's message"}
    assert set(_fired(book, "a Dragon flew over")) == {0, 1}


def test_keys_match_text_written_decomposed_or_in_full_width_forms() -> None:
    """Found in review: keys and text were casefolded, not normalised: "서울" did not fire on the same
    word pasted decomposed (NFD, as macOS writes it), nor "cafe" on "ｃａｆｅ"."""
    import unicodedata

    book = _book({"keys": ["서울"]}, {"keys": ["が"], "case_sensitive": True}, {"keys": ["cafe"]})
    decomposed = unicodedata.normalize("NFD", "서울에 가자, がんばって")
    assert decomposed != "서울에 가자, がんばって"
    assert set(_fired(book, decomposed)) == {0, 1}
    assert set(_fired(book, "ｃａｆｅ に行こう")) == {2}


def test_regex_keys_with_flags_and_use_regex() -> None:
    book = _book({"keys": ["/sw(or)?d/i"]}, {"keys": [r"\bax(e|es)\b"], "use_regex": True})
    assert set(_fired(book, "My SWD and my axes")) == {0, 1}
    assert _fired(book, "a waxed floor") == {}
    with pytest.raises(ValueError, match="bad regex key"):
        _book({"keys": ["/(unclosed/"]})


@pytest.mark.parametrize(
    "logic, message, fires",
    [
        (SelectiveLogic.AND_ANY, "the king and the crown", True),
        (SelectiveLogic.AND_ANY, "the king alone", False),
        (SelectiveLogic.AND_ALL, "the king, the crown and the throne", True),
        (SelectiveLogic.AND_ALL, "the king and the crown", False),
        (SelectiveLogic.NOT_ANY, "the king alone", True),
        (SelectiveLogic.NOT_ANY, "the king and the throne", False),
        (SelectiveLogic.NOT_ALL, "the king and the crown", True),
        (SelectiveLogic.NOT_ALL, "the king, the crown and the throne", False),
    ],
)
def test_secondary_key_logic(logic, message, fires) -> None:
    book = _book(
        {"keys": ["king"], "selective": True, "secondary_keys": ["crown", "throne"], "selective_logic": logic}
    )
    assert bool(_fired(book, message)) is fires


def test_scan_depth_counts_the_players_message_among_the_lines_it_reads() -> None:
    """Cards review: a scan depth of N read the message and N history lines, one more than the card
    spec and SillyTavern read (every card SillyTavern exports says 2: the message and one line),
    and 0 still read the message."""
    book = _book({"keys": ["lighthouse"]}, scan_depth=3)
    history = ["we saw the lighthouse", "then the tide came", "and the boats"]
    assert _fired(book, "what now?", history) == {}
    assert _fired(book, "what now?", history[:2]) == {0: "key 'lighthouse' in history line -2"}
    assert _fired(_book({"keys": ["lighthouse"]}, scan_depth=2), "what now?", history[:2]) == {}
    assert _fired(_book({"keys": ["lighthouse"]}, scan_depth=0), "the lighthouse?") == {}
    # an entry's own depth (SillyTavern's extensions.scan_depth) in place of the book's
    deep = Lorebook.from_character_book(
        {
            "scan_depth": 1,
            "entries": [{"keys": ["lighthouse"], "content": "x", "extensions": {"scan_depth": 4}}],
        }
    )
    assert _fired(deep, "what now?", history) == {0: "key 'lighthouse' in history line -3"}


def test_recursion_fires_entries_from_other_entries_content_up_to_the_step_limit() -> None:
    chain = [
        {"keys": ["alpha"], "content": "alpha leads to beta"},
        {"keys": ["beta"], "content": "beta leads to gamma"},
        {"keys": ["gamma"], "content": "gamma leads to delta"},
        {"keys": ["delta"], "content": "the end"},
        {"keys": ["beta"], "content": "only from the chat", "exclude_recursion": True},
    ]
    flat = _book(*chain)
    assert set(_fired(flat, "alpha")) == {0}  # recursion off
    deep = _book(*chain, recursive_scanning=True, max_recursion_steps=2)
    fired = _fired(deep, "alpha")
    assert set(fired) == {0, 1, 2}  # two steps: beta, then gamma; delta would need a third
    assert fired[1] == "key 'beta' in recursion step 1: entry 0"
    stopper = _book(
        {"keys": ["alpha"], "content": "beta", "prevent_recursion": True},
        *chain[1:2],
        recursive_scanning=True,
    )
    assert set(_fired(stopper, "alpha")) == {0}


def test_budget_keeps_constants_then_priority_and_records_what_it_dropped() -> None:
    book = _book(
        {"keys": [], "constant": True, "content": "one two three four", "insertion_order": 50},  # 4 words
        {"keys": ["x"], "priority": 1, "content": "low priority five words here"},  # 5
        {"keys": ["x"], "priority": 9, "content": "high priority four", "insertion_order": 10},  # 3
        {"keys": ["x"], "priority": 9, "content": "high too but five words", "insertion_order": 20},  # 5
        token_budget=12,
    )
    act = activate(book, message="x", history=[], count_tokens=_words)
    assert [f.entry.id for f in act.kept] == [2, 3, 0]  # kept ones in insertion order
    assert [f.entry.id for f in act.dropped] == [1]  # the lowest priority did not fit
    assert sum(f.tokens for f in act.kept) <= 12


def test_disabled_entries_never_fire_and_macros_are_filled() -> None:
    book = _book({"keys": ["inn"], "enabled": False}, {"keys": ["inn"], "content": "{{char}} owns the inn"})
    act = activate(
        book,
        message="the inn",
        history=[],
        count_tokens=_words,
        fill=lambda t: t.replace("{{char}}", "Elara"),
    )
    assert [(f.entry.id, f.content) for f in act.kept] == [(1, "Elara owns the inn")]


def test_a_catastrophic_regex_key_fails_its_entry_not_the_turn() -> None:
    import time

    book = Lorebook(
        entries=[
            LoreEntry(id="bomb", keys=["/(a|aa)+$/"], content="Never shown."),
            LoreEntry(id="ok", keys=["lantern"], content="The lantern is brass."),
        ]
    )
    started = time.monotonic()
    activation = activate(
        book, message="a" * 40 + "! where is the lantern?", history=[], count_tokens=lambda t: len(t.split())
    )
    assert time.monotonic() - started < 2  # the backtracking pattern was stopped, not waited out
    assert [f.entry.id for f in activation.kept] == ["ok"]
    ((entry, reason),) = activation.failed
    assert entry.id == "bomb" and "ran past 50 ms" in reason


def test_v3_decorators_are_honoured_or_listed_and_never_reach_the_prompt() -> None:
    book = Lorebook.from_character_book(
        {
            "entries": [
                {"keys": [], "content": "@@activate\n@@depth 0\nThe ford floods at dusk.", "id": 1},
                {"keys": ["ford"], "content": "@@dont_activate\nNever used.", "id": 2},
            ]
        }
    )
    first, second = book.entries
    assert (
        first.constant
        and first.content == "The ford floods at dusk."
        and first.ignored_decorators == ["@@depth 0"]
    )
    assert not second.enabled
    activation = activate(book, message="the ford?", history=[], count_tokens=lambda t: len(t.split()))
    assert [f.content for f in activation.kept] == ["The ford floods at dusk."]


def test_a_use_regex_key_that_does_not_compile_is_refused_at_import_and_fails_only_its_entry() -> None:
    """Found in review: a bare key of a `use_regex` entry was compiled first at match time, and its
    regex.error failed every turn of the character."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"keys: bad regex key '\('"):
        LoreEntry(id="x", keys=["("], use_regex=True, content="x")
    with pytest.raises(ValidationError, match="secondary_keys: bad regex key"):
        LoreEntry(id="x", keys=["a"], secondary_keys=["[z"], selective=True, use_regex=True, content="x")
    # a card stored before the check: that entry is left out, the turn and the other entries go on
    stored = {
        "entries": [
            {"id": "old", "keys": ["("], "use_regex": True, "content": "Never shown."},
            {"id": "ok", "keys": ["lantern"], "content": "The lantern is brass."},
        ]
    }
    activation = activate(
        stored_lorebook(stored), message="where is the lantern? (", history=[], count_tokens=_words
    )
    assert [f.entry.id for f in activation.kept] == ["ok"]
    # and one that slips past (built without the checks) fails its entry alone at match time
    bad = LoreEntry.model_construct(**LoreEntry(id="old", keys=["x"], content="Never shown.").__dict__)
    bad.keys, bad.use_regex = ["("], True
    book = Lorebook.model_construct(entries=[bad], token_budget=100, scan_depth=2)
    activation = activate(book, message="(", history=[], count_tokens=_words)
    ((entry, reason),) = activation.failed
    assert entry.id == "old" and "does not compile" in reason


def test_a_regex_key_too_large_to_compile_safely_is_refused_at_import_and_never_compiled(
    monkeypatch,
) -> None:
    """Found in review: the `regex` module expands counted repeats when it compiles, nested ones
    multiplying: a key `/(?:a{20000}){20000}/` took minutes and tens of gigabytes to compile, at
    import in the API and again in every worker, and the keys' time limits cover matching only."""
    from pydantic import ValidationError

    from roleplay import lorebook

    # Found in review of the fix: comments, verbose mode and version 1's nested sets hid a count
    # from the reading, and counts side by side add up.
    huge = [
        "(?:a{20000}){20000}",
        "(?x)(?:a{1000}) {1000}",
        "(?#[)(?:a{1000}){1000}]",
        "a{50000}" * 20,
        # found in review of that: {0,} is X* (X still built), \g{N} is "g" N times, every branch is built
        "(?:(?:a{50000}){50000}){0,}",
        r"\g{4000000}",
        "|".join(["a{50000}"] * 3),
    ]
    compile_, search = lorebook.regex.compile, lorebook.regex.search

    def guarded(real):  # type: ignore[no-untyped-def]
        def call(pattern, *args, **kwargs):  # type: ignore[no-untyped-def]
            assert pattern not in huge, "a key too large reached the compiler"
            return real(pattern, *args, **kwargs)

        return call

    monkeypatch.setattr(lorebook.regex, "compile", guarded(compile_))
    monkeypatch.setattr(lorebook.regex, "search", guarded(search))
    with pytest.raises(ValidationError, match=r"counted repeats expand to 400,000,000 items"):
        LoreEntry(id="x", keys=["/(?:a{20000}){20000}/"], content="x")
    with pytest.raises(ValidationError, match=r"keys: regex key .*the x and V1 flags are not supported"):
        LoreEntry(id="x", keys=[huge[1]], use_regex=True, content="x")
    for key in huge[2:]:
        with pytest.raises(ValidationError, match=r"regex key"):
            LoreEntry(id="x", keys=[f"/{key}/"], content="x")
    # ordinary keys pass: an optional literal parenthesis is no flag group
    LoreEntry(
        id="x",
        keys=[r"/\(?ex-?wife\)?/i", r"/\bdragon(s)?\b/", r"/[A-Z]{2,3}-\d{4}/", "/(?:ab){20000}/"],
        content="x",
    )
    with pytest.raises(ValidationError, match=r"1001 characters; the limit is 1000"):
        LoreEntry(id="x", keys=["/" + "a" * 1001 + "/"], content="x")
    # a card stored before the check: its entry fails alone at match time, never compiled
    bad = LoreEntry.model_construct(**LoreEntry(id="old", keys=["x"], content="Never shown.").__dict__)
    bad.keys = ["/(?:a{20000}){20000}/"]
    ok = LoreEntry(id="ok", keys=["lantern"], content="The lantern is brass.")
    book = Lorebook.model_construct(entries=[bad, ok], token_budget=100, scan_depth=2)
    activation = activate(book, message="the lantern", history=[], count_tokens=_words)
    assert [f.entry.id for f in activation.kept] == ["ok"]
    ((entry, reason),) = activation.failed
    assert entry.id == "old" and "counted repeats expand" in reason


def test_the_regex_keys_of_one_turn_share_one_time_budget() -> None:
    """Found in review: each regex search was stopped at 50 ms, but a card of a thousand slow
    patterns cost every turn a thousand of them."""
    import time

    from roleplay.lorebook import REGEX_BUDGET_S

    bombs = [LoreEntry(id=f"bomb-{i}", keys=["/(a|aa)+$/"], content="Never shown.") for i in range(100)]
    book = Lorebook(entries=[*bombs, LoreEntry(id="ok", keys=["lantern"], content="The lantern is brass.")])
    started = time.monotonic()
    activation = activate(book, message="a" * 40 + "! where is the lantern?", history=[], count_tokens=_words)
    spent = time.monotonic() - started
    assert spent < REGEX_BUDGET_S + 1.0  # 100 timeouts of 50 ms would be 5 s
    assert [f.entry.id for f in activation.kept] == ["ok"]
    reasons = [reason for _, reason in activation.failed]
    assert len(reasons) == 100 and any("ms for regex keys ran out" in r for r in reasons)
    # review of the fix: the budget is checked inside an entry too (one entry of 100 slow keys,
    # each tried on the message and the history lines), and counts only time spent searching
    one = LoreEntry(id="many", keys=["/(a|aa)+$/"] * 100, content="Never shown.")
    book = Lorebook(entries=[one, LoreEntry(id="ok", keys=["lantern"], content="The lantern is brass.")])
    started = time.monotonic()
    history = ["a" * 40 + "!", "a" * 40 + "!"]
    activation = activate(book, message="a" * 40 + "! the lantern?", history=history, count_tokens=_words)
    assert time.monotonic() - started < REGEX_BUDGET_S + 1.0  # 300 searches of 50 ms would be 15 s
    assert [f.entry.id for f in activation.kept] == ["ok"] and [e.id for e, _ in activation.failed] == [
        "many"
    ]


def test_a_book_of_thousands_of_entries_is_scanned_without_comparing_entries_to_each_other(
    monkeypatch,
) -> None:
    # found in review: each firing entry was removed from the waiting list by equality, comparing it
    # field by field to every entry before it: 1,000 + 1,000 entries took 2 s a turn, 5,000 + 5,000
    # about 50 s, for every turn of the character, before any of its batch was generated.
    book = _book(
        *[{"keys": ["never said"]} for _ in range(2000)],
        *[{"keys": ["a"]} for _ in range(2000)],
        token_budget=100_000,
    )
    compared = 0
    equal = LoreEntry.__eq__

    def counting(self, other):  # type: ignore[no-untyped-def]
        nonlocal compared
        compared += 1
        return equal(self, other)

    monkeypatch.setattr(LoreEntry, "__eq__", counting)
    fired = _fired(book, "a cat")
    assert sorted(fired) == list(range(2000, 4000))  # every keyed one, none of the others
    assert compared == 0


def test_recursive_scanning_prepares_each_text_once_per_step_not_once_per_entry_and_key(monkeypatch) -> None:

    book = _book(
        {"keys": ["start"], "content": "wolf " * 2000},
        *[{"keys": ["dragon", "wyrm"]} for _ in range(300)],
        recursive_scanning=True,
        max_recursion_steps=2,
        token_budget=100_000,
    )
    prepared = _texts_prepared(monkeypatch)
    assert set(_fired(book, "start here")) == {0}
    # step 0: the message; step 1: the first entry's content (the joined text only for secondary keys)
    assert len(prepared) == 2


def test_plain_keys_share_a_time_budget_and_a_book_is_held_to_its_limits_at_import(monkeypatch) -> None:
    """Found in review: plain keys had no time budget and a book no limits, so a card of a hundred
    thousand keys over a recursion step's megabyte of entry text cost every turn of the character
    tens of seconds (the batch's prompt stage, every batch-mate waiting)."""
    from roleplay import lorebook

    monkeypatch.setattr(lorebook, "PLAIN_BUDGET_S", -1.0)  # as if the turn had spent it already
    book = Lorebook(entries=[LoreEntry(id="ok", keys=["lantern"], content="The lantern is brass.")])
    activation = activate(book, message="where is the lantern?", history=[], count_tokens=_words)
    assert activation.kept == [] and [reason for _, reason in activation.failed] == [
        "the turn's -1000 ms for plain keys ran out"
    ]
    monkeypatch.undo()
    assert [
        f.entry.id for f in activate(book, message="the lantern?", history=[], count_tokens=_words).kept
    ] == ["ok"]
    entry = {"keys": ["a"], "content": "x"}
    for book_json, named in (
        ({"entries": [entry] * 2001}, "entries: 2001 of them; the limit is 2000"),
        ({"entries": [entry | {"keys": ["k"] * 101}]}, "entries[0].keys: 101 keys; the limit is 100"),
        ({"entries": [entry | {"secondary_keys": ["k"] * 101}]}, "entries[0].secondary_keys: 101 keys"),
        ({"entries": [entry | {"content": "x" * 50_001}]}, "entries[0].content: 50001 characters"),
    ):
        with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
            Lorebook.from_character_book(book_json)


def test_keys_are_trimmed_and_an_empty_key_fires_nothing() -> None:
    """Found in review: an empty key occurred in every text (the entry was put in every prompt), one
    as a secondary key of NOT_ANY kept its entry out for ever, and " wyrm" needed its space."""
    king_unless_blank = {"keys": ["king"], "selective": True, "secondary_keys": [" "]}
    king_unless_blank["selective_logic"] = SelectiveLogic.NOT_ANY
    book = _book(
        {"keys": [""]},
        {"keys": [" wyrm "]},
        king_unless_blank,
    )
    assert _fired(book, "The wyrm and the king.") == {
        1: "key 'wyrm' in the player's message",
        2: "key 'king' in the player's message",
    }


def test_a_sillytavern_books_use_regex_is_read_as_sillytavern_reads_it() -> None:
    """Found in review: SillyTavern marks every entry it exports `use_regex` and reads only
    `/…/flags` keys as patterns; its plain keys were taken for patterns here (`*hugs*` refused the
    card, `[Secret]` fired on "hello there", `C++` on any "c")."""
    from roleplay.cards import lorebook_from_card_book

    def st_entry(i: int, key: str) -> dict:
        extensions = {"display_index": i, "selectiveLogic": 0, "exclude_recursion": False}
        return {"id": i, "keys": [key], "content": f"entry {i}", "use_regex": True, "extensions": extensions}

    keys = ["*hugs*", "[Secret]", "C++", "/ro+ar/"]
    exported = {"entries": [st_entry(i, key) for i, key in enumerate(keys)]}
    book = Lorebook.model_validate(lorebook_from_card_book(exported))
    assert _fired(book, "hello there, cat") == {}
    assert set(_fired(book, "She gives *hugs* and a rooar over C++ code")) == {0, 2, 3}
    ours = {"entries": [{"id": 0, "keys": [r"\bax(e|es)\b"], "content": "x", "use_regex": True}]}
    assert set(_fired(Lorebook.model_validate(lorebook_from_card_book(ours)), "two axes")) == {0}


def test_secondary_keys_in_a_recursion_step_read_the_chat_too() -> None:
    """Found in review: in a recursion step the secondary keys read only the recursed text, so an
    entry kept out by NOT_ANY on the player's own words fired from another entry's content, and
    AND_ANY on the chat never held there."""
    castle = {"keys": ["castle"], "secondary_keys": ["ruined"], "selective": True}
    book = _book(
        {"constant": True, "content": "The castle looms."},
        castle | {"selective_logic": SelectiveLogic.NOT_ANY},
        recursive_scanning=True,
    )
    assert set(_fired(book, "I walk to the ruined gate.")) == {0}
    book = _book(
        {"constant": True, "content": "The castle looms."},
        castle,  # AND_ANY: "ruined" said in the chat, "castle" only in the recursed content
        recursive_scanning=True,
    )
    assert set(_fired(book, "I walk to the ruined gate.")) == {0, 1}


def test_a_book_of_many_long_entries_costs_what_the_context_holds_not_the_whole_book() -> None:
    """Found in review: every entry that fired was filled, cleaned and tokenised at every turn, the
    book's own budget unbounded ("token_budget": 1e9 kept all of an 8 MB card, then rendered the
    prompt a dozen times to drop it): a card could stall every turn of its character for seconds.
    Entries are counted against the prompt's room too, and past what is left a first part only."""
    counted: list[int] = []

    def count(text: str) -> int:
        counted.append(len(text))
        return _words(text)

    long = " ".join(["word"] * 800)  # 800 tokens, 3,999 characters
    for budget, room, kept in ((1_000_000_000, 2048, 2), (512, None, 0)):
        counted.clear()
        book = _book(*({"constant": True, "content": long} for _ in range(2000)), token_budget=budget)
        act = activate(book, message="hi", history=[], count_tokens=count, room=room)
        limit = min(budget, room or budget)
        assert len(act.kept) == kept and len(act.kept) + len(act.dropped) == 2000
        assert sum(counted) <= (limit + 1) * 8 * 4 + 4000  # not the book's 8 MB
        assert sum(f.partly_counted for f in act.dropped) >= len(act.dropped) - 10
        assert not any(f.partly_counted for f in act.kept)
    # Review: once the long entries ranked first spent what a turn reads, a short one after them
    # that fits was dropped uncounted; it is read, and kept.
    book = _book(
        *({"constant": True, "content": long} for _ in range(5)),
        {"constant": True, "content": "a b c", "priority": -1},
        token_budget=512,
    )
    act = activate(book, message="hi", history=[], count_tokens=count)
    assert [f.content for f in act.kept] == ["a b c"] and len(act.dropped) == 5
    # Review of that: short entries of more tokens than characters (a script whose characters are
    # tokens each) were all read and dropped; they have an allowance of their own.
    counted.clear()
    dense = "가" * 300  # 300 characters, counted below as 600 tokens: never fits 512
    book = _book(
        *({"constant": True, "content": long} for _ in range(5)),
        *({"constant": True, "content": dense, "priority": -1} for _ in range(2000)),
        token_budget=512,
    )

    def dense_count(text: str) -> int:
        counted.append(len(text))
        return _words(text) if " " in text else 2 * len(text)

    act = activate(book, message="hi", history=[], count_tokens=dense_count)
    assert not act.kept and len(act.dropped) == 2005
    assert sum(counted) <= 3 * (512 + 1) * 8 * 4  # not 2,000 entries read
    # A book within the room is counted as before: whole entries, its own budget.
    small = _book(
        {"constant": True, "content": "a b c"}, {"constant": True, "content": "d e"}, token_budget=4
    )
    small_act = activate(small, message="hi", history=[], count_tokens=_words, room=2048)
    assert [f.tokens for f in small_act.kept] == [3] and [f.tokens for f in small_act.dropped] == [2]
    assert not small_act.dropped[0].partly_counted


def test_a_key_with_slashes_is_a_regex_only_as_sillytavern_reads_one() -> None:
    """Found in review: any `/x/y` key was a regex (`/me/please` the pattern `me`, flags `please`,
    firing on "me", "time", "home" in nearly every line), and `/a(/b` refused the whole card at import.
    SillyTavern reads a key as a regex only with flags of `gimsuy` and no unescaped `/` inside."""
    book = _book({"keys": ["/me/please"]}, {"keys": ["/a(/b"]}, {"keys": ["/dra(g|k)on/i"]})
    assert set(_fired(book, "It is time to go home")) == set()
    assert set(_fired(book, "type /me/please and /a(/b here")) == {0, 1}
    assert set(_fired(book, "A DRAKON!")) == {2}


def test_a_slash_keys_case_is_its_own_flag_and_keys_have_their_macros_filled() -> None:
    """Found in review: a `/…/` key without `i` matched any case (an entry not case_sensitive, as
    nearly all are, forced IGNORECASE: `/\\bMay\\b/` fired on "may I come in?"), while SillyTavern reads
    such a key by its own flags alone; and `{{char}}`/`{{user}}` in keys were never filled (a key
    `{{user}}` matched only the literal text), where SillyTavern fills every key."""
    book = _book({"keys": [r"/\bMay\b/"]}, {"keys": [r"/\bMay\b/i"]}, {"keys": ["{{user}}'s debt"]})
    assert set(_fired(book, "may I come in?")) == {1}
    assert set(_fired(book, "May will come in")) == {0, 1}
    fill = {"fill": lambda t: t.replace("{{user}}", "Rowan")}
    assert set(_fired(book, "about rowan's debt", **fill)) == {2}
    assert _fired(book, "about {{user}}'s debt", **fill) == {}
    reasons = _fired(_book({"keys": ["/{{user}}/"]}), "Rowan is here", **fill)
    assert list(reasons) == [0]


def test_regex_keys_have_javascripts_ascii_word_classes_and_jamo_keys_fire_beside_jamo() -> None:
    """Review (stop 75): `\\b`, `\\w`, `\\d` were Unicode here and ASCII in SillyTavern's JavaScript,
    so a name with a Korean particle after it (`/\\bLuffy\\b/` on "Luffy는") never fired and
    `/\\b루피\\b/` fired where SillyTavern's does not; and NFKC composed jamo with their neighbours
    ("ㅋㅋㅠㅠ" read "ᄏ큐ᅲ"), so a key "ㅠㅠ" typed beside "ㅋㅋ" never fired."""
    book = _book(
        {"keys": [r"/\bLuffy\b/i"]},
        {"keys": [r"/\bMay\b/"]},
        {"keys": [r"/\b루피\b/"]},
        {"keys": [r"/\d+골드/"]},
        {"keys": [r"/[\w]+!/"]},
    )
    assert set(_fired(book, "Luffy는 어디 있어?")) == {0}
    assert set(_fired(book, "May가 왔어")) == {1}
    assert _fired(book, "루피 왔어") == {} and _fired(book, "１００골드") == {}
    assert set(_fired(book, "100골드")) == {3} and _fired(book, "한!") == {}
    assert set(_fired(book, "ha!")) == {4}
    # Review of that fix: `\w` before a `-` in a class made a range (`[\w-.]` refused the card), and
    # `\b` spelled out as lookarounds took a key of seven names past the 1,000-character limit.
    names = "|".join(rf"\b{n}\b" for n in ("luffy", "zoro", "nami", "usopp", "sanji", "chopper", "robin"))
    more = _book({"keys": [r"/[\w-.]+@/"]}, {"keys": [f"/{names}/i"]})
    assert set(_fired(more, "a-b.c@x")) == {0} and set(_fired(more, "Nami가 왔어")) == {1}
    dash = _book({"keys": [r"/[.-\w]/"]})  # '.', '-' or a word character in JavaScript, not '.'..'_'
    assert _fired(dash, "/ ? @") == {} and set(_fired(dash, "a")) == {0} and set(_fired(dash, "-")) == {0}
    after = _book({"keys": [r"/[\\-\w]/"]}, {"keys": [r"/[[-\w]/"]})  # an escaped backslash, a literal [
    assert set(_fired(after, "-")) == {0, 1} and _fired(after, "] ^") == {}
    jamo = _book({"keys": ["ㅠㅠ"]}, {"keys": ["ㅋㅋ"]}, {"keys": ["ｃａｆｅ"]})
    assert set(_fired(jamo, "ㅋㅋㅋㅠㅠ 너무해")) == {0, 1}
    assert set(_fired(jamo, "ㅋㅋㅜㅜ")) == {1}
    assert set(_fired(jamo, "ㅠㅠ")) == {0} and set(_fired(jamo, "CAFE")) == {2}  # widths still fold


def test_javascript_regex_forms_sillytavern_compiles_are_read() -> None:
    """Found in review: a key in JavaScript's syntax that the `regex` module spells otherwise refused
    the whole card (`[^]`: "unterminated character set"; `\\k<w>`: "bad escape")."""
    book = _book(
        {"keys": ["/ring[^]*stolen/"]},
        {"keys": [r"/(?<w>ha)\k<w>/"]},
        {"keys": [r"/\u{1F5E1}/u"]},
        {"keys": [r"/a\cJb/"]},
        {"keys": [r"/x\\k<w>/"]},  # an escaped backslash, then the text "k<w>": not a backreference
    )
    assert set(_fired(book, "the ring\nwas stolen")) == {0}
    assert set(_fired(book, "haha \U0001f5e1")) == {1, 2}
    assert set(_fired(book, "a\nb")) == {3}
    assert set(_fired(book, "x\\k<w>")) == {4}


def test_recursion_reads_keys_against_the_chat_and_every_text_recursed_and_the_content_filled() -> None:
    """Cards review: in a recursion step an entry's primary keys were read in the last step's
    content alone, so an entry whose primary key is in the chat and whose secondary key came from
    another entry never fired; and recursion read the content unfilled, so an entry keyed on the
    player's name never fired from "{{user}} owes the guild". SillyTavern fires both."""
    king = {
        "keys": ["castle"],
        "selective": True,
        "secondary_keys": ["Aldric"],
        "content": "The castle gate.",
    }
    book = _book({"constant": True, "content": "The king of Varn is Aldric."}, king, recursive_scanning=True)
    assert set(_fired(book, "Let's go to the castle.")) == {0, 1}
    assert set(
        _fired(_book({"constant": True, "content": "x"}, king, recursive_scanning=True), "the castle")
    ) == {0}
    owes = _book(
        {"keys": ["guild"], "content": "{{user}} owes the guild."},
        {"keys": ["Rowan"], "content": "Rowan is a thief."},
        recursive_scanning=True,
    )
    fired = activate(
        owes,
        message="the guild?",
        history=[],
        count_tokens=_words,
        fill=lambda t: t.replace("{{user}}", "Rowan"),
    )
    assert {f.entry.id for f in fired.kept} == {0, 1}


def test_an_entry_delayed_until_recursion_fires_only_in_a_recursion_step() -> None:
    """Cards review: SillyTavern's `delay_until_recursion` (in every entry it exports) was dropped,
    so an entry meant to fire only when other lore mentions it fired on any mention in the chat."""
    entries = [
        {"keys": ["harbour"], "content": "The harbour hides a smuggler."},
        {
            "keys": ["smuggler"],
            "content": "The smuggler is Mira.",
            "extensions": {"delay_until_recursion": True},
        },
    ]
    flat = Lorebook.from_character_book({"entries": entries})
    assert {
        f.entry.id for f in activate(flat, message="a smuggler?", history=[], count_tokens=_words).kept
    } == set()
    deep = Lorebook.from_character_book({"entries": entries, "recursive_scanning": True})
    assert {
        f.entry.id for f in activate(deep, message="a smuggler?", history=[], count_tokens=_words).kept
    } == set()
    assert {
        f.entry.id for f in activate(deep, message="the harbour", history=[], count_tokens=_words).kept
    } == {0, 1}


def test_a_book_of_null_fields_and_no_budget_is_read_as_sillytavern_reads_it() -> None:
    """Cards review: an entry's `"secondary_keys": null` (or selective, constant, priority, id null)
    refused the whole card, where SillyTavern reads null as not given; and a `token_budget` of 0
    (some editors' "all") dropped every entry, constants included."""
    book = Lorebook.from_character_book(
        {
            "token_budget": 0,
            "scan_depth": None,
            "entries": [
                {
                    "id": None,
                    "keys": ["lamp"],
                    "secondary_keys": None,
                    "selective": None,
                    "constant": None,
                    "priority": None,
                    "insertion_order": None,
                    "enabled": None,
                    "content": "The lamp is brass.",
                },
                {"keys": None, "constant": True, "content": "Always here."},
            ],
        }
    )
    assert [(e.id, e.secondary_keys, e.enabled, e.priority) for e in book.entries] == [
        (0, [], True, 10),
        (1, [], True, 10),
    ]
    kept = activate(book, message="the lamp", history=[], count_tokens=_words, room=1000).kept
    assert {f.entry.id for f in kept} == {0, 1}


def test_a_step_with_no_player_line_reads_its_scan_depth_in_history_lines() -> None:
    """Review of the scan-depth change: a scene's or the narrator's step has no player message, which
    still took one of the N messages read: a book of depth 1 never fired a keyed entry there."""
    book = _book({"keys": ["lighthouse"]}, scan_depth=1)
    assert _fired(book, "", ["we saw the lighthouse"]) == {0: "key 'lighthouse' in history line -1"}
    assert _fired(book, "what now?", ["we saw the lighthouse"]) == {}


def test_a_key_filled_to_nothing_never_fires_and_a_filled_key_is_trimmed() -> None:
    """Review: keys are filled after the empty-key check, so `{{// todo}}` (filled to nothing) was in
    every text, and "dragon {{// plural}}" kept its space and missed "dragon."."""
    from worker.prompt.layout import fill_macros

    book = _book({"keys": ["{{// todo}}"]}, {"keys": ["dragon {{// plural}}"]}, {"keys": ["{{trim}}"]})
    fired = activate(
        book, message="a dragon.", history=[], count_tokens=_words, fill=lambda t: fill_macros(t, "A", "B")
    )
    assert {f.entry.id for f in fired.kept} == {1}


def test_sillytaverns_delay_level_is_read_as_a_delay() -> None:
    """Review: SillyTavern writes `delay_until_recursion` as a recursion level (2, say), which refused
    the whole card as not a boolean."""
    book = Lorebook.from_character_book(
        {"entries": [{"keys": ["x"], "content": "y", "extensions": {"delay_until_recursion": 2}}]}
    )
    assert book.entries[0].delay_until_recursion is True
    none = Lorebook.from_character_book(
        {"entries": [{"keys": ["x"], "content": "y", "extensions": {"delay_until_recursion": 0}}]}
    )
    assert none.entries[0].delay_until_recursion is False


def test_an_unclosed_comment_is_left_as_written_and_closed_ones_go() -> None:
    from worker.prompt.layout import without_comments

    assert without_comments("a{{// one}}b{{//two\n}}c") == "abc"
    assert without_comments("a{{// open" + "{{//" * 1000) == "a{{// open" + "{{//" * 1000


def test_entries_of_many_scan_depths_share_the_texts_the_chat_holds(monkeypatch) -> None:
    """Review: each distinct entry scan depth built its own joined, casefolded text, before any
    budget: a card of a thousand depths joined the recursed megabytes a thousand times a step."""

    entries = [
        {"keys": ["gate"], "selective": True, "secondary_keys": ["x"], "extensions": {"scan_depth": d}}
        for d in range(200)
    ]
    book = Lorebook.from_character_book({"entries": [e | {"content": "c"} for e in entries]})
    prepared = _texts_prepared(monkeypatch)
    activate(book, message="the gate", history=["one", "two"], count_tokens=_words)
    assert len(prepared) <= 3 + 4  # the three chat texts, and a join per count of them read (0 to 3)
