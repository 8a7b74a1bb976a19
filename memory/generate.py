"""The memory jobs' one call into the engine: a short instruction and text in, the model's text out,
on the bulk lane (live turns run ahead of it inside the engine)."""

from __future__ import annotations

from typing import Any

from core import metrics
from core.settings import settings
from memory.prompts import REQUEST_SPEAKERS
from worker import engine as engine_module
from worker.engine import GenerationRequest
from worker.prompt.formats import ChatMessage
from worker.prompt.roles import fit_roles


def memory_messages(builder: Any, system: str, user: str) -> list[ChatMessage]:
    """The request's messages fitted to the roles the model's template accepts (as a turn's are): a
    template refusing a system message gets the instructions in the user message."""
    return fit_roles(
        [{"role": "system", "content": system}, {"role": "user", "content": user}],
        builder.roles,
        REQUEST_SPEAKERS[0],
    )


def request_ids(builder: Any, system: str, user: str) -> tuple[list[int], Any]:
    """The request's token ids, as the model's template renders it, and that rendering."""
    rendered = builder.format.render(
        builder.tokenizer, memory_messages(builder, system, user), *REQUEST_SPEAKERS
    )
    ids = builder.tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens)["input_ids"]
    return list(ids), rendered


def memory_request(builder: Any, system: str, user: str, max_tokens: int) -> tuple[list[int], Any]:
    """The request's token ids and rendering, counted with the model's tokenizer; a text too long for
    `max_model_len - max_tokens` is cut at its end (a step that could never run would block the job)."""
    tokenizer = builder.tokenizer
    budget = builder.max_model_len - max_tokens
    for _ in range(4):  # a cut can re-tokenise a token longer or shorter: measure again
        ids, rendered = request_ids(builder, system, user)
        over = len(ids) - budget
        if over <= 0:
            return ids, rendered
        body = tokenizer(user, add_special_tokens=False)["input_ids"]
        # A cut inside a character's bytes decodes to U+FFFD, which the model would copy (review,
        # stop 75: half the cuts of a Korean line did).
        user = tokenizer.decode(body[: max(0, len(body) - over - 8)]).rstrip("\ufffd") + " [...]"
    raise ValueError(f"the memory instructions alone exceed the context ({len(ids)} > {budget} tokens)")


def generate_text(
    system: str, user: str, *, max_tokens: int, json_schema: dict[str, Any] | None = None, alone: bool = False
) -> str:
    """Generate one reply to (system, user), both already cleaned; with `json_schema`, the reply is
    constrained to it (guided decoding through vLLM's structured outputs); `alone`: in an otherwise
    empty engine (the request was inside one that died)."""
    from worker.pipeline import get_prompt_builder

    builder = get_prompt_builder()
    token_ids, rendered = memory_request(builder, system, user, max_tokens)
    controls: dict[str, Any] = {}
    if json_schema is not None:
        from vllm.sampling_params import StructuredOutputsParams

        # No free whitespace: a small model can spend its whole budget on newlines between tokens.
        controls["structured_outputs"] = StructuredOutputsParams(
            json=json_schema, disable_any_whitespace=True
        )
    request = GenerationRequest(
        token_ids=list(token_ids),
        # Greedy for a JSON answer: sampled, the bundled model wandered into a multi-byte character
        # at a string's length limit and never closed the JSON (finish_reason length).
        temperature=0.0 if json_schema is not None else 0.2,
        top_p=0.9,
        max_tokens=max_tokens,
        seed=0,
        # A JSON answer ends with its grammar; the format's stop strings (a speaker label) could cut
        # it inside a string.
        stop=() if json_schema is not None else rendered.stop,
        priority=engine_module.BULK,
        controls=controls,
        alone=alone,
    )
    (result,) = engine_module.generate([request])
    if isinstance(result, Exception):
        raise result
    # The engine's work as a batch's is (review: mlchat_tokens_total left every memory job out).
    metrics.record_tokens(
        settings.model, {"prompt": result.prompt_tokens, "completion": result.completion_tokens}
    )
    return str(result.text).strip()
