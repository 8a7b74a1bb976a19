"""Per-model prompt layouts: the tokenizer's chat template, or the text formats SOLAR/EEVE/GPT-OSS used."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ChatMessage = dict[str, str]


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    add_special_tokens: bool  # True when the format relies on the tokenizer to add BOS
    stop: tuple[str, ...]


def _chat_template(tokenizer: Any, messages: list[ChatMessage], char: str, user: str) -> RenderedPrompt:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return RenderedPrompt(text, False, ())


def _solar(tokenizer: Any, messages: list[ChatMessage], char: str, user: str) -> RenderedPrompt:
    # upstage/SOLAR-10.7B-Instruct: "### System:", "### User:", "### Assistant:" blocks.
    label = {"system": "### System:", "user": "### User:", "assistant": "### Assistant:"}
    body = "".join(f"{label[m['role']]}\n{m['content']}\n\n" for m in messages)
    return RenderedPrompt(body + "### Assistant:\n", True, ("### User:", "### System:"))


def _eeve(tokenizer: Any, messages: list[ChatMessage], char: str, user: str) -> RenderedPrompt:
    # yanolja/EEVE-Korean-Instruct-10.8B: a system preamble, then "Human:" / "Assistant:" lines.
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    label = {"user": "Human", "assistant": "Assistant"}
    lines = [f"{label[m['role']]}: {m['content']}" for m in messages if m["role"] != "system"]
    return RenderedPrompt(system + "\n" + "\n".join(lines) + "\nAssistant: ", True, ("\nHuman:",))


def _gpt_oss_text(tokenizer: Any, messages: list[ChatMessage], char: str, user: str) -> RenderedPrompt:
    # The original service's plain-text dialogue simulation for GPT-OSS.
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    speaker = {"user": user, "assistant": char}
    lines = [f"{speaker[m['role']]}: {m['content']}" for m in messages if m["role"] != "system"]
    text = "--- 대화 시뮬레이션 ---\n" + system + "\n\n" + "\n".join(lines) + f"\n{char}:"
    return RenderedPrompt(text, True, (f"\n{user}:",))


RENDERERS: dict[str, Callable[[Any, list[ChatMessage], str, str], RenderedPrompt]] = {
    "chat_template": _chat_template,
    "solar": _solar,
    "eeve": _eeve,
    "gpt_oss_text": _gpt_oss_text,
}
