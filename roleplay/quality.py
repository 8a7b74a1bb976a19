"""Per-reply quality scores, from vectors and text the batch already has.

- persona: cosine similarity of the reply to the character's persona (its description and the
  character's lines in the example dialogue), embedded once per character.
- repetition: the share of the reply's word 3-grams that the character already said in the recent
  history of this conversation (0 = all new, 1 = a verbatim repeat).
- self_repetition: the share of the reply's word 3-grams that repeat within the reply itself (a small
  model looping on one sentence scores high).
- language_match: whether the reply is written in the script of the player's message (Hangul,
  Latin, kana, Han…); a message with no letters matches anything.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Quality:
    persona: float
    repetition: float
    self_repetition: float
    language_match: bool
    message_script: str | None
    reply_script: str | None

    def below(self, min_persona: float, max_repetition: float) -> list[str]:
        """Why the reply is below the bar; empty when it passes."""
        reasons = []
        if self.persona < min_persona:
            reasons.append(f"persona {self.persona:.2f} < {min_persona}")
        if self.repetition > max_repetition:
            reasons.append(f"repetition {self.repetition:.2f} > {max_repetition}")
        if self.self_repetition > max_repetition:
            reasons.append(f"self-repetition {self.self_repetition:.2f} > {max_repetition}")
        if not self.language_match:
            reasons.append(f"reply in {self.reply_script}, message in {self.message_script}")
        return reasons

    def as_json(self) -> dict[str, Any]:
        return {
            "persona": round(self.persona, 4),
            "repetition": round(self.repetition, 4),
            "self_repetition": round(self.self_repetition, 4),
            "language_match": self.language_match,
            "message_script": self.message_script,
            "reply_script": self.reply_script,
        }


def persona_text(description: str, personality: str, examples: Sequence[dict[str, Any]]) -> str:
    """What a reply in character should resemble."""
    lines = [description, personality] + [str(e.get("character", "")) for e in examples]
    return "\n".join(line for line in lines if line)


def score(
    *,
    reply: str,
    message: str,
    reply_vec: Any,
    persona_vec: Any,
    own_recent_lines: Sequence[str],
) -> Quality:
    a, b = np.asarray(reply_vec, dtype=np.float32), np.asarray(persona_vec, dtype=np.float32)
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    persona = float(a @ b) / denom if denom else 0.0
    said = set()
    for line in own_recent_lines:
        said |= _trigrams(line)
    mine = _trigrams(reply)
    repetition = len(mine & said) / len(mine) if mine else 0.0
    grams = _trigram_list(reply)
    self_repetition = 1.0 - len(set(grams)) / len(grams) if grams else 0.0
    message_script, reply_script = dominant_script(message), dominant_script(reply)
    match = message_script is None or reply_script is None or message_script == reply_script
    return Quality(persona, repetition, self_repetition, match, message_script, reply_script)


def _trigram_list(text: str) -> list[tuple[str, ...]]:
    words = [w.casefold() for w in _WORD.findall(text)]
    return [tuple(words[i : i + 3]) for i in range(len(words) - 2)]


def _trigrams(text: str) -> set[tuple[str, ...]]:
    return set(_trigram_list(text))


def dominant_script(text: str) -> str | None:
    """The script most of the text's letters are written in (from Unicode character names)."""
    counts: Counter[str] = Counter()
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            script = name.split(" ", 1)[0] if name else "UNKNOWN"
            counts["HANGUL" if script in ("HANGUL",) else "HAN" if script == "CJK" else script] += 1
    return counts.most_common(1)[0][0].lower() if counts else None
