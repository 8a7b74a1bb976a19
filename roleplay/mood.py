"""The character's mood toward the player: one emotion from a fixed set, and a bounded affinity.
In a group, each member also holds an affinity toward each other member (its regard), moved the same
way by the lines those members speak to it (`toward_member`).

A free-text reply's update comes from a classifier: the sentence embedder the worker already runs
(an NPC reply, generated under a schema, names its own emotion: `chosen_emotion`). The reply's
emotion is the nearest emotion prototype (when it is near enough); affinity moves with how friendly
or hostile the player's message reads. Both are computed from vectors the batch has anyway, so they
cost no model call.
An update the classifier is not sure of leaves the state as it was, and says why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

EMOTIONS = ("neutral", "joy", "anger", "sadness", "fear", "surprise")
AFFINITY_MIN, AFFINITY_MAX = -100, 100
MAX_STEP = 10  # the most one exchange moves affinity
MIN_EMOTION_SIMILARITY = 0.25  # below this the reply is too far from every prototype to call
MIN_EMOTION_MARGIN = 0.02  # the winner must beat the runner-up by this much
MIN_TONE_MARGIN = 0.04  # friendly-vs-hostile difference below which affinity stays

_EMOTION_PROTOTYPES = {
    "neutral": ["I see.", "Alright, here is what I know.", "The road north takes two days."],
    "joy": ["Ha! That's wonderful, I'm so happy!", "What great news, thank you!", "I love it!"],
    "anger": ["How dare you! Get out!", "I'm furious with you.", "Don't you ever say that again!"],
    "sadness": ["I miss them so much.", "That breaks my heart.", "I feel so alone and sad."],
    "fear": ["I'm scared, something is out there.", "Please, I don't want to die.", "Run, hide!"],
    "surprise": ["What? Really? I can't believe it!", "Wow, I never expected that!", "No way!"],
}
_TONE_PROTOTYPES = {
    "friendly": [
        "Thank you so much, you're very kind.",
        "I brought you a gift, friend.",
        "I really like you and I'm glad to help.",
    ],
    "hostile": [
        "You're a useless liar and I hate you.",
        "Shut up, idiot, or I'll hurt you.",
        "I stole your money and I don't care.",
    ],
}


def attitude(affinity: int) -> str:
    """The word for an affinity: hostile, cold, neutral, warm or devoted."""
    if affinity <= -60:
        return "hostile"
    if affinity <= -20:
        return "cold"
    if affinity < 20:
        return "neutral"
    return "warm" if affinity < 60 else "devoted"


def affinity_step(tone: float) -> int | None:
    """How far a line of this tone (friendly minus hostile similarity) moves an affinity; None when
    it reads neither friendly nor hostile enough to move it."""
    if abs(tone) < MIN_TONE_MARGIN:
        return None
    return int(np.clip(round(tone * 40), -MAX_STEP, MAX_STEP))


def moved_affinity(affinity: int, tone: float) -> int | None:
    """The affinity after a line of this tone, within its bounds; None when the line does not move it."""
    step = affinity_step(tone)
    return None if step is None else int(np.clip(affinity + step, AFFINITY_MIN, AFFINITY_MAX))


def describe_toward(char: str, other: str, affinity: int) -> str:
    """A member's regard for another member as a prompt line."""
    return f"{char} feels {attitude(affinity)} toward {other} (affinity {affinity})."


@dataclass(frozen=True)
class Mood:
    emotion: str = "neutral"
    affinity: int = 0

    def describe(self, char: str, user: str) -> str:
        """The state as a prompt line."""
        return (
            f"{char} currently feels {self.emotion}. {char}'s attitude toward {user}: "
            f"{attitude(self.affinity)} "
            f"(affinity {self.affinity} on a scale of {AFFINITY_MIN} to {AFFINITY_MAX})."
        )


@dataclass(frozen=True)
class Regard:
    """A group member's affinity toward another member, before and after the line it answered, and
    the line's step unbounded: the store adds the step to the regard as it is then (another writer
    may have moved it since the claim) and bounds the sum, not after - before, which was bounded
    against the value read at the claim."""

    character_id: int
    name: str
    before: int
    after: int
    step: int


@dataclass(frozen=True)
class MoodUpdate:
    before: Mood
    after: Mood
    emotion_scores: dict[str, float]
    tone: float  # friendly minus hostile similarity of the player's message
    notes: list[str]  # why a part of the state was left unchanged
    toward: Regard | None = None  # a group line answering another member: the regard it moved

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "before": {"emotion": self.before.emotion, "affinity": self.before.affinity},
            "after": {"emotion": self.after.emotion, "affinity": self.after.affinity},
            "emotion_scores": {k: round(v, 4) for k, v in self.emotion_scores.items()},
            "tone": round(self.tone, 4),
            "notes": self.notes,
        }
        if self.toward is not None:
            out["toward"] = {
                "character_id": self.toward.character_id,
                "name": self.toward.name,
                "before": self.toward.before,
                "after": self.toward.after,
                "step": self.toward.step,
            }
        return out


def toward_member(update: MoodUpdate, *, character_id: int, name: str, regard: int) -> MoodUpdate:
    """The update of a line that answers another member's line: that line's tone moves the regard
    toward its speaker, and the affinity toward the player stays (the player did not speak)."""
    notes = [n for n in update.notes if not n.startswith("affinity unchanged")]
    step = affinity_step(update.tone) or 0
    if not step:
        notes.append(f"regard toward {name} unchanged: the line reads neither friendly nor hostile")
    notes.append(f"affinity toward the player unchanged: the line answered was {name}'s")
    mood = Mood(update.after.emotion, update.before.affinity)
    after = moved_affinity(regard, update.tone) if step else regard
    regard_update = Regard(character_id, name, regard, regard if after is None else after, step)
    return MoodUpdate(update.before, mood, update.emotion_scores, update.tone, notes, regard_update)


def player_silent(update: MoodUpdate) -> MoodUpdate:
    """The update of a scene line that answers no player line (the narrator's, or nobody's): the
    affinity toward the player stays."""
    notes = [n for n in update.notes if not n.startswith("affinity")]
    notes.append("affinity toward the player unchanged: the player did not speak")
    mood = Mood(update.after.emotion, update.before.affinity)
    return MoodUpdate(update.before, mood, update.emotion_scores, update.tone, notes, update.toward)


def chosen_emotion(update: MoodUpdate, emotion: str) -> MoodUpdate:
    """The update with the emotion the model chose in a structured reply (affinity stays the
    classifier's: it reads the player's message, not the reply)."""
    if emotion not in EMOTIONS:
        raise ValueError(f"emotion {emotion!r} is not one of {EMOTIONS}")
    notes = [n for n in update.notes if not n.startswith("emotion unchanged")]
    notes.append(f"emotion {emotion}: chosen by the model in its structured reply")
    after = Mood(emotion, update.after.affinity)
    return MoodUpdate(update.before, after, update.emotion_scores, update.tone, notes, update.toward)


class MoodClassifier:
    """Prototype vectors, embedded once per process with the worker's embedder."""

    def __init__(self, embed: Callable[[list[str]], np.ndarray]) -> None:
        self._emotions = {k: _centroid(embed(v)) for k, v in _EMOTION_PROTOTYPES.items()}
        self._tone = {k: _centroid(embed(v)) for k, v in _TONE_PROTOTYPES.items()}

    def update(self, before: Mood, message_vec: Sequence[float], reply_vec: Sequence[float]) -> MoodUpdate:
        reply, message = _unit(reply_vec), _unit(message_vec)
        scores = {k: float(reply @ c) for k, c in self._emotions.items()}
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        (best, best_score), (_, second_score) = ranked[0], ranked[1]
        notes = []
        emotion = before.emotion
        if best_score < MIN_EMOTION_SIMILARITY:
            notes.append(f"emotion unchanged: the reply is near no emotion (best {best} {best_score:.2f})")
        elif best_score - second_score < MIN_EMOTION_MARGIN:
            notes.append(f"emotion unchanged: {best} and {ranked[1][0]} are too close to call")
        else:
            emotion = best
        tone = float(message @ self._tone["friendly"] - message @ self._tone["hostile"])
        affinity = moved_affinity(before.affinity, tone)
        if affinity is None:
            affinity = before.affinity
            notes.append(f"affinity unchanged: the message reads neither friendly nor hostile ({tone:+.3f})")
        return MoodUpdate(before, Mood(emotion, affinity), scores, tone, notes)


def _unit(v: Sequence[float]) -> np.ndarray:
    arr = np.asarray(v, dtype=np.float32)
    norm = float(np.linalg.norm(arr))
    return arr / norm if norm else arr


def _centroid(vectors: np.ndarray) -> np.ndarray:
    return _unit(np.asarray(vectors, dtype=np.float32).mean(axis=0))
