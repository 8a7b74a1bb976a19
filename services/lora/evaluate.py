"""Before and after: the quality gate on replies to held-out prompts, with the adapter and without.

The train command calls this on the dataset's validation prompts (prompts the adapter never trained
on) with the freshly trained PEFT model: one generation with the adapter, one with it disabled, same
seed and settings. Each reply gets the gate's persona score and checks (loop, truncation, language,
role; the echo check needs the prompt's sections, which a stored prompt no longer separates).
"""

from __future__ import annotations

import statistics
from typing import Any

from db.models import Character
from db.session import session_scope
from roleplay.quality import persona_text, score


def _persona(slug: str) -> tuple[str, Any]:
    from worker.embedder import embed

    with session_scope() as session:
        c = session.query(Character).filter(Character.slug == slug).one()
        name, text = c.name, persona_text(c.description, c.personality, c.example_dialogues) or c.name
    return name, embed([text])[0]


def player_line(row: dict[str, Any]) -> str:
    """The player's line an example answers, for the gate's language check: the data set's own
    (`message`); a set written before it was kept, the prompt's text after its last "user" (a chat
    template's role name; enough of the line for its script)."""
    message = row.get("message")
    return (
        message[:500] if isinstance(message, str) and message else row["prompt"].rsplit("user", 1)[-1][:500]
    )


def evaluate(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    slug: str,
    max_new_tokens: int = 48,
    add_special_tokens: bool = False,
) -> dict[str, Any]:
    """{"with_adapter": {...}, "without_adapter": {...}} over the rows' prompts, tokenized as the
    engine was given them (`add_special_tokens`: the data set's manifest's)."""
    import torch

    from worker.embedder import embed
    from worker.judge import gate

    if not rows:
        return {"prompts": 0}
    name, persona_vec = _persona(slug)
    outputs: dict[str, list[tuple[str, str | None, str]]] = {"with_adapter": [], "without_adapter": []}
    model.eval()
    for row in rows:
        ids = tokenizer(row["prompt"], add_special_tokens=add_special_tokens, return_tensors="pt")[
            "input_ids"
        ]
        ids = ids.to(model.device)
        message = player_line(row)
        for label in outputs:
            torch.manual_seed(0)
            with torch.no_grad():
                if label == "with_adapter":
                    out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
                else:
                    with model.disable_adapter():
                        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[0][ids.shape[1] :]
            finished = bool(len(new)) and int(new[-1]) == tokenizer.eos_token_id
            text = tokenizer.decode(new, skip_special_tokens=True).strip()
            outputs[label].append((text, None if finished else "length", message))
    bar = gate()
    result: dict[str, Any] = {"prompts": len(rows), "max_new_tokens": max_new_tokens}
    for label, replies in outputs.items():
        vectors = embed([t or " " for t, _, _ in replies])
        qualities = [
            score(
                reply=text,
                message=message,
                reply_vec=vec,
                persona_vec=persona_vec,
                own_recent_lines=[],
                finish_reason=finish,
                char_name=name,
            )
            for (text, finish, message), vec in zip(replies, vectors, strict=True)
        ]
        result[label] = {
            "persona_mean": round(statistics.mean(q.persona for q in qualities), 4),
            "below_bar_share": round(sum(bool(q.below(bar)) for q in qualities) / len(qualities), 4),
            "sample": replies[0][0][:200],
        }
    model.train()
    return result
