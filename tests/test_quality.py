"""Reply-quality scores: persona similarity, repetition (against history and within the reply), language."""

import numpy as np
import pytest

from roleplay.quality import dominant_script, score

V = np.array([1.0, 0.0, 0.0])


def _score(reply: str, message: str = "Any news?", recent=(), reply_vec=V, persona_vec=V):
    return score(
        reply=reply,
        message=message,
        reply_vec=reply_vec,
        persona_vec=persona_vec,
        own_recent_lines=list(recent),
    )


def test_repetition_counts_what_the_character_already_said() -> None:
    said = "The north road is closed until the thaw."
    assert _score(said, recent=[said]).repetition == 1.0
    assert _score("Fresh bread arrived from the mill today.", recent=[said]).repetition == 0.0
    looping = "I am Elara. I am Elara. I am Elara. I am Elara."
    q = _score(looping)
    assert q.self_repetition > 0.6 and q.below(0.0, 0.6) == [f"self-repetition {q.self_repetition:.2f} > 0.6"]


def test_persona_similarity_is_the_cosine_to_the_persona_vector() -> None:
    assert _score("x", reply_vec=np.array([1.0, 1.0, 0.0])).persona == pytest.approx(np.sqrt(0.5))
    assert _score("x", reply_vec=np.array([0.0, 1.0, 0.0])).below(0.1, 1.0) == ["persona 0.00 < 0.1"]


def test_language_match_compares_the_scripts() -> None:
    assert not _score("Sure, let's eat!", message="선장, 고기 먹으러 갈래?").language_match
    assert _score("좋아! 고기다!", message="선장, 고기 먹으러 갈래?").language_match
    assert _score("Hello!", message="?!").language_match  # no letters in the message: nothing to match
    assert [dominant_script(t) for t in ("고기", "meat", "мясо", "12")] == [
        "hangul",
        "latin",
        "cyrillic",
        None,
    ]
