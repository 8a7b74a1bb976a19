"""Reply-quality scores and the gate's checks: persona similarity, repetition (against history and
within the reply), language, prompt echo, truncation, role breaks. The failures are the demo's own."""

import numpy as np
import pytest

from roleplay.quality import (
    Bar,
    Quality,
    dominant_script,
    instruction_echo,
    prompt_echo,
    reason_kind,
    role_break,
    score,
    truncated,
)

V = np.array([1.0, 0.0, 0.0])


def _score(reply: str, message: str = "Any news?", recent=(), reply_vec=V, persona_vec=V, **extra):
    return score(
        reply=reply,
        message=message,
        reply_vec=reply_vec,
        persona_vec=persona_vec,
        own_recent_lines=list(recent),
        **extra,
    )


def test_repetition_counts_what_the_character_already_said() -> None:
    said = "The north road is closed until the thaw."
    assert _score(said, recent=[said]).repetition == 1.0
    assert _score("Fresh bread arrived from the mill today.", recent=[said]).repetition == 0.0
    looping = "I am Elara. I am Elara. I am Elara. I am Elara."
    q = _score(looping)
    assert q.self_repetition > 0.6 and q.sentence_repeats == 4
    assert [reason_kind(r) for r in q.below(Bar(min_persona=0.0))] == ["loop"]


def test_persona_similarity_is_the_cosine_to_the_persona_vector() -> None:
    assert _score("x", reply_vec=np.array([1.0, 1.0, 0.0])).persona == pytest.approx(np.sqrt(0.5))
    assert _score("x", reply_vec=np.array([0.0, 1.0, 0.0])).below(Bar(max_repetition=1.0)) == [
        "persona: 0.00 < 0.2"
    ]


def test_japanese_that_mixes_kana_and_kanji_is_one_language() -> None:
    """Found in review: hiragana, katakana, kanji and halfwidth forms each counted as a script of its
    own, and every Japanese sentence mixes them: a reply in kana to a message mostly in kanji was
    flagged `language` below the bar (best of n skewed, the LoRA set losing the reply)."""
    assert _score("そうですね、わかりました。", message="明日も来る？").language_match
    assert _score("コーヒー？ブラックでいい？", message="ありがとう、助かったよ").language_match
    assert _score("ｱﾘｶﾞﾄｳ", message="ありがとう").language_match
    assert _score("明日来", message="そうですね").language_match  # kanji alone may be Japanese
    assert not _score("Sure, see you tomorrow.", message="明日も来る？").language_match
    assert [dominant_script(t) for t in ("明日も来る？", "ｱﾘｶﾞﾄｳ", "ｃａｆｅ", "明日")] == [
        "japanese",
        "japanese",
        "latin",
        "han",
    ]


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


LUFFY_POST = "루피의 말투로, 한두 문장의 반말로 대답하세요."
SOURCES = [
    ("system_prompt", "You are Elara, a wizard of the old tower. Stay in character and answer briefly."),
    ("character_sheet", "[Character]\nName: Elara\nDescription: A wizard who keeps the tower's library."),
    ("post-history instruction", LUFFY_POST),
]


def _echoes(reply: str, sources=SOURCES) -> str | None:
    match = prompt_echo(reply, sources)
    return match.section if match is not None and match.echoes(6, 0.6) else None


def test_a_reply_that_reproduces_an_instruction_is_an_echo() -> None:
    match = prompt_echo(LUFFY_POST, SOURCES)
    assert (match.section, match.span_words, match.share) == ("post-history instruction", 6, 1.0)
    assert match.span == "루피의 말투로, 한두 문장의 반말로 대답하세요"
    assert _echoes("Stay in character and answer briefly, traveller.") == "system_prompt"
    assert _echoes("You are a dragon. You are a dragon.", [("system_prompt", "You are a dragon.")])
    # Naming the character or a trait in passing is not an echo.
    assert prompt_echo("I am Elara. The tower's library is open to you today.", SOURCES).span_words == 4
    assert _echoes("I am Elara. The tower's library is open to you today.") is None
    assert prompt_echo("", SOURCES) is None


def test_the_echo_checks_sections_are_kept_within_a_word_budget() -> None:
    """Review (stop 75): each section's index (about 330 bytes a word) was kept by entry count alone,
    1,024 of them, keyed by a text that names the player: a popular card's sheet, one per player,
    held a worker's hundreds of MB. Now they are kept within SOURCE_WORDS_KEPT words."""
    import tracemalloc

    from roleplay import quality

    sheet = " ".join(f"word{i % 700} trait{i % 53}" for i in range(750))  # 1,500 words
    reply = "A reply that echoes nothing of the sheet at all, traveller."
    quality._sources.clear()
    quality._sources_words = 0
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for player in range(400):  # 600,000 words of sections: three times the budget
            prompt_echo(reply, [("character_sheet", f"{{{{user}}}} is Player{player}. {sheet}")])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert quality._sources_words <= quality.SOURCE_WORDS_KEPT
    assert held < 120_000_000, held  # the budget's ~66 MB, not the 400 sections' ~200 MB
    again = f"{{{{user}}}} is Player399. {sheet}"
    assert (again, quality._WORD.pattern) in quality._sources  # the newest is kept, and read from there
    # Sections of symbols hold no words but cost memory all the same (review: they counted 0).
    for status in range(1000):
        prompt_echo(reply, [("character_sheet", f"╔{'═' * 2990}╗ {status}")])
    assert len(quality._sources) <= quality.SOURCE_WORDS_KEPT // 498


LUFFY_SOURCES = [
    ("system_prompt", "당신은 '루피'입니다. 설명이나 해설 없이 대사만 한국어로 짧게 말하세요."),
    (
        "character_sheet",
        "밀짚모자 해적단의 선장. 고무고무 열매를 먹은 고무 인간으로, 해적왕이 되는 것이 꿈이다.",
    ),
    ("post-history instruction", LUFFY_POST),
]


def _luffy(reply: str) -> list[str]:
    q = _score(reply, message="고무고무 열매는 어떤 맛이었어?", echo_sources=LUFFY_SOURCES)
    return [reason_kind(r) for r in q.below(Bar())]


def test_a_korean_reply_that_starts_the_instruction_again_is_an_echo() -> None:
    # Two words of the instruction are six of its units: the labelled replies that echo it this way
    # passed the word-run check (data/quality_labels/, e.g. luffy-01006, luffy-01142).
    match = instruction_echo("(루피의 말투로, 이릴때)", LUFFY_SOURCES)
    assert (match.section, match.span_words, match.span) == ("post-history instruction", 6, "루피의 말투로")
    assert prompt_echo("(루피의 말투로, 이릴때)", LUFFY_SOURCES).span_words == 2
    assert _luffy("(루피의 말투로, 이릴때)") == ["echo"]
    assert _luffy("반말로 대답하세요.") == ["echo"]
    # His own name, and the facts of his sheet, are his to say: only the instructions count by unit.
    assert _luffy("루피의 꿈은 해적왕이야! 시시시!") == []
    assert _luffy("고무고무 열매를 먹은 뒤로 몸이 쭉쭉 늘어나! 맛은 별로였어!") == []
    assert instruction_echo("고무고무 열매를 먹은 뒤로 몸이 쭉쭉 늘어나!", LUFFY_SOURCES) is None


def test_an_instruction_echo_survives_the_stored_record() -> None:
    q = _score("루피의 말투로, 어둑으로 대답하세요.", message="밥 먹었어?", echo_sources=LUFFY_SOURCES)
    again = Quality.from_json(q.as_json())
    assert again.instruction_echo == q.instruction_echo
    assert again.below(Bar()) == q.below(Bar())
    assert again.below(Bar(instruction_span_units=99)) == []


def test_a_reply_cut_at_the_token_limit_mid_sentence_is_truncated() -> None:
    assert truncated("The road north is closed until the", "length")
    assert not truncated("The road north is closed.", "length")
    assert not truncated('She said, "Go home!"', "length")
    assert not truncated("The road north is closed until the", "stop")  # it stopped by itself
    assert not truncated("좋아! 고기다 🍖", "length")


def test_speaking_as_the_player_or_another_character_or_addressing_the_reader_is_a_role_break() -> None:
    assert (
        role_break(
            "Elara: Welcome.\nTamsin: Thanks!", speaker="character", char_name="Elara", user_name="Tamsin"
        )
        == "speaks as the player ('Tamsin:')"
    )
    assert (
        role_break("Welcome.\nUser: what now?", speaker="character", char_name="Elara", user_name="")
        == "speaks as the player ('User:')"
    )
    assert (
        role_break("Luffy: I'm hungry!", speaker="character", char_name="Elara", user_name="Mira")
        == "speaks as 'Luffy'"
    )
    assert (
        role_break("Elara: Welcome, traveller.", speaker="character", char_name="Elara", user_name="Mira")
        is None
    )
    narrator = "The gate creaks open. How do you proceed?"
    assert (
        role_break(narrator, speaker="narrator", char_name="Elara", user_name="")
        == "the narrator addresses the reader ('you')"
    )
    quoted = 'The gate creaks open. "Are you lost?" Elara asks the stranger.'
    assert role_break(quoted, speaker="narrator", char_name="Elara", user_name="") is None
    assert role_break("It is 12:30 and quiet.", speaker="character", char_name="Elara", user_name="") is None
    # Review (stop 75): a vowel sign (a mark) ended the label, so a Hindi or Thai player's name, or a
    # decomposed "Zoë", was never read as a speaker.
    for player, line in (("राम", "राम: चलो"), ("สมศักดิ์", "สมศักดิ์: ไปกันเถอะ"), ("Zoe\u0308", "Zoe\u0308: hi")):
        said = role_break(f"Welcome.\n{line}", speaker="character", char_name="Elara", user_name=player)
        assert said == f"speaks as the player ('{player}:')", (player, said)
    # Found in review: names are compared as the prompt's labels are (NFKC, no disguising invisible
    # characters): a character named in full-width letters whose reply opens with its name in plain
    # ones speaks as itself, and a player named "Elara\u200b" is the player.
    assert (
        role_break("Alice: Welcome.", speaker="character", char_name="Ａｌｉｃｅ", user_name="Mira") is None
    )
    assert (
        role_break(
            "Elara: Welcome.\nElara (player): Hi.",
            speaker="character",
            char_name="Elara",
            user_name="Elara\u200b",
        )
        == "speaks as the player ('Elara (player):')"
    )


def test_below_bar_reasons_name_their_check() -> None:
    q = score(
        reply="The gate creaks open. How do you proceed? The gate",
        message="What happens?",
        reply_vec=V,
        persona_vec=V,
        own_recent_lines=[],
        finish_reason="length",
        echo_sources=[("system_prompt", "Do not address the reader. The wind blows over the gate.")],
        speaker="narrator",
        char_name="Elara",
    )
    assert [reason_kind(r) for r in q.below(Bar())] == ["truncated", "role"]
    echo = _score(LUFFY_POST, message="밥 먹었어?", echo_sources=SOURCES)
    assert [reason_kind(r) for r in echo.below(Bar())] == ["echo"]


def test_a_player_named_like_the_character_or_a_name_with_odd_blanks_is_no_role_break() -> None:
    # found in review: both were "role breaks", so the reply was regenerated, ranked last among
    # best-of-n candidates and left out of the LoRA dataset
    assert (
        role_break("Rowan: Welcome home.", speaker="character", char_name="Rowan", user_name="rowan") is None
    )
    assert (
        role_break(
            "Rowan Smith: Welcome.", speaker="character", char_name="Rowan\u00a0Smith", user_name="Mira"
        )
        is None
    )
    assert (
        role_break("Mira  Vale: hello", speaker="character", char_name="Elara", user_name="Mira Vale")
        == "speaks as the player ('Mira  Vale:')"
    )
    assert (  # the player as the prompt labels them, told apart from the character
        role_break(
            "Aye.\nRowan (player): and then?", speaker="character", char_name="Rowan", user_name="rowan"
        )
        == "speaks as the player ('Rowan (player):')"
    )


def test_a_speaker_label_is_looked_for_on_its_own_line_only() -> None:
    from roleplay.quality import _SPEAKER_LABEL

    # Blank lines before a label are not part of its match: a leading `\s*` ran over every newline
    # after each line start and back, quadratic in a reply of blank lines (8,000: 1.8 s).
    assert _SPEAKER_LABEL.match("\n\nTamsin: hi") is None
    assert [m.group(1) for m in _SPEAKER_LABEL.finditer("\n\n  Tamsin: hi")] == ["Tamsin"]
    assert _SPEAKER_LABEL.search("Tamsin\n: hi") is None
