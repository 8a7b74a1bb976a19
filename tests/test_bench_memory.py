"""The memory bench's needles (scripts/bench_memory.py): questions worded unlike the facts they ask
about, each answer once in its conversation, and the path that carried an answer into the prompt."""

from __future__ import annotations

import random
import re

import pytest

from db.facts import FactHit
from db.retrieval import HistoryLine, TurnContext
from db.summaries import SummaryLine
from scripts.bench_memory import FILLER, NEEDLES, POOLS, REPLIES, _plant, recalled_via
from tests.test_memory import _card
from worker.prompt import PromptBuilder, PromptInput

# Words that carry no topic: sharing them does not make a question close to a fact.
FUNCTION_WORDS = {
    "about", "again", "does", "from", "have", "that", "them", "then", "there", "this", "what",
    "when", "where", "which", "while", "whose", "with", "would", "your",
}  # fmt: skip


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4} - FUNCTION_WORDS


@pytest.mark.parametrize("needle", NEEDLES, ids=lambda n: n.questions[0])
def test_a_question_shares_no_content_word_with_any_plant_or_distractor(needle) -> None:  # type: ignore[no-untyped-def]
    said = set().union(*(_content_words(t) for t in needle.plants + needle.distractors))
    for question in needle.questions:
        assert not _content_words(question) & said, question


def test_each_answer_is_said_once_beyond_the_recent_window_and_nowhere_else() -> None:
    templates = " ".join(t for n in NEEDLES for t in n.plants + n.questions + n.distractors) + " ".join(
        FILLER + REPLIES
    )
    for values in POOLS.values():
        assert not [v for v in values if re.search(rf"\b{v}\b", templates, re.IGNORECASE)]
    for seed in range(20):
        lines, probes = _plant(random.Random(seed), 300, 12)
        assert len(probes) == 5 and len({a for _, a in probes}) == 5
        for question, answer in probes:
            said = [i for i, (_, text) in enumerate(lines) if re.search(rf"\b{answer}\b", text)]
            assert len(said) == 1 and said[0] < 300 - 12 and lines[said[0]][0] == "user"
            assert answer not in question


def test_recalled_via_names_only_the_parts_the_packer_kept(tokenizer) -> None:  # type: ignore[no-untyped-def]
    builder = PromptBuilder(tokenizer, "chat_template", 4096)
    context = TurnContext(
        recent=[HistoryLine(300, "user", "Hello again.", 300)],
        similar=[HistoryLine(40, "user", "My sister Mira sends her greetings.", 40, 0.4)],
        summaries=[SummaryLine(7, 0, 1, 200, "Rowan's sister is called Mira.")],
        facts=[
            FactHit(3, "player", "Rowan", "Rowan's sister is Mira.", "turn:9", "conversation", 0.6, 0.7, 1.0)
        ],
    )

    def via(memory_tokens: int) -> set[str]:
        item = PromptInput(
            _card(), "Rowan", "Who did I grow up with?", context, 32, memory_tokens=memory_tokens
        )
        return recalled_via("Mira", context, builder.build(item).manifest)

    assert via(512) == {"summary", "fact", "retrieved"}
    assert via(0) == {"retrieved"}  # the memory budget left the summary and the fact out
    context.recent.append(HistoryLine(301, "assistant", "Ah, Mira! How is she?", 301))
    assert via(0) == {"retrieved", "recent"}
    assert (
        recalled_via(
            "Tove", context, builder.build(PromptInput(_card(), "Rowan", "Hm?", context, 32)).manifest
        )
        == set()
    )


def test_each_live_probe_asks_a_message_of_its_own(monkeypatch) -> None:
    """Found in review: every probe built the same prompt, so after the first it timed a prefill
    held in the prefix cache, against live turns of fresh prompts."""
    from scripts import bench_memory
    from worker import engine as engine_module

    asked: list[str] = []

    class Builder:
        def build(self, given):  # type: ignore[no-untyped-def]
            asked.append(given.message)
            return type("Built", (), {"token_ids": [1, 2, 3], "stop": []})()

    monkeypatch.setattr(engine_module, "generate", lambda requests: [])
    for n in range(3):
        bench_memory._live_probe_s(Builder(), None, n)  # type: ignore[arg-type]
    assert len(set(asked)) == 3
