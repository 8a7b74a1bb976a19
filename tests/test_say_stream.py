"""An NPC reply's spoken line, passed on while the engine writes the reply's JSON: the pieces add up
to the `say` the turn stores, wherever the JSON is cut."""

from __future__ import annotations

import json

import pytest

from structured.say_stream import SayText

SAYS = [
    "Well met, traveller.",
    'She said "go north"\nand left.',
    "A back\\slash, a tab\there, caf\u00e9 and a grin \U0001f600 at the end",
    "",
]


def _pieces(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@pytest.mark.parametrize("say", SAYS)
@pytest.mark.parametrize("ascii_only", [True, False])
def test_the_pieces_add_up_to_the_say_wherever_the_json_is_cut(say, ascii_only) -> None:
    reply = json.dumps(
        {"say": say, "emotion": "joy", "action": {"name": "wave", "args": {"to": "you"}}},
        separators=(",", ":"),
        ensure_ascii=ascii_only,
    )
    assert json.loads(reply)["say"] == say
    for cut in range(1, len(reply)):  # every two-piece cut, escapes and surrogate pairs split too
        shown: list[str] = []
        feed = SayText(shown.append)
        for piece in _pieces(reply, [cut]):
            feed(piece)
        assert "".join(shown) == say, f"cut at {cut}: {reply[:cut]!r} | {reply[cut:]!r}"
    shown = []
    feed = SayText(shown.append)
    for char in reply:  # one character at a time: each piece is passed on as soon as it is whole
        feed(char)
    assert "".join(shown) == say and all(shown)
    if ascii_only and "\U0001f600" in say:
        assert "\U0001f600" in shown  # the surrogate pair's halves were held for each other


def test_the_line_is_passed_on_before_the_json_ends() -> None:
    shown: list[str] = []
    feed = SayText(shown.append)
    for piece in ['{"say":"Wel', "l met", ', friend.","emo', 'tion":"joy"}']:
        feed(piece)
        if piece == "l met":
            assert "".join(shown) == "Well met"  # not held until the reply is whole
    assert "".join(shown) == "Well met, friend."


@pytest.mark.parametrize(
    "reply",
    ['{"emotion":"joy","say":"Well met."}', '["Well met."]', "Well met.", '{"say": 3}'],
)
def test_a_reply_that_does_not_open_with_say_passes_nothing_on(reply) -> None:
    shown: list[str] = []
    feed = SayText(shown.append)
    for char in reply:
        feed(char)
    assert shown == []  # its reader gets the stored reply whole at the end


def test_whitespace_the_grammar_may_allow_before_say_is_accepted() -> None:
    shown: list[str] = []
    feed = SayText(shown.append)
    for piece in ['{ "say" ', ': "Hi', ' there"', "}"]:
        feed(piece)
    assert "".join(shown) == "Hi there"


def test_a_nul_in_the_say_is_left_out_as_the_stored_reply_leaves_it_out() -> None:
    shown: list[str] = []
    feed = SayText(shown.append)
    for char in '{"say":"Well\\u0000 met.\\u0000","emotion":"joy"}':
        feed(char)
    assert "".join(shown) == "Well met." and all(shown)


def test_a_lone_high_surrogate_escape_passes_the_rest_of_the_line_on() -> None:
    """Found in review: after a high surrogate's escape the scanner jumped twelve characters without
    looking for its low half, past the closing quote of `\\ud800ab`: the rest of the line was lost."""
    from core.text import storable_output

    reply = '{"say":"\\ud800ab then more","emotion":"joy"}'
    for cut in range(1, len(reply)):  # the escape and what follows cut anywhere
        shown: list[str] = []
        feed = SayText(shown.append)
        for piece in _pieces(reply, [cut]):
            feed(piece)
        assert "".join(shown) == storable_output(json.loads(reply)["say"]), cut


@pytest.mark.parametrize("ascii_only", [True, False])
def test_the_stream_stops_where_the_stored_say_is_cut_and_never_shows_a_stop(ascii_only) -> None:
    """Diff review: the stored say is cut at the prompt's stop strings (a group's other members'
    `\\n<name>:`), but the stream went on past it: the reader saw another member's line, then a
    restart. Wherever the JSON is cut, the pieces add up to the cut say; a say holding no stop, or
    only part of one, streams whole."""
    from core.text import cut_at_stops

    stops = ("<|im_end|>", "\nBram:", "\nRowan:", "\nA B:", " B")  # review: one inside another too
    for say in (
        "Halt.\nBram: Let him in.\nRowan: Fine.",
        "Halt, Bram: stay.\nBra",
        "caf\u00e9 \U0001f600",
        "Hi\nA B: no",
    ):
        reply = json.dumps({"say": say, "emotion": "anger", "action": None}, ensure_ascii=ascii_only)
        for cut in range(1, len(reply)):
            shown: list[str] = []
            feed = SayText(shown.append, stops)
            for piece in _pieces(reply, [cut]):
                feed(piece)
            assert "".join(shown) == cut_at_stops(say, stops), f"cut at {cut}"
        shown = []
        feed = SayText(shown.append, stops)
        for char in reply:
            feed(char)
        assert "".join(shown) == cut_at_stops(say, stops) and not any("Bram:" in s for s in shown[:1])
