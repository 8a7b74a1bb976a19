"""A scene as a run line or an API request describes it, validated before anything is stored: its
participants, premise, opening line, speaker strategy, length and stop condition, and sampling."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from core.settings import settings
from core.text import speaker_key
from roleplay.mood import AFFINITY_MAX, AFFINITY_MIN
from scenes.speakers import NARRATOR_NAME, NARRATOR_SLUG, Rule, Strategy, rule_order
from services.schemas import GenerationParams, Text
from worker.prompt.sanitize import Sanitizer


class Participant(BaseModel):
    """One character of the scene (a bare slug is accepted for `{"character": slug}`)."""

    model_config = ConfigDict(extra="forbid")

    character: Text = Field(min_length=1, max_length=64)
    talkativeness: float = Field(default=0.5, ge=0, le=1)
    muted: bool = False
    # Its initial affinity toward other participants, by their slug (the others start at 0).
    moods: dict[str, Annotated[int, Field(ge=AFFINITY_MIN, le=AFFINITY_MAX)]] = Field(
        default_factory=dict, max_length=64
    )


class NarratorSpec(BaseModel):
    """The narrator as a participant: third-person lines, picked by the scene's strategy like any
    member (`true` is accepted for `{}`)."""

    model_config = ConfigDict(extra="forbid")

    position: int | None = Field(default=None, ge=0)  # speaks before participants[position]; None: last
    talkativeness: float = Field(default=0.5, ge=0, le=1)
    instructions: Text = Field(default="", max_length=20_000)  # its own direction for the scene


class RuleSpec(BaseModel):
    """`speaker` speaks after `after` in each round."""

    model_config = ConfigDict(extra="forbid")

    speaker: Text = Field(min_length=1, max_length=64)
    after: Text = Field(min_length=1, max_length=64)


class Opening(BaseModel):
    """The scene's first line, spoken by one participant (stored as given, never generated)."""

    model_config = ConfigDict(extra="forbid")

    speaker: Text = Field(min_length=1, max_length=64)
    text: Text = Field(min_length=1, max_length=20_000)


class SceneSpec(BaseModel):
    """What a scene is; every limit names its field when broken."""

    model_config = ConfigDict(extra="forbid")

    participants: list[Participant]
    premise: Text = Field(default="", max_length=20_000)
    opening: Opening | None = None
    strategy: Strategy = "fixed"
    rules: list[RuleSpec] = Field(default_factory=list, max_length=1000)
    narrator: NarratorSpec | None = None
    allow_repeat: bool = False
    exchanges: int = Field(ge=1)  # generated lines (the opening is not one)
    end_phrase: Text | None = Field(default=None, min_length=1, max_length=200)
    player_name: Text = Field(default="", max_length=200)
    params: GenerationParams = Field(default_factory=GenerationParams)

    @model_validator(mode="after")
    def _end_phrase_not_stopped(self) -> SceneSpec:
        """A stop string the end phrase holds cuts the reply before the phrase is written (vLLM leaves
        stop strings out of the text), so the phrase never ends the scene (review)."""
        if self.end_phrase:
            phrase = self.end_phrase.casefold()
            for i, stop in enumerate(self.params.stop or []):
                if stop.casefold() in phrase:
                    raise ValueError(
                        f"params.stop.{i}: {stop!r} would cut every reply before end_phrase"
                        f" {self.end_phrase!r} is written, and the phrase would never end the scene"
                    )
        return self

    @field_validator("participants", mode="before")
    @classmethod
    def _slugs(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"character": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("participants")
    @classmethod
    def _count(cls, value: list[Participant]) -> list[Participant]:
        if len(value) < 2:
            raise ValueError(f"a scene needs at least 2 participants, got {len(value)}")
        if len(value) > settings.scene_max_participants:
            raise ValueError(
                f"{len(value)} participants; the limit is {settings.scene_max_participants} "
                "(MLCHAT_SCENE_MAX_PARTICIPANTS)"
            )
        slugs = [p.character for p in value]
        twice = sorted({s for s in slugs if slugs.count(s) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} named more than once")
        if all(p.muted for p in value):
            raise ValueError("every participant is muted: nobody could speak")
        return value

    @field_validator("narrator", mode="before")
    @classmethod
    def _narrator_flag(cls, value: Any) -> Any:
        if value is True:
            return {}
        if value is False:
            return None
        return value

    @field_validator("narrator")
    @classmethod
    def _narrator(cls, value: NarratorSpec | None, info: ValidationInfo) -> NarratorSpec | None:
        if value is None or "participants" not in info.data:  # bad participants: already reported
            return value
        slugs = [p.character for p in info.data["participants"]]
        if value.position is not None and value.position > len(slugs):
            raise ValueError(
                f"narrator.position: {value.position} is past the last of {len(slugs)} participants"
            )
        return value

    @field_validator("participants")
    @classmethod
    def _moods(cls, value: list[Participant]) -> list[Participant]:
        slugs = {p.character for p in value}
        for i, p in enumerate(value):
            for other in p.moods:
                if other == p.character:
                    raise ValueError(f"participants.{i}.moods.{other}: a mood toward itself; name another")
                if other not in slugs:
                    raise ValueError(f"participants.{i}.moods.{other}: {other!r} is not a participant")
        return value

    @field_validator("exchanges")
    @classmethod
    def _length(cls, value: int) -> int:
        if value > settings.scene_max_exchanges:
            raise ValueError(
                f"{value} exchanges; the limit is {settings.scene_max_exchanges} (MLCHAT_SCENE_MAX_EXCHANGES)"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SceneSpec:
        slugs = [p.character for p in self.participants]
        if self.narrator is not None:
            slugs = [*slugs, NARRATOR_SLUG]  # the rules may name it
        fmt = (self.params.response_format or {"type": "text"})["type"]
        if self.narrator is not None and fmt not in ("text", "npc"):
            # the narrator writes prose: a scene-wide schema would store JSON as narration
            raise ValueError(
                f"params.response_format: a scene with a narrator takes only 'text' or 'npc', not {fmt!r}"
            )
        if self.opening is not None and self.opening.speaker not in slugs[: len(self.participants)]:
            raise ValueError(f"opening.speaker: {self.opening.speaker!r} is not a participant")
        if self.strategy == "rules" and not self.rules:
            raise ValueError("rules: the rules strategy needs at least one rule")
        if self.rules and self.strategy != "rules":
            raise ValueError(f"rules: only the rules strategy reads rules (strategy is {self.strategy!r})")
        try:
            rule_order(slugs, self.rule_list())
        except ValueError as exc:
            raise ValueError(f"rules: {exc}") from None
        return self

    @model_validator(mode="after")
    def _two_voices(self) -> SceneSpec:
        # Nobody but its members speaks in a scene run: one voice would talk to itself.
        if self.voices() < 2:
            raise ValueError(
                "participants: only one of them can speak (the others are muted) and there is no "
                "narrator; a scene needs two voices"
            )
        return self

    def voices(self) -> int:
        """Who may speak: the participants not muted, and the narrator."""
        return sum(not p.muted for p in self.participants) + (self.narrator is not None)

    def rule_list(self) -> list[Rule]:
        """The rules as the picker takes them."""
        return [Rule(r.speaker, r.after) for r in self.rules]

    def slugs(self) -> list[str]:
        """The participants' character slugs, in speaking position."""
        return [p.character for p in self.participants]

    def narrator_json(self) -> dict[str, Any] | None:
        """The narrator as the scene row stores it (its position resolved), or None."""
        if self.narrator is None:
            return None
        position = len(self.participants) if self.narrator.position is None else self.narrator.position
        return {
            "position": position,
            "talkativeness": self.narrator.talkativeness,
            "instructions": self.narrator.instructions,
        }


RUN_SCENE_CONVERSATION = re.compile(r"run:|sha256:[0-9a-f]{64}\Z")


class GroupSpec(SceneSpec):
    """A live group conversation (POST /v1/scenes): the game's conversation id, and the exchanges
    to run now with no player line (0: the player speaks first)."""

    conversation: Text = Field(min_length=1, max_length=200)
    exchanges: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _two_voices(self) -> GroupSpec:
        # The player is a group's other voice, but the exchanges asked for now run with no player line
        # between them.
        if self.voices() < 2 and self.exchanges > 1:
            raise ValueError(
                "exchanges: only one participant can speak (the others are muted) and there is no "
                "narrator; such a group runs at most 1 exchange without the player"
            )
        return self

    @field_validator("conversation")
    @classmethod
    def _not_a_runs(cls, value: str) -> str:
        # A run's scene line names its conversation so (services/runs/submit.py): a live group of
        # that name would make the line's scene fail on every submission of the run.
        if RUN_SCENE_CONVERSATION.match(value):
            raise ValueError(
                "names starting with 'run:', and 'sha256:' digests, name runs' scene conversations"
            )
        return value


class ContinueSpec(BaseModel):
    """A live group asked to go on without a player line (POST /v1/scenes/{conversation}:continue)."""

    model_config = ConfigDict(extra="forbid")

    exchanges: int = Field(ge=1)

    @field_validator("exchanges")
    @classmethod
    def _length(cls, value: int) -> int:
        if value > settings.scene_max_exchanges:
            raise ValueError(
                f"{value} exchanges; the limit is {settings.scene_max_exchanges} (MLCHAT_SCENE_MAX_EXCHANGES)"
            )
        return value


def name_clash(spec: SceneSpec, names: dict[str, str]) -> str | None:
    """ "field: reason" when two participants share a display name, or the player has a member's name
    (their lines could not be told apart in the prompt); None when every speaker's name is its own."""
    taken: dict[str, int] = {}
    for i, p in enumerate(spec.participants):
        if spec.narrator is not None and p.character == NARRATOR_SLUG:
            return (
                f"participants.{i}.character: {p.character!r} is the narrator's slug; "
                "rename the character or drop the narrator"
            )
        key = _label_key(names.get(p.character, p.character), "Someone")
        if key in taken:
            return (
                f"participants.{i}.character: {p.character!r} is named {names.get(p.character)!r}, as "
                f"participants.{taken[key]} is; members of a group need names of their own"
            )
        taken[key] = i
    if spec.narrator is not None:
        narrator = NARRATOR_NAME.casefold()
        if narrator in taken:
            i = taken[narrator]
            return (
                f"participants.{i}.character: {spec.participants[i].character!r} is named "
                f"{NARRATOR_NAME!r}, as the scene's narrator is; members of a group need names of their own"
            )
        taken[narrator] = -1
    if _label_key(spec.player_name, "User") in taken:
        return f"player_name: {spec.player_name!r} is a member's name; the player needs their own"
    return None


_LABELS = Sanitizer(None)  # labels as the prompt writes them, less any tokenizer's special-token breaks


def _label_key(name: str, default: str) -> str:
    # The name as the prompt labels it (Sanitizer.label: NFKC, no invisible characters, cut to its
    # length), compared as speaker names are ("Ｂｒａｍ", "Bra\u200bm" are Bram; two names alike in
    # their first 200 characters once normalised are one label).
    return speaker_key(_LABELS.label(name, default))
