"""NPC actions: what a character may do besides talk, and the reply shape built from them.

A character declares its actions in its card (`data.extensions.mlchat.actions`, so the card
round-trips) or a turn sends them (`params.actions`). Such a turn's reply is
`{"say": ..., "emotion": one of EMOTIONS, "action": null | {"name", "args"}}`, generated under the
JSON schema `reply_schema` builds: an action that was not declared, or an argument of the wrong
type, cannot be produced.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from core.settings import settings
from core.validation import first_error
from roleplay.mood import EMOTIONS

# Names are identifiers: no prompt markers, quotes, spaces or control characters can ride in them.
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,47}$"
MAX_ARGS = 8
MAX_ENUM = 64
SAY_MAX_CHARS = 600  # the spoken line's limit in the schema (a reply is a few sentences)
ARG_MAX_CHARS = 40  # a free string argument's limit (an item, a target's name)

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
# One line without markers or brackets: no control character, prompt marker or lone surrogate rides
# into the [Actions] section or the stored row.
_ONE_LINE = r"^[^\x00-\x1f\x7f-\x9f<>{}\[\]|]*$"


def _encodable(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (not valid Unicode text)") from None
    return value


Description = Annotated[str, StringConstraints(max_length=300, pattern=_ONE_LINE), AfterValidator(_encodable)]
EnumValue = Annotated[
    str, StringConstraints(min_length=1, max_length=80, pattern=_ONE_LINE), AfterValidator(_encodable)
]


class ArgSpec(BaseModel):
    """One argument: its type, optionally a closed set of values."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["string", "integer", "number", "boolean"]
    description: Description = ""
    enum: list[EnumValue] | None = Field(default=None, min_length=1, max_length=MAX_ENUM)

    def json_schema(self) -> dict[str, Any]:
        """This argument's JSON schema."""
        if self.enum is not None:
            if self.type != "string":
                raise ValueError("enum is for string arguments")
            return {"enum": list(self.enum)}
        if self.type == "string":
            return {"type": "string", "maxLength": ARG_MAX_CHARS}
        return {"type": self.type}


class Action(BaseModel):
    """A declared action: `give_item(item)`, `attack(target)`, `open_shop()`."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    description: Description = ""
    args: dict[Name, ArgSpec] = Field(default_factory=dict, max_length=MAX_ARGS)

    def json_schema(self) -> dict[str, Any]:
        """The action's JSON schema: its name as a constant, and every argument required."""
        return {
            "type": "object",
            "properties": {
                "name": {"const": self.name},
                "args": {
                    "type": "object",
                    "properties": {name: arg.json_schema() for name, arg in self.args.items()},
                    "required": list(self.args),
                    "additionalProperties": False,
                },
            },
            "required": ["name", "args"],
            "additionalProperties": False,
        }

    def signature(self) -> str:
        """`give_item(item: string)`: the action as the prompt lists it."""
        args = ", ".join(f"{n}: {'|'.join(a.enum) if a.enum else a.type}" for n, a in self.args.items())
        return f"{self.name}({args})"


_ACTIONS: TypeAdapter[list[Action]] = TypeAdapter(list[Action])


def check_actions(value: Any, where: str, *, stored: bool = False) -> list[Action]:
    """The declaration as Actions; ValueError naming `where` and the place at fault. `stored`: a
    card's declaration read back for a turn, not held to the count and schema size limits, which
    came after some cards were stored (and a worker's limits may differ from the API's that took the
    card: every turn of the character would fail otherwise)."""
    if not isinstance(value, list):
        raise ValueError(f"{where}: a list of actions is expected")
    if not stored and len(value) > settings.structured_max_actions:
        raise ValueError(
            f"{where}: {len(value)} actions; the limit is {settings.structured_max_actions} "
            "(MLCHAT_STRUCTURED_MAX_ACTIONS)"
        )
    try:
        actions = _ACTIONS.validate_python(value)
    except ValidationError as exc:
        raise ValueError(first_error(exc, where)) from None
    names = [a.name for a in actions]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"{where}[{i}].name: {name!r} is declared twice")
    for i, action in enumerate(actions):
        for arg, spec in action.args.items():
            if spec.enum is not None and spec.type != "string":
                raise ValueError(f"{where}[{i}].args.{arg}.enum: only string arguments take an enum")
    # Each field within its limit can still make a schema of a megabyte, which every turn of the
    # character would compile and list in its prompt: held to a client schema's limit.
    if not stored:
        size = len(json.dumps(reply_schema(actions), ensure_ascii=False).encode())
        if size > settings.structured_max_schema_bytes:
            raise ValueError(
                f"{where}: the reply schema they make is {size} bytes; the limit is "
                f"{settings.structured_max_schema_bytes} (MLCHAT_STRUCTURED_MAX_SCHEMA_BYTES)"
            )
    return actions


def card_actions(card: dict[str, Any] | None) -> Any:
    """The raw declaration in a card (`data.extensions.mlchat.actions`), or None."""
    if not isinstance(card, dict):
        return None
    data = card.get("data")
    extensions = data.get("extensions") if isinstance(data, dict) else None
    ours = extensions.get("mlchat") if isinstance(extensions, dict) else None
    return ours.get("actions") if isinstance(ours, dict) else None


CARD_ACTIONS = "card.data.extensions.mlchat.actions"  # where a card declares them


def reply_schema(actions: list[Action], say_max_chars: int = SAY_MAX_CHARS) -> dict[str, Any]:
    """The NPC reply's JSON schema for these actions."""
    return {
        "type": "object",
        "properties": {
            "say": {"type": "string", "minLength": 1, "maxLength": say_max_chars},
            "emotion": {"enum": list(EMOTIONS)},
            "action": {"anyOf": [{"type": "null"}, *(a.json_schema() for a in actions)]},
        },
        "required": ["say", "emotion", "action"],
        "additionalProperties": False,
    }
